"""The MIM-OOD restoration loop (paper section 3.4), written once over an abstract engine.

    tokens = encode(x)                                   [B, N]
    tokens = R copies of each slice                      [B*R, N]
    repeat T times:
        p = ATD(tokens)                                  [B*R, N]   (recomputed on the current tokens)
            or, with cfg.detector == "intensity", the mean intensity of each token's 8 x 8 input block
            (computed once on the host, fixed over the iterations: the same tokens are re-drawn T times)
        mask = p > lambda                                (stop early when no token is above lambda)
        tokens[mask] ~ MVTM(tokens with mask -> [MASK])  (independent draws at temperature 1)
    map = mean_R  brain * avgpool(minpool(|decode(tokens) - x|))
          (cfg.residual "positive": max(x - decode(tokens), 0); cfg.contralateral k: map - k min(map, mirror))

Every backend (the PyTorch reference `mimood.runtime.torch_backend.TorchEngine`, onnxruntime, TensorRT, torch
with CUDA graphs) implements the small `Engine` interface and runs through `restore()`, so the backends cannot
drift apart.

Rows that need no work: a row whose mask comes back empty never changes again (the detector sees the same
tokens, so its mask stays empty), and padding rows (slices `filled` and after) are thrown away. The loop keeps
the host bool `active` [B*R] of the other rows and hands it to engines that declare `skips_rows = True`
(`detect(tokens, active)`): they may skip the inactive rows and score them 0, which is below every lambda, so
the masks, tokens and maps of the filled rows are those of the full computation. Engines with static shapes
(TensorRT, CUDA graphs, the torch reference) do not declare it and compute every row. Masked tokens are
counted, and the early stop decided, on the filled rows.

This module is numpy only: the engines own their arrays (numpy, torch CPU/CUDA tensors) and the
loop touches them only through the engine's methods and `>`, `.sum()` and `.shape`. The uniform noise of each
step comes from one numpy generator on the host, so two backends given the same seed draw the same samples
(one [B*R, N] float32 copy to the device per step: 200 kB at B*R = 128, negligible next to a transformer pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mimood.config import DETECTORS, GRID, RestoreConfig


def intensity_token_scores(x: np.ndarray) -> np.ndarray:
    """x [B, 1, H, W] -> [B, N] float32: the mean intensity of each token's pixel block (8 x 8 at 160 x 160): the
    intensity baseline on the token grid, and the "intensity" detector. Hyperintense anomalies only (T2, FLAIR)."""
    b, _, h, w = x.shape
    f = h // GRID
    return x.reshape(b, GRID, f, GRID, f).mean(axis=(2, 4)).reshape(b, GRID * GRID).astype(np.float32)


def scan_lambda(images: np.ndarray, cfg: RestoreConfig, lam: float | None = None) -> float:
    """The detector threshold for the slices images [S, H, W] of one scan: lam (default cfg.lam), or with the
    intensity detector and cfg.lam_scan_percentile = q, min(lam, P_q of the scan's brain-token intensity scores)
    (brain tokens: those with a brain pixel, as calibration counts them)."""
    lam = float(cfg.lam if lam is None else lam)
    if cfg.detector != "intensity" or cfg.lam_scan_percentile is None:
        return lam
    x = np.asarray(images, dtype=np.float32)[:, None]                        # [S, 1, H, W]
    brain = intensity_token_scores((x > 0).astype(np.float32)) > 0           # [S, N]
    if not brain.any():
        return lam
    return min(lam, float(np.percentile(intensity_token_scores(x)[brain], cfg.lam_scan_percentile)))


def contralateral(maps: np.ndarray, k: float) -> np.ndarray:
    """maps [B, H, W] -> maps - k * min(maps, their left-right mirror images) (RestoreConfig.contralateral).

    The preprocessing centres each scan's window on its brain's bounding box and lays the patient's left-right
    along the last axis (mimood.data.preprocess), so the mirror column of a pixel is the same place in the other
    hemisphere (the assumption `mimood.ood.mirror` makes and measures). min(m, mirror) is the part of the map both
    sides share: ventricles and CSF that the MVTM restores darker on both sides, a symmetric bias-field band; a
    one-sided lesion facing healthy tissue keeps its value, and with k < 1 a lesion facing another lesion keeps
    (1 - k) of it. A mirror place outside the brain (map 0) damps nothing. Cost: one flip and a min per pixel.
    Measured at k = 0.75 through the runtime (benchmarks/runtime_crossfit.py, benchmarks/results/crossfit.md):
    pooled [DICE] 0.495 -> 0.511, AP 0.414 -> 0.455 on fold A's four unseen BraTS cases (where k was chosen),
    0.399 -> 0.426, AP 0.298 -> 0.355 on fold B's (its test)."""
    m = np.asarray(maps, dtype=np.float32)
    return (m - np.float32(k) * np.minimum(m, m[..., ::-1])).astype(np.float32)


class Engine(Protocol):
    """What a backend provides. Arrays are the engine's own (numpy, torch CPU/CUDA)."""
    name: str
    R: int

    def put(self, a: np.ndarray) -> Any: ...                                 # host -> engine array
    def get(self, a: Any) -> np.ndarray: ...                                 # engine array -> host
    def repeat(self, tokens: Any) -> Any: ...                               # [B,N] -> [B*R,N], slice-major
    def encode(self, x: Any) -> Any: ...                                     # [B,1,H,W] -> [B,N] int32
    def detect(self, tokens: Any) -> Any: ...                                # [B*R,N] -> scores [B*R,N]
    # optional: skips_rows = True, and then detect(tokens, active) with active [B*R] host bool (module docstring)
    def mvtm_step(self, tokens: Any, mask: Any, noise: Any) -> Any: ...      # -> [B*R,N] int32
    def decode_score(self, tokens: Any, x: Any) -> Any: ...                  # -> maps [B,H,W] float32


@dataclass
class Restoration:
    maps: np.ndarray                       # [B, H, W] float32 anomaly maps
    token_scores: np.ndarray               # [B, N] detector scores of the input tokens (first iteration; padding
                                           # slices score 0 with engines that skip rows)
    masked: list[int] = field(default_factory=list)   # masked tokens of the filled slices at each iteration run
    tokens: np.ndarray | None = None       # [B*R, N] final tokens (when keep_tokens)
    input_tokens: np.ndarray | None = None  # [B, N] int32 tokens of the input (the encoding the loop started from)


def restore(engine: Engine, x: np.ndarray, cfg: RestoreConfig, rng: np.random.Generator | None = None,
            lam: float | None = None, keep_tokens: bool = False, early_stop: bool = True,
            filled: int | None = None) -> Restoration:
    """Restore a batch x [B,1,H,W] float32 (values in [0,1], background 0) and return its anomaly maps.

    lam overrides cfg.lam (the detector threshold): a number, or one per slice [B] (`scan_lambda` of each slice's
    scan). rng draws the sampling noise (default: seeded by cfg.seed).
    early_stop=False runs all T iterations even when no token is above lambda (benchmarks time the whole loop).
    filled: slices 0..filled-1 are real, the rest padding whose maps are thrown away (default: all real).
    """
    if cfg.detector not in DETECTORS:
        raise ValueError(f"unknown detector {cfg.detector!r}; expected one of {', '.join(DETECTORS)}")
    rng = np.random.default_rng(cfg.seed) if rng is None else rng
    lam = cfg.lam if lam is None else lam
    if np.ndim(lam):                                                         # per slice [B] -> rows [B*R, 1]
        lam = engine.put(np.repeat(np.asarray(lam, dtype=np.float32), engine.R)[:, None])
    x = np.ascontiguousarray(x, dtype=np.float32)
    xd = engine.put(x)
    fixed = None                                                             # [B*R, N] input-derived scores
    if cfg.detector == "intensity":
        fixed = engine.put(np.repeat(intensity_token_scores(x), engine.R, axis=0))
    encoded = engine.encode(xd)                                              # [B, N]
    tokens = engine.repeat(encoded)                                          # [B*R, N]
    real = (len(x) if filled is None else filled) * engine.R                # filled rows: 0 .. real-1
    skips = getattr(engine, "skips_rows", False)
    active = np.arange(len(x) * engine.R) < real                             # [B*R] host bool
    masked: list[int] = []
    token_scores = None
    for _ in range(cfg.T):
        if fixed is not None:
            scores = fixed
        else:
            scores = engine.detect(tokens, active) if skips else engine.detect(tokens)   # [B*R, N]
        if token_scores is None:
            token_scores = engine.get(scores)[:: engine.R]                  # first replica of each slice
        mask = scores > lam
        if skips:
            active &= engine.get(mask.any(1))                                # settled rows stay settled
        n = int(mask[:real].sum())
        masked.append(n)
        if n == 0 and early_stop:
            break
        u = engine.put(rng.random(tuple(mask.shape), dtype=np.float32))      # [B*R, N] in [0, 1)
        tokens = engine.mvtm_step(tokens, mask, u)
    maps = engine.get(engine.decode_score(tokens, xd))
    if cfg.contralateral:
        maps = contralateral(maps, cfg.contralateral)
    if token_scores is None:                                                 # T == 0
        token_scores = engine.get(fixed if fixed is not None else engine.detect(tokens))[:: engine.R]
    return Restoration(maps, token_scores, masked, engine.get(tokens) if keep_tokens else None,
                       engine.get(encoded))
