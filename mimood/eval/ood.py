"""The slice/scan-level OOD table (issue #7): each score's AUROC, AUPR and FPR at 95% TPR for healthy versus
lesion slices and scans, next to the ATD-based and anomaly-map-based scores, plus token-level AP/AUROC.

    table = evaluate_ood(cases, scorer)
    table["scan"]["vim"] == {"auroc": ..., "aupr": ..., "fpr95": ...}      (JSON keys scan.<score>.<metric>)
    table["slice"][...], table["token"][...] == {"ap": ..., "auroc": ...}, table["counts"]

    table, text = eval_tables(run, data)     # all of it for a run with fitted OOD statistics and a labelled folder
    table = evaluate_folds([(scorer_a, cases_b), (scorer_b, cases_a)])   # cross-fitting: each case scored by
                                             # the run that never saw it, metrics over the pooled slices

Labels: a slice is a lesion slice when at least `min_lesion_px` of its pixels are labelled, healthy when none
is, and left out when in between; a scan is a lesion scan when any slice is labelled. Token labels: a brain
token is a lesion token when any of its pixels is (mimood.eval.metrics.token_labels, rule "any"); only brain
tokens (the ones the slice scores aggregate) are ranked. With one class missing (e.g. BraTS has no healthy
scan) a metric is NaN.

Comparison rows (named by the caller, e.g. "atd", "map") use the scorer's aggregation too (top-k, axial
smoothing, top-m), so all rows differ only in the token or pixel score:
    token_scores[name]  e.g. ATD probabilities of the input tokens [S, N]: top-k mean over brain tokens, top-m
                        over slices, and a token-level row;
    maps[name]          e.g. restoration anomaly maps [S, H, W]: top-k mean over brain pixels (k the same share
                        of them), top-m over slices.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mimood.eval.metrics import detection_metrics, json_ready, token_labels, token_metrics
from mimood.ood.mirror import mirror_slices
from mimood.ood.scan import (Aggregation, OODScorer, SliceParts, axial_smooth, brain_share, scan_aggregate,
                             slice_aggregate, topk_mean)


@dataclass
class EvalCase:
    """One scan's slices, as the evaluation sees them (arrays in slice order)."""
    name: str
    tokens: np.ndarray                    # [S, N] int, VQ codes of the input slices
    fg: np.ndarray                        # [S, N] brain share per token (mimood.ood.scan.brain_share)
    labels: np.ndarray | None = None      # [S, H, W] bool lesion mask; None = healthy scan
    token_scores: dict[str, np.ndarray] = field(default_factory=dict)   # name -> [S, N], e.g. ATD probs
    maps: dict[str, np.ndarray] = field(default_factory=dict)           # name -> [S, H, W] anomaly maps
    brain: np.ndarray | None = None       # [S, H, W] bool brain mask (needed with maps)
    h: np.ndarray | None = None           # [S, N, d] MVTM features (computed with the scorer when None)
    parts: SliceParts | None = None       # the scorer's per-slice parts (OODScorer.parts), for repeated evaluations
    index: np.ndarray | None = None       # [S] slice positions in the volume (atlas bins); None = 0..S-1
    mirror_tokens: np.ndarray | None = None  # [S, N] VQ codes of the left-right mirrored slices (`mirror` score)
    h_mirror: np.ndarray | None = None    # [S, N, d] their MVTM features (computed when None)


def _map_slice_scores(maps: np.ndarray, brain: np.ndarray, k: float | int) -> np.ndarray:
    """Top-k mean of each slice's map over its brain pixels (k as a share of them, or a count)."""
    return np.array([topk_mean(m[b], k) if b.any() else 0.0 for m, b in zip(maps, brain)])


def case_parts(case: EvalCase, scorer: OODScorer, fg_min: float | None = None) -> SliceParts:
    """The scorer's per-slice parts of one case (OODScorer.parts), with the MVTM features of its tokens and of its
    mirror tokens computed unless the case holds them; compute once, then evaluate many aggregations."""
    h = scorer.features(case.tokens) if case.h is None else case.h
    h_mirror = case.h_mirror
    if h_mirror is None and case.mirror_tokens is not None:
        h_mirror = scorer.features(case.mirror_tokens)
    return scorer.parts(h, case.tokens, case.fg, fg_min, h_mirror)


def evaluate_folds(folds: list[tuple[OODScorer, list[EvalCase]]], agg: Aggregation | None = None,
                   min_lesion_px: int = 1) -> dict:
    """The OOD table over the cases of every fold, each case scored by its fold's scorer (cross-fitting: the
    run trained without those cases), metrics over the pooled slices and scans."""
    return evaluate_ood([c for _, cases in folds for c in cases],
                        [scorer for scorer, cases in folds for _ in cases], agg, min_lesion_px)


def evaluate_ood(cases: list[EvalCase], scorer: OODScorer | list[OODScorer], agg: Aggregation | None = None,
                 min_lesion_px: int = 1) -> dict:
    """The OOD table over `cases` (see the module docstring), scored by `scorer` (or by scorer[i] for case i).
    `agg` overrides the scorers' aggregation."""
    if not cases:
        raise ValueError("no cases to evaluate")
    scorers = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer] * len(cases)
    if len(scorers) != len(cases):
        raise ValueError(f"{len(scorers)} scorers for {len(cases)} cases")
    agg = agg or scorers[0].agg
    slice_s: dict[str, list] = {}
    scan_s: dict[str, list] = {}
    token_s: dict[str, list] = {}
    slice_y, scan_y, token_y = [], [], []
    for case, scorer in zip(cases, scorers):
        S = len(case.tokens)
        index = np.arange(S) if case.index is None else np.asarray(case.index)
        parts = case.parts if case.parts is not None else case_parts(case, scorer, agg.fg_min)
        res = scorer.combine(parts, agg, index)
        token, slices, mask = dict(res.token), dict(res.slice), res.brain    # mask [S, N] brain tokens
        clash = (set(case.token_scores) | set(case.maps)) & set(slices)
        if clash or set(case.token_scores) & set(case.maps):
            raise ValueError(f"{case.name}: comparison names must differ from each other and from "
                             f"{sorted(slices)}")
        for name, s in case.token_scores.items():
            token[name] = np.asarray(s, dtype=np.float64)
            slices[name] = axial_smooth(slice_aggregate(token[name], mask, agg.token_topk), index, agg.axial_sigma)
        if case.maps and case.brain is None:
            raise ValueError(f"{case.name}: anomaly maps need the brain mask")
        for name, m in case.maps.items():
            slices[name] = axial_smooth(_map_slice_scores(np.asarray(m), np.asarray(case.brain, bool), agg.token_topk),
                                        index, agg.axial_sigma)
        labels = np.zeros((S, 1, 1), bool) if case.labels is None else np.asarray(case.labels, bool)
        px = labels.reshape(S, -1).sum(axis=1)                               # [S] lesion pixels per slice
        keep = (px == 0) | (px >= min_lesion_px)
        slice_y.append(px[keep] > 0)
        scan_y.append(np.array([px.sum() > 0]))
        tok_y = token_labels(labels).reshape(S, -1) if case.labels is not None else np.zeros(mask.shape, bool)
        token_y.append(tok_y[mask])
        for name, s in slices.items():
            slice_s.setdefault(name, []).append(s[keep])
            scan_s.setdefault(name, []).append(np.array([scan_aggregate(s, agg.slice_topm)]))
        for name, s in token.items():
            token_s.setdefault(name, []).append(s[mask])
    for table in (slice_s, scan_s, token_s):
        missing = [n for n, v in table.items() if len(v) != len(cases)]
        if missing:
            raise ValueError(f"scores {missing} are given for some cases only")
    slice_y, scan_y, token_y = np.concatenate(slice_y), np.concatenate(scan_y), np.concatenate(token_y)
    return {
        "slice": {n: detection_metrics(np.concatenate(v), slice_y) for n, v in slice_s.items()},
        "scan": {n: detection_metrics(np.concatenate(v), scan_y) for n, v in scan_s.items()},
        "token": {n: token_metrics(np.concatenate(v), token_y) for n, v in token_s.items()},
        "counts": {"scans": len(cases), "lesion_scans": int(scan_y.sum()), "slices": int(slice_y.size),
                   "lesion_slices": int(slice_y.sum()), "brain_tokens": int(token_y.size),
                   "lesion_tokens": int(token_y.sum()), "min_lesion_px": int(min_lesion_px)},
        "aggregation": {"fg_min": agg.fg_min, "token_topk": agg.token_topk, "slice_topm": agg.slice_topm,
                        "position_norm": agg.position_norm, "axial_sigma": agg.axial_sigma},
    }


def format_table(table: dict, title: str = "") -> str:
    """A plain-text table of one evaluate_ood result (slice, scan and token columns per score)."""
    names = list(table["slice"])
    lines = [title] if title else []
    lines.append(f"{'score':<12} {'slice AUROC':>11} {'AUPR':>6} {'FPR95':>6}   {'scan AUROC':>10} {'AUPR':>6} "
                 f"{'FPR95':>6}   {'token AP':>8} {'AUROC':>6}")

    def f(x):
        return "   nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"
    for n in names:
        s, c, t = table["slice"][n], table["scan"][n], table["token"].get(n, {})
        lines.append(f"{n:<12} {f(s['auroc']):>11} {f(s['aupr'])} {f(s['fpr95'])}   {f(c['auroc']):>10} "
                     f"{f(c['aupr'])} {f(c['fpr95'])}   {f(t.get('ap')):>8} {f(t.get('auroc'))}")
    return "\n".join(lines)


def load_cases(run: str | Path, data: str | Path, modality: str = "t2", max_cases: int | None = None,
               slice_stride: int = 1, comparisons: bool = True, progress: bool = True) -> list[EvalCase]:
    """The labelled cases under `data` as EvalCases, tokenised by the run's best VQ-VAE (PyTorch), with the
    tokens of their left-right mirror images (the `mirror` score); with
    `comparisons`, also the ATD's probabilities of the input tokens ("atd") and the restoration anomaly maps
    ("map", with the run's calibrated lambda when calibrated). Every `slice_stride`-th slice of each volume
    (restoration is the cost); cases without a label volume are skipped (a healthy scan needs an all-zero
    label volume)."""
    import torch

    from mimood.config import RunConfig
    from mimood.data.discover import discover
    from mimood.data.preprocess import preprocess
    from mimood.eval.calibrate import load_calibration
    from mimood.models.checkpoint import load_model
    from mimood.models.graphs import encode_slices
    from mimood.restore import restore
    from mimood.runtime.torch_backend import TorchEngine

    run = Path(run)
    cfg = RunConfig.load(run / "config.json")
    cal = load_calibration(run)
    lam = cal["lam"] if cal is not None else cfg.restore.lam
    engine = TorchEngine.from_run(run) if comparisons else None
    vqvae = load_model(run / "vqvae" / "best.safetensors")[0].eval()
    cases = [c for c in discover(data, modality=modality) if c.label is not None][:max_cases]
    out = []
    for case in cases:
        t0 = time.time()
        s = preprocess(case.image, cfg.data, label=case.label)
        rows = np.arange(0, len(s.images), slice_stride)
        x = s.images[rows, None].astype(np.float32)                              # [S, 1, H, W]
        tokens = encode_slices(vqvae, x[:, 0], 64)                               # [S, N] int32
        c = EvalCase(name=case.name, tokens=tokens, fg=brain_share(s.brain[rows]), labels=s.labels[rows],
                     brain=s.brain[rows], index=s.index[rows],
                     mirror_tokens=encode_slices(vqvae, mirror_slices(x[:, 0]), 64))
        if comparisons:
            with torch.no_grad():
                c.token_scores["atd"] = np.concatenate([engine.get(engine.detect(engine.put(tokens[j:j + 256])))
                                                        for j in range(0, len(x), 256)]).astype(np.float32)
            b = cfg.restore.batch
            c.maps["map"] = np.concatenate([restore(engine, x[j:j + b], cfg.restore, lam=lam).maps
                                            for j in range(0, len(x), b)])
        out.append(c)
        if progress:
            print(f"  {case.name}: {len(x)} slices, {int(c.labels.any(axis=(1, 2)).sum())} with lesion, "
                  f"{time.time() - t0:.0f} s", flush=True)
    if not out:
        from mimood.errors import InputError
        raise InputError(data, "no case with a label volume (a healthy scan needs an all-zero label)")
    return out


def eval_tables(run: str | Path, data: str | Path, modality: str = "t2", max_cases: int | None = None,
                slice_stride: int = 1, progress: bool = True) -> tuple[dict, str]:
    """The OOD table of the run's fitted statistics (<run>/ood.safetensors) on the labelled cases under `data`.

    Returns (JSON-ready dict, printable table). The dict: {"scan"|"slice": {score: {auroc, aupr, fpr95}},
    "token": {score: {ap, auroc}}, "counts", "aggregation", "scan_score"}, NaN (one class missing) as None.
    Rows: every OOD score, the ATD-based ("atd") and the anomaly-map-based ("map") scores with the same
    aggregation (the ATD and the restoration run in PyTorch on every `slice_stride`-th slice: the cost).
    """
    scorer = OODScorer.load(run)
    cases = load_cases(run, data, modality, max_cases, slice_stride, progress=progress)
    table = evaluate_ood(cases, scorer)
    table["scan_score"] = scorer.scan_score_name
    title = (f"OOD scores of {run} on {data} (chosen scan score: {scorer.scan_score_name}); "
             + ", ".join(f"{k} {v}" for k, v in table["counts"].items()))
    return json_ready(table), format_table(table, title)
