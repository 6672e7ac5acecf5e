"""Token, slice and scan OOD scores of a fitted run (`<run>/ood.safetensors`, written by mimood.train.ood_fit).

Every score is "higher = more anomalous". Per token (all 400 positions; only brain tokens are aggregated):
    vim, residual, mahalanobis       from the MVTM features h (mimood.ood.features)
    mirror                           || h(x) - h(mirrored x) || per token, 5 x 5 token mean (mimood.ood.mirror):
                                     the other hemisphere as the healthy reference; needs the features of the
                                     left-right mirrored slices (h_mirror), and is left out without them
    energy, max_logit, nll           from the logits head(h) (nll uses the observed code)
    vim_nll                          -log p~(z) under the softmax over [logits, alpha * residual] (ViM's
                                     virtual logit appended as a 257th class): nll + softplus(vim), so it
                                     needs both an unexpected code and an unusual feature to be high
Per slice: each token score but `mirror` (self-referenced) is first normalised by the healthy atlas of its
position (mimood.ood.atlas: z-score against healthy tokens at the same axial position bin and grid position), then
aggregated as the top-k mean over the slice's brain tokens (k a share of them, default 2%: the max is noisy, the
mean dilutes small lesions);
`knn` is the distance of the slice's pooled feature (mean h over brain tokens, L2-normalised) to its k-th
nearest healthy training slice (with position_norm: among those within one axial bin of it). The slice scores
of a scan are then smoothed along the axial axis (Gaussian, `axial_sigma` slices of 1 mm; lesions span several
slices, healthy outliers are mostly single slices). Per scan: the top-m mean of the slice scores (m = 3).

A brain token is one with at least `fg_min` (default 1: all) of its 8 x 8 pixels inside the brain; a slice with
no such token uses its tokens with any brain (the preprocessing keeps only slices with >= 2% brain).

The scorer needs only h, the observed tokens and the brain share: `scores_from_features` is free of torch, so
a runtime that computes h with an exported `FeatureGraph` can score without the MVTM checkpoint; `score`
computes h with the run's MVTM in PyTorch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from mimood.config import GRID
from mimood.contract import file_sha256
from mimood.errors import InputError
from mimood.ood.atlas import Atlas, position_bins
from mimood.ood.mirror import mirror_score
from mimood.ood.scores import (KNNStats, MahalanobisStats, ViMStats, energy_score, knn_score,
                               mahalanobis_score, max_logit_score, nll_score, residual_score,
                               stats_from_tensors, vim_score)

OOD_FILE = "ood.safetensors"
NORMALISED = ("vim", "vim_nll", "residual", "mahalanobis", "energy", "max_logit", "nll")   # atlas z-scored
TOKEN_SCORES = NORMALISED + ("mirror",)
SLICE_SCORES = TOKEN_SCORES + ("knn",)


@dataclass
class Aggregation:
    """How token scores become slice and scan scores."""
    fg_min: float = 1.0               # brain token: at least this share of its pixels is brain (edge tokens,
                                      # half background, are noisy: BraTS slice AUROC 0.876 vs 0.857 with 0.5)
    token_topk: float | int = 0.02    # slice = top-k mean over brain tokens (float: share, int: count)
    slice_topm: int = 3               # scan = top-m mean over slices
    position_norm: bool = True        # z-score token scores against the healthy atlas (mimood.ood.atlas)
    axial_sigma: float = 2.0          # Gaussian smoothing of a scan's slice scores along the axial axis, in
                                      # slices (1 mm); 0 = none (benchmarks/results/ood.md, axial smoothing)


def topk_mean(values, k: int | float) -> float:
    """Mean of the k largest values (slice/scan aggregation of token scores).

    k int >= 1: a count, capped at the number of values (a slice with fewer foreground tokens uses them all).
    k float in (0, 1): a share; the count is ceil(k * n), at least 1.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    n = values.size
    if n == 0:
        raise ValueError("topk_mean of an empty array")
    n_nan = int(np.isnan(values).sum())
    if n_nan:
        raise ValueError(f"values contain {n_nan} NaN (of {n})")
    if isinstance(k, (bool, np.bool_)):
        raise ValueError("k must be an int count or a float share, not a bool")
    if isinstance(k, (int, np.integer)):
        if k < 1:
            raise ValueError(f"k as a count must be >= 1, got {k}")
        count = min(int(k), n)
    elif isinstance(k, (float, np.floating)):
        if not 0.0 < k < 1.0:
            raise ValueError(f"k as a share must be in (0, 1), got {k}")
        count = max(1, math.ceil(round(k * n, 9)))   # round: 0.1 * 30 = 3.0000000000000004
    else:
        raise ValueError(f"k must be int or float, got {type(k).__name__}")
    return float(np.partition(values, n - count)[n - count:].mean())


def brain_share(brain: np.ndarray, grid: int = GRID) -> np.ndarray:
    """Share of brain pixels under each token: brain [S, H, W] (bool or image > 0) -> [S, grid*grid] float32.

    An 8 x 8 average pool of the brain mask; training caches it as run/data/tokens.npz's fg_*.
    """
    brain = np.asarray(brain)
    if brain.ndim != 3 or brain.shape[1] % grid or brain.shape[2] % grid:
        raise ValueError(f"brain must be [S, H, W] with H, W multiples of {grid}, got {brain.shape}")
    s, h, w = brain.shape
    blocks = (brain > 0).reshape(s, grid, h // grid, grid, w // grid)
    return blocks.mean(axis=(2, 4), dtype=np.float64).reshape(s, grid * grid).astype(np.float32)


def brain_tokens(fg: np.ndarray, fg_min: float) -> np.ndarray:
    """Brain tokens [S, N] bool from the brain share per token fg [S, N]; a slice with none falls back to its
    tokens with any brain, and a slice with no brain at all is an error (it has nothing to score)."""
    fg = np.asarray(fg, dtype=np.float32)
    mask = fg >= fg_min
    empty = ~mask.any(axis=1)
    mask[empty] = fg[empty] > 0
    if not mask.any(axis=1).all():
        raise ValueError(f"{int((~mask.any(axis=1)).sum())} slices have no brain pixel to score")
    return mask


def slice_aggregate(scores: np.ndarray, mask: np.ndarray, k: float | int) -> np.ndarray:
    """Top-k mean of scores [S, N] over each slice's masked tokens [S, N] -> [S] float64."""
    return np.array([topk_mean(s[m], k) for s, m in zip(scores, mask)])


def scan_aggregate(slice_scores: np.ndarray, m: int) -> float:
    """Top-m mean of a scan's slice scores [S]."""
    return topk_mean(slice_scores, int(m))


def axial_smooth(scores: np.ndarray, index: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ONE scan's slice scores [S] along the axial axis, weighted by the distance between
    the slices' indices [S] (so gaps and slice strides are honoured); sigma in index units, 0 = unchanged."""
    scores = np.asarray(scores, dtype=np.float64)
    if sigma <= 0 or scores.size < 2:
        return scores
    index = np.asarray(index, dtype=np.float64)
    w = np.exp(-0.5 * ((index[:, None] - index[None, :]) / sigma) ** 2)    # [S, S]
    return (w @ scores) / w.sum(axis=1)


def pooled_features(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean feature over each slice's brain tokens: h [S, N, d], mask [S, N] -> [S, d] float64 (KNN input)."""
    w = np.asarray(mask, dtype=np.float64)                                  # [S, N]
    return np.einsum("sn,snd->sd", w, h, dtype=np.float64) / w.sum(axis=1, keepdims=True)


def check_mvtm_hash(path: Path, expected: str) -> None:
    """The OOD statistics belong to one MVTM: refuse a checkpoint that changed since the fit."""
    if file_sha256(path) != expected:
        raise InputError(path, f"this MVTM is not the one {OOD_FILE} was fitted on (re-run the OOD fit)")


@dataclass
class SliceParts:
    """What the scan score needs from each slice, computed per batch of slices (OODScorer.parts)."""
    token: dict[str, np.ndarray]      # name -> [S, N] raw token scores
    pooled: np.ndarray                # [S, d] mean feature over the brain tokens (KNN input)
    fg: np.ndarray                    # [S, N] brain share per token

    def take(self, idx: np.ndarray) -> "SliceParts":
        """The parts of the slices `idx` (indices along the slice axis), in that order."""
        return SliceParts(token={k: v[idx] for k, v in self.token.items()}, pooled=self.pooled[idx], fg=self.fg[idx])

    @staticmethod
    def cat(parts: list["SliceParts"]) -> "SliceParts":
        """Concatenate slice parts along the slice axis (in the given order)."""
        return SliceParts(token={k: np.concatenate([p.token[k] for p in parts]) for k in parts[0].token},
                          pooled=np.concatenate([p.pooled for p in parts]),
                          fg=np.concatenate([p.fg for p in parts]))


@dataclass
class OODResult:
    token: dict[str, np.ndarray]      # name -> [S, N] token scores (atlas z-scores with position_norm)
    slice: dict[str, np.ndarray]      # name -> [S] slice scores (token scores aggregated, plus knn)
    scan: dict[str, float]            # name -> scan score
    brain: np.ndarray                 # [S, N] bool, the tokens that were aggregated


@dataclass
class OODScorer:
    """Fitted statistics and the vocabulary head; see the module docstring."""
    vim: ViMStats
    mahalanobis: MahalanobisStats
    knn: KNNStats
    atlas: dict[str, Atlas]           # NORMALISED token score name -> healthy position atlas
    W: np.ndarray                     # [K, d] float64 vocabulary head
    b: np.ndarray                     # [K] float64
    meta: dict                        # pass_type, aggregation, scan_score, reference, fit details
    mvtm_path: Path | None = None     # checkpoint for `features` (PyTorch path)
    device: str = "cpu"               # where `features` runs the MVTM
    _graph: object = field(default=None, repr=False)

    @property
    def agg(self) -> Aggregation:
        return Aggregation(**self.meta["aggregation"])

    @property
    def scan_score_name(self) -> str:
        """The score reported as "the" scan OOD score (chosen at fit time)."""
        return self.meta["scan_score"]

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", mvtm: str | Path | None = None) -> "OODScorer":
        """Load `<run>/ood.safetensors` (path = the run folder or the file itself); `features` will run the
        MVTM checkpoint `mvtm` (default: <folder of the file>/mvtm/best.safetensors) on `device`."""
        path = Path(path)
        file = path / OOD_FILE if path.is_dir() else path
        if not file.exists():
            raise InputError(file, "no fitted OOD statistics (run the OOD fit first: mimood.train.ood_fit.fit_ood)")
        try:
            from safetensors import safe_open
            with safe_open(str(file), framework="numpy") as f:
                meta = json.loads((f.metadata() or {})["ood"])
            tensors = load_file(str(file))
        except Exception as e:  # safetensors raises several types for foreign files
            raise InputError(file, f"not an OOD statistics file ({e})") from None
        W, b = tensors.pop("head/W"), tensors.pop("head/b")
        atlas = {name: Atlas(mean=tensors.pop(f"atlas/{name}/mean"), std=tensors.pop(f"atlas/{name}/std"))
                 for name in NORMALISED}
        stats = stats_from_tensors(tensors)
        mvtm = Path(mvtm) if mvtm is not None else file.parent / "mvtm" / "best.safetensors"
        return cls(vim=stats["vim"], mahalanobis=stats["mahalanobis"], knn=stats["knn"], atlas=atlas, W=W, b=b,
                   meta=meta,
                   mvtm_path=mvtm if mvtm.exists() else None, device=device)

    # -- features (PyTorch) -----------------------------------------------------------------------------------
    def features(self, tokens: np.ndarray) -> np.ndarray:
        """h [S, N, d] float32 of tokens [S, N] with the run's MVTM and the fitted pass type."""
        if self._graph is None:
            from mimood.models.checkpoint import load_model
            from mimood.ood.features import FeatureGraph
            if self.mvtm_path is None:
                raise InputError("mvtm/best.safetensors", "the MVTM checkpoint is needed to compute features")
            check_mvtm_hash(self.mvtm_path, self.meta["mvtm_sha256"])
            mvtm, _ = load_model(self.mvtm_path, device=self.device)
            self._graph = FeatureGraph(mvtm, self.meta["pass_type"])
        from mimood.ood.features import mvtm_features
        return mvtm_features(self._graph, tokens)

    # -- scores -----------------------------------------------------------------------------------------------
    def token_scores(self, h: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Every raw token score of one pass (NORMALISED: all but `mirror`, no position normalisation):
        h [S, N, d], tokens [S, N] -> {name: [S, N] float64}."""
        h = np.asarray(h)
        tokens = np.asarray(tokens).astype(np.int64)
        if h.ndim != 3 or h.shape[:2] != tokens.shape or h.shape[2] != self.W.shape[1]:
            raise ValueError(f"h {h.shape} must be [S, N, {self.W.shape[1]}] matching tokens {tokens.shape}")
        S, N, d = h.shape
        out = {name: np.empty((S, N)) for name in NORMALISED}
        step = max(1, 16384 // N)                                           # slices per float64 chunk
        for i in range(0, S, step):
            hs = h[i:i + step].reshape(-1, d).astype(np.float64)           # [c, d]
            z = tokens[i:i + step].ravel()
            logits = hs @ self.W.T + self.b                                 # [c, K]
            n = len(hs) // N
            vim = vim_score(hs, logits, self.vim)                            # [c]
            nll = nll_score(logits, z)
            out["vim"][i:i + n] = vim.reshape(n, N)
            out["vim_nll"][i:i + n] = (nll + np.logaddexp(0.0, vim)).reshape(n, N)
            out["residual"][i:i + n] = residual_score(hs, self.vim).reshape(n, N)
            out["mahalanobis"][i:i + n] = mahalanobis_score(hs, z, self.mahalanobis).reshape(n, N)
            out["energy"][i:i + n] = energy_score(logits).reshape(n, N)
            out["max_logit"][i:i + n] = max_logit_score(logits).reshape(n, N)
            out["nll"][i:i + n] = nll.reshape(n, N)
        return out

    def parts(self, h: np.ndarray, tokens: np.ndarray, fg: np.ndarray, fg_min: float | None = None,
              h_mirror: np.ndarray | None = None) -> SliceParts:
        """The per-slice half of the scoring, for slices of any scans (e.g. one fixed-size runtime batch):
        raw token scores and the pooled brain feature of each slice. h [S, N, d], tokens [S, N], fg [S, N];
        fg_min (default: the fitted one) defines the brain tokens (pooled for KNN, averaged by `mirror`);
        h_mirror [S, N, d], the features of the left-right mirrored slices' own tokens, adds `mirror`."""
        mask = brain_tokens(fg, self.agg.fg_min if fg_min is None else fg_min)
        token = self.token_scores(h, tokens)
        if h_mirror is not None:
            token["mirror"] = mirror_score(h, h_mirror, mask)
        return SliceParts(token=token, pooled=pooled_features(h, mask), fg=np.asarray(fg, dtype=np.float32))

    def combine(self, parts: SliceParts, agg: Aggregation | None = None,
                index: np.ndarray | None = None) -> OODResult:
        """The per-scan half: ONE scan's slice parts (in slice order, pooled with agg.fg_min) -> token, slice
        and scan scores. `index` [S] (the slices' positions in the volume, default 0..S-1) places the slices
        in the atlas's axial bins; `agg` overrides the fitted aggregation (evaluation sweeps)."""
        agg = agg or self.agg
        mask = brain_tokens(parts.fg, agg.fg_min)
        token = dict(parts.token)
        index = np.arange(len(mask)) if index is None else np.asarray(index)
        bins = position_bins(index)
        if agg.position_norm:
            token = {name: self.atlas[name].normalise(s, bins) if name in NORMALISED else s
                     for name, s in token.items()}
        slices = {name: slice_aggregate(s, mask, agg.token_topk) for name, s in token.items()}
        slices["knn"] = knn_score(parts.pooled, self.knn, bins=bins if agg.position_norm else None)
        slices = {name: axial_smooth(s, index, agg.axial_sigma) for name, s in slices.items()}
        scan = {name: scan_aggregate(s, agg.slice_topm) for name, s in slices.items()}
        return OODResult(token=token, slice=slices, scan=scan, brain=mask)

    def scores_from_features(self, h: np.ndarray, tokens: np.ndarray, fg: np.ndarray,
                             agg: Aggregation | None = None, index: np.ndarray | None = None,
                             h_mirror: np.ndarray | None = None) -> OODResult:
        """Token, slice and scan scores of ONE scan from its features h [S, N, d], tokens [S, N] and the brain
        share per token fg [S, N] (brain_share of the slices' brain masks), plus `mirror` with the features of
        the mirrored slices h_mirror [S, N, d]: `parts` then `combine`."""
        agg = agg or self.agg
        return self.combine(self.parts(h, tokens, fg, agg.fg_min, h_mirror), agg, index)

    def score(self, tokens: np.ndarray, fg: np.ndarray, mirror_tokens: np.ndarray | None = None) -> OODResult:
        """`scores_from_features` with h (and h_mirror of `mirror_tokens`, the tokens of the mirrored slices)
        computed by the run's MVTM (PyTorch)."""
        h_mirror = None if mirror_tokens is None else self.features(mirror_tokens)
        return self.scores_from_features(self.features(tokens), tokens, fg, h_mirror=h_mirror)

    # -- reporting --------------------------------------------------------------------------------------------
    def report(self, result: OODResult, name: str | None = None) -> dict:
        """The scan score `name` (default: the chosen one) against the healthy validation scans of the fit:
        {"score", "value", "z", "percentile", "reference_scans"}. z is (value - mean) / std of the reference
        scan scores (None with fewer than 2 or zero spread); percentile is the share of reference scans with a
        lower or equal score, in percent."""
        name = name or self.scan_score_name
        if name not in result.scan:
            raise ValueError(f"the scan score {name!r} was not computed"
                             + (" (it needs the features of the mirrored slices)" if name == "mirror" else ""))
        value = float(result.scan[name])
        ref = np.asarray(self.meta["reference"][name], dtype=np.float64)
        std = float(ref.std(ddof=1)) if ref.size >= 2 else 0.0
        z = (value - float(ref.mean())) / std if std > 0 else None
        pct = 100.0 * float((ref <= value).mean()) if ref.size else None
        return {"score": name, "value": value, "z": z, "percentile": pct, "reference_scans": int(ref.size)}

    def summary(self) -> dict:
        """What a manifest should record about the OOD scan score (plain JSON)."""
        m = self.meta
        ref = np.asarray(m["reference"][m["scan_score"]], dtype=np.float64)
        return {"file": OOD_FILE, "scan_score": m["scan_score"], "pass_type": m["pass_type"],
                "aggregation": m["aggregation"], "mvtm_sha256": m["mvtm_sha256"],
                "reference": {"n": int(ref.size), "mean": float(ref.mean()) if ref.size else None,   # None: JSON
                              "std": float(ref.std(ddof=1)) if ref.size >= 2 else None}}           # has no NaN
