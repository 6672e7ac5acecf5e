"""VQ-VAE tokenizer: a 160 x 160 slice <-> a 20 x 20 grid of codebook ids.

Built on MONAI's `VQVAE` (three stride-2 levels, EMA codebook), which exports to ONNX cleanly. Added here:
token-level encode/decode, codebook statistics (perplexity, share of codes used) and dead-code restarts,
so the codebook does not collapse when training is short.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE as MonaiVQVAE
from torch import nn

from mimood.config import VQConfig


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.channels)
        self.net = MonaiVQVAE(
            spatial_dims=2, in_channels=1, out_channels=1,
            channels=cfg.channels, num_res_layers=cfg.num_res_layers, num_res_channels=cfg.channels,
            downsample_parameters=((2, 4, 1, 1),) * levels,
            upsample_parameters=((2, 4, 1, 1, 0),) * levels,
            num_embeddings=cfg.num_embeddings, embedding_dim=cfg.embedding_dim,
            commitment_cost=cfg.commitment_cost, decay=cfg.decay, dropout=cfg.dropout,
            ddp_sync=True,
        )

    @property
    def quantizer(self):
        return self.net.quantizer.quantizer  # monai EMAQuantizer

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.embedding.weight  # [K, D]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,1,H,W] -> (reconstruction [B,1,H,W], commitment loss, tokens [B,h,w] int64).

        In training mode the EMA codebook update happens here (MONAI)."""
        z = self.net.encode(x)                                   # [B, D, h, w]
        zq, q_loss, tokens = self.quantizer(z)                   # straight-through, EMA update when training
        rec = self.net.decode(zq)
        self._last_z = z.detach()
        return rec, q_loss, tokens

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,1,H,W] -> tokens [B,h,w] int64 (nearest codebook entry). No codebook update."""
        z = self.net.encode(x)                                   # [B, D, h, w]
        return self.nearest_code(z)

    def nearest_code(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,D,h,w] -> [B,h,w] ids of the nearest code (L2). Written out (rather than the MONAI quantizer's
        forward) so that it never touches the EMA state and exports to ONNX as MatMul + ArgMin."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)              # [B*h*w, D]
        e = self.codebook                                        # [K, D]
        d = (e * e).sum(1)[None, :] - 2 * flat @ e.t()           # [B*h*w, K]  (|z|^2 is constant per row)
        return d.argmin(dim=1).view(B, h, w)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,h,w] -> codebook vectors [B,D,h,w]."""
        return F.embedding(tokens.long(), self.codebook).permute(0, 3, 1, 2)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,h,w] -> image [B,1,H,W]."""
        return self.net.decode(self.embed(tokens))

    def after_step(self, step: int) -> None:
        """Training hook: dead-code restarts at step 1 (data-driven codebook init) and every `restart_every`."""
        if step == 1 or step % self.cfg.restart_every == 0:
            self.restart_dead_codes()

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor | None = None) -> int:
        """Move codes whose EMA usage share fell below `dead_code_threshold` x the uniform share (1/K) onto random
        encoder outputs of the last batch (z [B,D,h,w]); returns how many were restarted. Keeps the codebook from
        collapsing; called at step 1 it is a data-driven initialisation of the codebook."""
        z = self._last_z if z is None else z
        q = self.quantizer
        share = q.ema_cluster_size / q.ema_cluster_size.sum().clamp_min(1e-12)   # [K]
        dead = torch.nonzero(share < self.cfg.dead_code_threshold / q.num_embeddings).flatten()
        if dead.numel() == 0:
            return 0
        # z is bfloat16 under CPU bf16 autocast (mimood-train --bf16); the codebook and EMA buffers stay float32
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).to(q.embedding.weight.dtype)
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        new = flat[pick] + 1e-3 * torch.randn_like(flat[pick])
        mean_size = q.ema_cluster_size.mean()
        q.embedding.weight.data[dead] = new
        q.ema_w.data[dead] = new * mean_size
        q.ema_cluster_size.data[dead] = mean_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must hold the same codebook: take rank 0's
            for t in (q.embedding.weight.data, q.ema_w.data, q.ema_cluster_size.data):
                torch.distributed.broadcast(t, 0)
        return int(dead.numel())


def codebook_stats(tokens: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Perplexity of the code histogram and the share of codes used at least once."""
    counts = torch.bincount(tokens.flatten().long(), minlength=num_codes).double()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    return {"perplexity": perplexity, "usage": (counts > 0).double().mean().item()}
