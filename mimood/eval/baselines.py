"""The paper's baselines, run with the same VQ-VAE and data as MIM-OOD.

- AR restoration (Latent Spatial Restoration, Naval Marimont & Tarroni 2021; the paper's Table 2 baseline):
  scan the token grid in raster order; at each position take the NLL of the current token under the AR model given
  the current, partly resampled prefix; if it exceeds lam_nll (paper: 6), replace the token by a draw from the AR
  softmax (temperature 1). R restorations in parallel, decoded and scored exactly like MIM-OOD (`DecodeScore`).
  Two implementations give identical tokens for the same noise:
    `ar_restore_reference`  one full forward pass per raster position (400 per batch: the paper's cost);
    `ar_restore`            re-runs the model only after some row resampled a token (exact; see its docstring).
- MVTM likelihood (Table 1 row "MVTM"): -log p(observed token | the other tokens) from s*s passes of the MVTM over
  an s x s lattice partition of the grid. As a detector it plugs into the MIM-OOD loop in place of the ATD
  (`TorchEngine(..., detector=MVTMLikelihood(mvtm))`), with its own threshold chosen on healthy data.
- Intensity: the preprocessed image itself is the anomaly score (bright T2 lesions; a known strong BraTS baseline).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimood.config import GRID
from mimood.models.transformer import TokenTransformer


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [M, K], u [M] in [0, 1) -> [M] int64: the first code whose cumulative probability reaches u
    (the same rule as `MVTMStep`, so a draw is a pure function of the probabilities and the noise)."""
    cdf = torch.cumsum(probs, dim=-1)                                        # [M, K]
    return (cdf < u.unsqueeze(-1)).sum(-1).clamp(max=probs.shape[-1] - 1)   # cdf[-1] may round below u


@torch.no_grad()
def ar_nll(ar: TokenTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, N] -> NLL [B, N] float32 of each token given its raster prefix (one teacher-forced pass).
    The AR baseline's token score (Table 1)."""
    logp = F.log_softmax(ar(tokens).float(), dim=-1)                         # [B, N, K]
    return -logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def _resample_at(logp: torch.Tensor, tokens: torch.Tensor, u: torch.Tensor, lam_nll: float) -> torch.Tensor:
    """One LSR decision for M (row, position) pairs: logp [M, K] of the position given its prefix, the current
    tokens [M] and noise u [M] -> tokens [M], drawn anew where the NLL exceeds lam_nll."""
    flag = -logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) > lam_nll
    return torch.where(flag, sample_inverse_cdf(logp.exp(), u).to(tokens.dtype), tokens)


@torch.no_grad()
def ar_restore_reference(ar: TokenTransformer, tokens: torch.Tensor, noise: torch.Tensor, lam_nll: float,
                         positions: int | None = None) -> torch.Tensor:
    """LSR restoration as published: for each raster position i, a full forward pass over the current tokens
    [B, N]; resample token i where its NLL > lam_nll, drawing with noise[:, i]. Returns the new tokens [B, N].
    positions: scan only the first `positions` raster positions (benchmarks time a prefix; every pass costs
    the same)."""
    tokens = tokens.clone()
    for i in range(tokens.shape[1] if positions is None else positions):
        logp = F.log_softmax(ar(tokens)[:, i].float(), dim=-1)               # [B, K]
        tokens[:, i] = _resample_at(logp, tokens[:, i], noise[:, i], lam_nll)
    return tokens


@torch.no_grad()
def ar_restore(ar: TokenTransformer, tokens: torch.Tensor, noise: torch.Tensor, lam_nll: float
               ) -> tuple[torch.Tensor, int]:
    """The same restoration as `ar_restore_reference`, with far fewer forward passes. Returns (tokens, passes).

    The AR model is causal, so the logits at position i depend only on tokens < i. After a pass, every row walks
    from its cursor to its first flagged position p: the positions before p keep their tokens (their prefixes
    have not changed since the pass, so the reference would decide the same), p is resampled with noise[:, p],
    and the row needs a new pass only because its prefix changed. Passes = 1 + the largest number of tokens
    resampled in a row, instead of N. Every pass runs the whole batch, so its shapes (and floating-point
    results) are those of the reference.
    """
    tokens = tokens.clone()
    B, N = tokens.shape
    pos = torch.arange(N, device=tokens.device)
    cursor = torch.zeros(B, dtype=torch.long, device=tokens.device)          # first undecided position per row
    passes = 0
    while bool((cursor < N).any()):
        logp = F.log_softmax(ar(tokens).float(), dim=-1)                     # [B, N, K]
        passes += 1
        nll = -logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)      # [B, N]
        flagged = (nll > lam_nll) & (pos[None, :] >= cursor[:, None])        # [B, N]
        rows = torch.nonzero(flagged.any(dim=1)).flatten()
        first = flagged.to(torch.int8).argmax(dim=1)                         # first flagged position per row
        cursor = torch.where(flagged.any(dim=1), first + 1, torch.full_like(cursor, N))
        if rows.numel():
            p = first[rows]
            tokens[rows, p] = _resample_at(logp[rows, p], tokens[rows, p], noise[rows, p], lam_nll)
    return tokens, passes


class MVTMLikelihood(nn.Module):
    """tokens [BR, N] int -> NLL [BR, N] float32: -log p(observed token | all other tokens but its lattice cell).

    Pass k masks the tokens whose (row mod s, col mod s) is the k-th of the s*s cells, so each token is scored
    once with all 8 of its neighbours visible (for s >= 2). A graph-friendly detector for `TorchEngine`.
    """

    def __init__(self, mvtm: TokenTransformer, stride: int = 2):
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.mvtm = mvtm
        r, c = np.divmod(np.arange(GRID * GRID), GRID)
        cell = (r % stride) * stride + (c % stride)                          # [N]
        masks = cell[None, :] == np.arange(stride * stride)[:, None]         # [s*s, N]
        self.register_buffer("masks", torch.from_numpy(masks), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        nll = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        for m in self.masks:                                                 # [N] bool
            inp = torch.where(m, torch.full_like(tokens, self.mvtm.mask_id), tokens)
            logp = F.log_softmax(self.mvtm(inp).float(), dim=-1)             # [BR, N, K]
            nll = torch.where(m, -logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1), nll)
        return nll
