"""Per-token MVTM features for the MOODv2 scores (issue #7): h = the input of the vocabulary head.

Two kinds of pass over a slice's 400 tokens:
- "unmasked": one pass over the observed tokens; h_i describes token i seen together with its context.
- "masked":   STRIDE^2 = 4 passes over a fixed partition of the grid (cell (r, c) is in group
              (r % 2) * 2 + c % 2); in each pass one group is replaced by [MASK], and h_i is kept from the pass
              that masked token i. h_i is then the MVTM's context-only prediction for position i (each masked
              token sees all 8 neighbours unmasked), so logits_i = head(h_i) is the prediction MIM-OOD samples
              from, and -log p(z_i) is its surprise at the observed code.

`FeatureGraph` is the one definition of both passes, as a module with a graph-friendly signature
(tokens [B, N] int32 -> h [B, N, d] float32) so that an exported ONNX graph computes exactly what the fit
used; the logits are not part of it, because the scorer computes them from h with the stored head in
float64 (logits = h W^T + b exactly, see mimood.ood.scores).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mimood.config import GRID
from mimood.models.transformer import TokenTransformer

PASSES = ("unmasked", "masked")
STRIDE = 2          # masked pass: STRIDE x STRIDE interleaved groups, i.e. 4 passes with 25% masked


def mask_groups(grid: int = GRID, stride: int = STRIDE) -> np.ndarray:
    """The fixed partition of the grid for the masked pass: [stride^2, grid*grid] bool, one row per pass."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    group = (r % stride) * stride + c % stride                               # [N]
    return group[None, :] == np.arange(stride * stride)[:, None]            # [P, N]


class FeatureGraph(nn.Module):
    """tokens [B, N] int32 -> h [B, N, d] float32, the MVTM's final hidden states for one pass type."""

    def __init__(self, mvtm: TokenTransformer, pass_type: str):
        super().__init__()
        if mvtm.task != "mvtm":
            raise ValueError(f"OOD features need the MVTM, got a {mvtm.task!r} transformer")
        if pass_type not in PASSES:
            raise ValueError(f"pass_type must be one of {PASSES}, got {pass_type!r}")
        self.mvtm, self.pass_type = mvtm, pass_type
        groups = torch.from_numpy(mask_groups(int(round(mvtm.cfg.seq_len ** 0.5))))
        self.register_buffer("groups", groups, persistent=False)            # [P, N] bool

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pass_type == "unmasked":
            return self.mvtm.features(tokens).float()                        # [B, N, d]
        out = None
        mask_id = torch.full_like(tokens, self.mvtm.mask_id)
        for g in self.groups:                                                # STRIDE^2 passes, unrolled
            h = self.mvtm.features(torch.where(g, mask_id, tokens)).float()  # [B, N, d]
            out = h if out is None else torch.where(g[None, :, None], h, out)
        return out


@torch.no_grad()
def mvtm_features(graph: FeatureGraph, tokens: np.ndarray, batch: int = 128) -> np.ndarray:
    """Run `graph` over tokens [S, N] (any integer dtype) in batches on the graph's device; returns h [S, N, d]
    float32 on the host."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be an integer [S, N] array, got {tokens.dtype} {tokens.shape}")
    graph.eval()
    device = graph.mvtm.head.weight.device
    out = [graph(torch.from_numpy(tokens[i:i + batch].astype(np.int32)).to(device)).cpu().numpy()
           for i in range(0, len(tokens), batch)]
    d = graph.mvtm.cfg.width
    return np.concatenate(out) if out else np.zeros((0, tokens.shape[1], d), np.float32)


def head_weights(mvtm: TokenTransformer) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary head as float64 numpy: W [K, d], b [K] (K codes; the head has no [MASK] row)."""
    return (mvtm.head.weight.detach().double().numpy().copy(),
            mvtm.head.bias.detach().double().numpy().copy())
