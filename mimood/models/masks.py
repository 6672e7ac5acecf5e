"""Masks on the token grid: brush strokes (paper: "a random walk of a brush with a randomly changing width"),
MaskGIT's cosine-schedule random masks, and the ATD corruption.

The brush follows DeepFill-v2's `brush_stroke_mask` (vertices joined by segments whose direction alternates
around a random mean angle, step length ~ N(r, r/2) with r = grid diagonal / 8), scaled to the 20 x 20 grid:
widths of 1-4 tokens, and the width changes from segment to segment. Segments are rasterised exactly (a
cell is painted when its centre lies within width/2 of the segment), so consecutive segments share a vertex
and every stroke is 8-connected. Strokes are grown segment by segment until the requested coverage is met,
and a segment that would overshoot the upper bound ends the stroke, so coverage stays within bounds.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mimood.config import MaskConfig


def _segment_cells(grid: int, p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
    """Cells [grid, grid] whose centre lies within width/2 of the segment p0-p1 (coordinates in cells)."""
    yy, xx = np.mgrid[0:grid, 0:grid]
    c = np.stack([yy, xx], -1).astype(np.float64)               # [g, g, 2]
    d = p1 - p0
    t = np.clip(((c - p0) @ d) / max(d @ d, 1e-12), 0.0, 1.0)   # projection onto the segment
    dist = np.linalg.norm(c - (p0 + t[..., None] * d), axis=-1)
    return dist <= width / 2.0 + 1e-9


def brush_stroke(rng: np.random.Generator, grid: int, cfg: MaskConfig, widths: tuple[int, int]):
    """One stroke of the brush, yielded piece by piece ([grid, grid] bool each): a disc at the start, then one
    segment per vertex, each with its own width. Pieces share their end points, so any prefix of the stroke
    is 8-connected."""
    mean_len = math.hypot(grid, grid) / 8.0
    mean_angle = 2 * math.pi / 5 + rng.uniform(0, 2 * math.pi / 15) * rng.choice([-1, 1])
    angle = rng.uniform(0, 2 * math.pi)
    p = rng.uniform(0, grid - 1, size=2)
    yield _segment_cells(grid, p, p, rng.integers(widths[0], widths[1] + 1))
    for v in range(rng.integers(cfg.min_vertices, cfg.max_vertices + 1)):
        a = angle + (mean_angle if v % 2 == 0 else 2 * math.pi - mean_angle)
        length = float(np.clip(rng.normal(mean_len, mean_len / 2), 0, 2 * mean_len))
        q = np.clip(p + length * np.array([math.sin(a), math.cos(a)]), 0, grid - 1)
        yield _segment_cells(grid, p, q, rng.integers(widths[0], widths[1] + 1))
        p, angle = q, a


def brush_mask(rng: np.random.Generator, grid: int, cfg: MaskConfig,
               coverage: tuple[float, float] = (0.05, 0.5)) -> np.ndarray:
    """One brush-stroke mask [grid, grid] bool whose painted share lies in [coverage[0], coverage[1]]."""
    lo, hi = coverage
    n = grid * grid
    target = rng.uniform(lo, hi) * n
    mask = np.zeros((grid, grid), bool)
    for stroke in range(100):                                   # bounded; strokes of width 1 always fit
        # the first strokes use the configured widths; later ones (rare) fall back to width 1 so hi holds
        widths = (cfg.min_width, cfg.max_width) if stroke < cfg.max_strokes else (1, 1)
        for piece in brush_stroke(rng, grid, cfg, widths):
            if mask.sum() >= target or (mask | piece).sum() > hi * n:
                break                                          # done, or this piece would overshoot
            mask |= piece
        if mask.sum() >= target:
            break
    return mask


def random_mask(rng: np.random.Generator, n_tokens: int, ratio: float) -> np.ndarray:
    """[n_tokens] bool with ceil(ratio * n) uniformly chosen positions set (at least one)."""
    k = int(np.clip(math.ceil(ratio * n_tokens), 1, n_tokens))
    m = np.zeros(n_tokens, bool)
    m[rng.choice(n_tokens, size=k, replace=False)] = True
    return m


def cosine_ratio(rng: np.random.Generator) -> float:
    """MaskGIT training schedule: ratio = cos(pi/2 * r), r ~ U[0, 1), clipped to [1e-6, 1]."""
    return float(np.clip(math.cos(math.pi / 2 * rng.uniform(0, 1)), 1e-6, 1.0))


def mvtm_masks(rng: np.random.Generator, batch: int, grid: int, cfg: MaskConfig) -> torch.Tensor:
    """MVTM training masks [batch, grid*grid] bool: each sample draws a cosine-schedule ratio; a share
    `brush_share` is painted with brush strokes of about that coverage, the rest is uniformly random."""
    n = grid * grid
    out = np.zeros((batch, n), bool)
    for i in range(batch):
        r = cosine_ratio(rng)
        if rng.uniform() < cfg.brush_share:
            lo = max(r * 0.8, 1.0 / n)
            m = brush_mask(rng, grid, cfg, coverage=(lo, max(lo, min(r * 1.2, 1.0)))).ravel()
        else:
            m = random_mask(rng, n, r)
        out[i] = m if m.any() else random_mask(rng, n, 1.0 / n)
    return torch.from_numpy(out)


def atd_masks(rng: np.random.Generator, batch: int, grid: int, cfg: MaskConfig,
              coverage: tuple[float, float] = (0.02, 0.4)) -> torch.Tensor:
    """ATD corruption masks [batch, grid*grid] bool: brush strokes; a share `clean_share` stays empty."""
    out = np.zeros((batch, grid * grid), bool)
    for i in range(batch):
        if rng.uniform() >= cfg.clean_share:
            out[i] = brush_mask(rng, grid, cfg, coverage).ravel()
    return torch.from_numpy(out)


def corrupt(tokens: torch.Tensor, mask: torch.Tensor, num_codes: int,
            generator: torch.Generator | None = None, code_probs: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """ATD input and target: tokens [B, N] with the masked ones replaced by random codes, uniform over the
    codebook or drawn from code_probs [K]; the target is 1 only where the code actually changed (a random draw
    can hit the original code)."""
    if code_probs is None:
        random_codes = torch.randint(0, num_codes, tokens.shape, generator=generator, device=tokens.device)
    else:
        random_codes = torch.multinomial(code_probs, tokens.numel(), replacement=True,
                                         generator=generator).view(tokens.shape).to(tokens.device)
    corrupted = torch.where(mask, random_codes.to(tokens.dtype), tokens)
    return corrupted, (corrupted != tokens)
