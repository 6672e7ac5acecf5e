"""The four computations of the restoration loop as modules with fixed, graph-friendly signatures.

The PyTorch reference engine calls exactly these modules and `mimood.export` writes exactly these modules to
ONNX, so the reference and the lean runtime share one definition of each step:

    EncodeGraph   x [B,1,H,W] float32                      -> tokens [B,N] int32
    ATDGraph      tokens [BR,N] int32                      -> probs [BR,N] float32  (P(token is anomalous))
    MVTMStep      tokens [BR,N] int32, mask [BR,N] bool,
                  noise [BR,N] float32 in [0,1)            -> tokens [BR,N] int32   (masked ones re-sampled)
    DecodeScore   tokens [BR,N] int32, x [B,1,H,W] float32 -> maps [B,H,W] float32  (smoothed |x_T - x_0|,
                                                              zero outside the brain, mean over R)

Rows of the BR dimension are ordered slice-major: row b*R + r is restoration r of slice b.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimood.config import GRID, RESIDUALS
from mimood.models.transformer import TokenTransformer
from mimood.models.vqvae import VQVAE


class EncodeGraph(nn.Module):
    def __init__(self, vqvae: VQVAE):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vqvae.encode(x).flatten(1).to(torch.int32)               # [B, N]


class ATDGraph(nn.Module):
    def __init__(self, atd: TokenTransformer):
        super().__init__()
        self.atd = atd

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.atd(tokens).float())                        # [BR, N]


class MVTMStep(nn.Module):
    """Replace masked tokens by [MASK], predict them, and draw each one independently from the MVTM's
    softmax at `temperature` by inverse-CDF sampling with the given uniform noise (so the draw is a pure
    function of its inputs: sampling happens on the device, reproducibly)."""

    def __init__(self, mvtm: TokenTransformer, temperature: float = 1.0):
        super().__init__()
        self.mvtm = mvtm
        self.temperature = temperature

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        masked = torch.where(mask, torch.full_like(tokens, self.mvtm.mask_id), tokens)
        logits = self.mvtm(masked).float() / self.temperature                # [BR, N, K]
        cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)           # [BR, N, K]
        sample = (cdf < noise.unsqueeze(-1)).sum(-1)                         # first code whose cdf >= u
        sample = sample.clamp(max=logits.shape[-1] - 1).to(tokens.dtype)     # cdf[-1] may round below u
        return torch.where(mask, sample, tokens)


class DecodeScore(nn.Module):
    """Decode the R restorations of each slice, take |restoration - input| (residual "abs"; "positive":
    max(input - restoration, 0)), smooth it with a min-pool (removes thin edges) then an average pool, zero it
    outside the brain (input > 0) and average over R."""

    def __init__(self, vqvae: VQVAE, R: int, min_pool: int = 3, avg_pool: int = 7, residual: str = "abs"):
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"unknown residual {residual!r}; expected one of {', '.join(RESIDUALS)}")
        self.vqvae, self.R, self.min_pool, self.avg_pool, self.residual = vqvae, R, min_pool, avg_pool, residual

    def restoration(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vqvae.decode(tokens.view(-1, GRID, GRID)).float().clamp(0, 1)    # [BR, 1, H, W]

    def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x_rep = x.repeat_interleave(self.R, dim=0)                           # [BR, 1, H, W]
        d = x_rep - self.restoration(tokens)
        d = d.abs() if self.residual == "abs" else d.clamp(min=0)
        return smooth_residual(d, x, self.R, self.min_pool, self.avg_pool)


def smooth_residual(d: torch.Tensor, x: torch.Tensor, R: int, min_pool: int, avg_pool: int) -> torch.Tensor:
    """|restoration - input| d [B*R, 1, H, W] (slice-major) of inputs x [B, 1, H, W] -> maps [B, H, W]: min-pool
    (removes thin edges), mean over R, average pool, zero outside the brain (x > 0). Also the DAE baseline's map."""
    B, _, H, W = x.shape
    if min_pool > 1:                                                         # per restoration (not linear)
        d = -F.max_pool2d(-d, min_pool, stride=1, padding=min_pool // 2)
    # the average pool is linear and the brain mask is the same for all R: average over R first (R x less
    # pooling work, same result)
    d = d.view(B, R, H, W).mean(dim=1, keepdim=True)                         # [B, 1, H, W]
    if avg_pool > 1:
        d = F.avg_pool2d(d, avg_pool, stride=1, padding=avg_pool // 2, count_include_pad=False)
    return (d * (x > 0).to(d.dtype))[:, 0]                                   # [B, H, W]


@torch.no_grad()
def encode_slices(vqvae, images: np.ndarray, batch: int) -> np.ndarray:
    """Tokens [M, N] int32 of slices [M, H, W] float32 (the loop's encoder graph, in batches of `batch` on the
    CPU; calibration, the OOD fit and its evaluation tokenise with it)."""
    encode = EncodeGraph(vqvae).eval()
    return np.concatenate([encode(torch.from_numpy(images[i:i + batch, None])).numpy()
                           for i in range(0, len(images), batch)])
