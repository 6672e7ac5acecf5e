"""One transformer over the 20 x 20 token grid, with thin task heads (in the spirit of muse-maskgit):

- `mvtm`: bidirectional, input vocabulary K + [MASK] (id K), head K logits per token.
- `atd`:  bidirectional, input vocabulary K, head one logit per token (sigmoid = P(anomalous)).
- `ar`:   causal over raster order, input [BOS]=K followed by tokens[:-1], head K logits (next-token).

Blocks are written here rather than taken from MONAI's `TransformerBlock` because we need stochastic depth
(paper: 0.1), `scaled_dot_product_attention` with a causal switch, and access to the final hidden states
(the MOODv2 OOD scores read them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimood.config import TransformerConfig

TASKS = ("mvtm", "atd", "ar")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.width % cfg.heads == 0
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B,h,N,c]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-LN transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, cfg: TransformerConfig, drop_path: float):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width),
                                 nn.Dropout(cfg.dropout))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln1(x), causal))
        return x + self.drop_path(self.mlp(self.ln2(x)))


class TokenTransformer(nn.Module):
    """tokens [B, N] -> logits ([B, N, K] for mvtm/ar, [B, N] for atd)."""

    def __init__(self, cfg: TransformerConfig, task: str):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        self.cfg, self.task = cfg, task
        self.mask_id = cfg.vocab_size            # [MASK] for mvtm, [BOS] for ar
        n_in = cfg.vocab_size + (0 if task == "atd" else 1)
        self.tok_emb = nn.Embedding(n_in, cfg.width)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()   # deeper blocks dropped more often (BEiT)
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 1 if task == "atd" else cfg.vocab_size)
        self.apply(self._init)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)

    @property
    def causal(self) -> bool:
        return self.task == "ar"

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] (ids) -> final hidden states [B, N, width] (after the final LayerNorm), the input of
        the head: logits = head(features) exactly."""
        tokens = tokens.long()
        if self.causal:   # shift right: position i sees [BOS], t_0 .. t_{i-1} and predicts t_i
            bos = torch.full_like(tokens[:, :1], self.mask_id)
            tokens = torch.cat([bos, tokens[:, :-1]], dim=1)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb[:, : tokens.shape[1]])   # [B, N, C]
        for block in self.blocks:
            x = block(x, self.causal)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(tokens))   # [B, N, K] or [B, N, 1]
        return logits.squeeze(-1) if self.task == "atd" else logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
