"""Position-conditional normalisation of token scores: a healthy "atlas" of each score's mean and spread at every
(axial position bin, grid position), so that a token is compared with healthy tokens at the same place.

Why: raw token scores depend strongly on anatomy. Tokens at the brain's edge and slices near the top and bottom of
the brain (few brain tokens, unusual shapes) score high in healthy scans, and lesions sit mostly in central
slices. Aggregated raw scores then rank slices by position rather than by lesion: on the cpu-preset run, ViM's
slice-level AUROC on the demo set (healthy and lesion volumes from one generator) was 0.24, and 0.63 after this
normalisation (benchmarks/ood_table.py). Preprocessing centres every brain in the 160 x 160 window, so grid
positions roughly correspond across scans; the axial position is the slice's place between the scan's first and
last kept slices (those with >= 2% brain), so it assumes a scan covers the whole brain.

z = (score - mean[bin, position]) / std[bin, position], with mean and variance from healthy training slices
(brain tokens only), shrunk toward the bin's pooled values where a position has few tokens:
w = n / (n + SHRINK); a bin without tokens (few short training scans) uses the values pooled over all bins.
Sums are float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 10           # axial position bins over a scan's kept slices
SHRINK = 10.0       # a position with n tokens keeps weight n / (n + SHRINK) against its bin's pooled value


def position_bins(index, bins: int = BINS) -> np.ndarray:
    """Axial position bin [S] of slices at volume indices `index` [S], relative to the first and last of them
    (a single slice: middle). From indices rather than ranks so that a training scan whose lesion slices were
    dropped (mimood-train --lesion-margin) keeps its remaining slices at their true positions."""
    index = np.asarray(index, dtype=np.float64)
    if index.ndim != 1 or index.size < 1:
        raise ValueError("a scan needs at least one slice index")
    span = index.max() - index.min()
    rel = (index - index.min()) / span if span > 0 else np.full(index.shape, 0.5)
    return np.minimum((rel * bins).astype(np.int64), bins - 1)


def slice_bins(n_slices: int, bins: int = BINS) -> np.ndarray:
    """Axial position bin [S] of each slice of a scan of S consecutive slices (S = 1: middle)."""
    if n_slices < 1:
        raise ValueError("a scan needs at least one slice")
    return position_bins(np.arange(n_slices), bins)


@dataclass
class Atlas:
    mean: np.ndarray    # [B, N] float64
    std: np.ndarray     # [B, N] float64, > 0

    def normalise(self, scores: np.ndarray, bins: np.ndarray) -> np.ndarray:
        """z-scores [S, N] of scores [S, N] for slices in axial bins [S]."""
        return (np.asarray(scores, dtype=np.float64) - self.mean[bins]) / self.std[bins]


class AtlasFit:
    """Accumulates float64 sums of one score over healthy scans, then `finish()` -> Atlas."""

    def __init__(self, n_tokens: int, bins: int = BINS):
        self.n = np.zeros((bins, n_tokens))
        self.s1 = np.zeros((bins, n_tokens))
        self.s2 = np.zeros((bins, n_tokens))

    def add(self, scores: np.ndarray, mask: np.ndarray, bins: np.ndarray) -> None:
        """scores [S, N], mask [S, N] bool (the brain tokens to count), bins [S] axial bins of the slices."""
        w = np.asarray(mask, dtype=np.float64)
        x = np.where(mask, np.asarray(scores, dtype=np.float64), 0.0)
        for arr, v in ((self.n, w), (self.s1, x), (self.s2, x * x)):
            np.add.at(arr, bins, v)

    def finish(self) -> Atlas:
        n_all = self.n.sum()
        if n_all == 0:
            raise ValueError("no healthy brain token to build the atlas from")
        mu_all = self.s1.sum() / n_all
        var_all = max(self.s2.sum() / n_all - mu_all ** 2, 0.0)
        n_bin = self.n.sum(axis=1, keepdims=True)                               # [B, 1]
        safe_bin = np.maximum(n_bin, 1.0)
        mu_bin = np.where(n_bin > 0, self.s1.sum(axis=1, keepdims=True) / safe_bin, mu_all)  # empty bin: pooled
        var_bin = np.where(n_bin > 0, np.maximum(self.s2.sum(axis=1, keepdims=True) / safe_bin - mu_bin ** 2, 0.0),
                           var_all)
        safe = np.maximum(self.n, 1.0)
        mu = self.s1 / safe
        var = np.maximum(self.s2 / safe - mu ** 2, 0.0)
        w = self.n / (self.n + SHRINK)                                          # 0 where a position is empty
        mean = w * mu + (1 - w) * mu_bin
        var = w * var + (1 - w) * var_bin
        floor = 1e-12 + 1e-6 * var_bin                                          # constant scores: no div by 0
        return Atlas(mean=mean, std=np.sqrt(np.maximum(var, floor)))
