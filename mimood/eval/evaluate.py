"""Run every method on a labelled test set and keep each case's intermediate results for the tables.

`evaluate()` only computes; the tables (`mimood.eval.tables`) are separate functions of the `EvalResult`, so a new
table (e.g. the scan/slice-level OOD table) reads the same per-case results without re-running anything:

    CaseResult.slices          the preprocessed input (images, brain, labels, slice index, geometry), all kept slices
    CaseResult.rows            which of those slices were evaluated (every `slice_stride`-th)
    CaseResult.tokens          [S, N] VQ-VAE tokens of the evaluated slices
    CaseResult.token_scores    method -> [S, N] token scores (mimood: ATD probabilities of the input tokens)
    CaseResult.maps            method -> [S, H, W] anomaly maps
    CaseResult.lesion_slices   [S] bool, slice holds a labelled voxel
    CaseResult.voxel_scores    method -> [V] scores of the case's evaluated brain voxels on the input grid
    CaseResult.voxel_labels    [V] bool, label > 0 at those voxels

Pixel metrics are computed on the input's own grid: each map goes back through `to_volume`; brain = input > 0,
ground truth = label > 0. With `slice_stride` k > 1 only the voxels mapped from the evaluated slices count (and each
skipped slice takes the map of its nearest evaluated slice before `to_volume`, so interpolation between slices does
not pull scores towards zero).
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mimood.config import RestoreConfig, RunConfig
from mimood.data.discover import discover
from mimood.data.io import load_volume
from mimood.data.preprocess import Slices, preprocess, to_volume
from mimood.errors import InputError
from mimood.eval.calibrate import load_calibration
from mimood.eval.methods import available_methods, build_methods, load_models
from mimood.eval.metrics import token_labels
from mimood.models.graphs import EncodeGraph


@dataclass
class CaseResult:
    name: str
    slices: Slices                                  # every kept slice of the case (geometry for to_volume)
    rows: np.ndarray                                # [S] indices into slices.images of the evaluated slices
    tokens: np.ndarray                              # [S, N] int32
    token_scores: dict[str, np.ndarray] = field(default_factory=dict)    # method -> [S, N] float32
    maps: dict[str, np.ndarray] = field(default_factory=dict)            # method -> [S, H, W] float32
    seconds: dict[str, float] = field(default_factory=dict)              # method -> wall time on this case
    voxel_scores: dict[str, np.ndarray] = field(default_factory=dict)    # method -> [V] float32
    voxel_labels: np.ndarray | None = None          # [V] bool
    coverage: dict[str, int] = field(default_factory=dict)   # brain/lesion voxels in total and evaluated

    @property
    def images(self) -> np.ndarray:                 # [S, H, W] evaluated input slices
        return self.slices.images[self.rows]

    @property
    def labels(self) -> np.ndarray:                 # [S, H, W] bool
        return self.slices.labels[self.rows]

    @property
    def lesion_slices(self) -> np.ndarray:          # [S] bool
        return self.labels.any(axis=(1, 2))

    @property
    def token_labels(self) -> np.ndarray:           # [S, N] bool: any pixel of the token is lesion
        return token_labels(self.labels).reshape(len(self.rows), -1)

    @property
    def brain_tokens(self) -> np.ndarray:           # [S, N] bool: any pixel of the token is brain
        return token_labels(self.slices.brain[self.rows]).reshape(len(self.rows), -1)


@dataclass
class EvalResult:
    run: Path
    data: Path
    methods: list[str]
    lams: dict[str, float]                          # token threshold each restoration method used
    thresholds: dict[str, float]                    # calibrated voxel threshold per method
    settings: dict                                  # everything the output should state
    cases: list[CaseResult]
    cache: dict = field(default_factory=dict, repr=False)    # tables' shared computations (pooled metrics)


def method_lams(cal: dict, cfg: RestoreConfig, lam: float | None = None) -> dict[str, float]:
    """Token thresholds: calibration.json's, `lam` overriding MIM-OOD's, the config's lambda_NLL for AR."""
    m = cal.get("methods", {})
    lams = {"mimood": cal["lam"] if lam is None else lam, "ar": m.get("ar", {}).get("lam", cfg.lam_nll)}
    for name in ("mvtm_likelihood", "token_critic", "mimood_paper", "mimood_intensity"):
        if name in m:
            lams[name] = m[name]["lam"]
    return lams


def evaluate(run: str | Path, data: str | Path, cfg: RestoreConfig | None = None, methods=None,
             lam: float | None = None, modality: str = "t2", max_cases: int | None = None, slice_stride: int = 1,
             progress: bool = True) -> EvalResult:
    """Run `methods` on every labelled case under `data` with the run's models and calibration (cases without a
    label are skipped and listed in `settings["skipped_unlabelled"]`)."""
    run, data = Path(run), Path(data)
    methods = available_methods(run) if methods is None else tuple(methods)
    if "token_critic" in methods and "token_critic" not in available_methods(run):
        raise ValueError(f"{run}: token_critic needs a trained critic (mimood-eval -m {run} --train-critic)")
    run_cfg = RunConfig.load(run / "config.json")
    cfg = cfg or run_cfg.restore
    data_cfg = run_cfg.data
    data_cfg.modality = modality
    if slice_stride < 1:
        raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
    cal = load_calibration(run)
    if cal is None:
        raise ValueError(f"{run}: not calibrated (no calibration.json); run mimood-eval --calibrate first")
    missing = [m for m in methods if m in ("mvtm_likelihood", "ar", "token_critic", "mimood_paper", "dae")
               and m not in cal.get("methods", {})]
    if missing:
        raise ValueError(f"{run}/calibration.json has no entry for {', '.join(missing)}; recalibrate")
    lams = method_lams(cal, cfg, lam)
    thresholds = {m: cal["methods"][m]["threshold"] for m in methods if m in cal.get("methods", {})}

    found = discover(data, modality=modality)
    unlabelled = [str(c.image) for c in found if c.label is None]
    cases = [c for c in found if c.label is not None][:max_cases]
    if not cases:
        raise InputError(data, f"no case has a label (expected e.g. {found[0].expected_label})")
    models = load_models(run, methods)
    runners = build_methods(models, methods, cfg, lams)
    encoder = EncodeGraph(models["vqvae"]).eval()
    results = []
    bar = tqdm(cases, desc="evaluate", unit="case", disable=not progress)
    for ci, case in enumerate(bar):
        bar.set_postfix_str(case.name)
        s = preprocess(case.image, data_cfg, label=case.label)
        rows = np.arange(0, len(s.index), slice_stride)
        x = s.images[rows][:, None]                                          # [S, 1, H, W]
        with torch.no_grad():
            tokens = np.concatenate([encoder(torch.from_numpy(x[i:i + cfg.batch])).numpy()
                                     for i in range(0, len(x), cfg.batch)])
        r = CaseResult(case.name, s, rows, tokens)
        for name, method in runners.items():
            rng = np.random.default_rng([cfg.seed, ci])                     # a case's draws do not depend on others
            if hasattr(method, "begin_scan"):                               # its lambda, from the whole scan
                method.begin_scan(s.images)
            maps, scores = [], []
            t0 = time.perf_counter()
            for i in range(0, len(x), cfg.batch):
                out = method(x[i:i + cfg.batch], rng)
                maps.append(out.maps)
                scores.append(out.token_scores)
            r.seconds[name] = time.perf_counter() - t0
            r.maps[name], r.token_scores[name] = np.concatenate(maps), np.concatenate(scores)
        _score_voxels(r, case.label, slice_stride)
        results.append(r)

    settings = {
        "run": str(run), "data": str(data), "modality": modality, "methods": list(methods),
        "cases": len(results), "skipped_unlabelled": unlabelled, "slices": int(sum(len(r.rows) for r in results)),
        "slice_stride": slice_stride,
        "R": cfg.R, "T": cfg.T, "seed": cfg.seed, "batch": cfg.batch, "min_pool": cfg.min_pool,
        "avg_pool": cfg.avg_pool, "lams": {m: lams[m] for m in methods if m in lams},
        "calibration": {"date": cal.get("date"), "R": cal.get("restore", {}).get("R"),
                        "T": cal.get("restore", {}).get("T"), "lam": cal["lam"]},
        "device": "cpu", "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return EvalResult(run, data, list(methods), lams, thresholds, settings, results)


def _score_voxels(r: CaseResult, label_path: Path, stride: int) -> None:
    """Map each method's slice maps to the input grid and keep the evaluated brain voxels' scores and labels."""
    g = r.slices.geometry
    n = len(g.index)
    nearest = np.clip(np.rint(np.arange(n) / stride).astype(int), 0, len(r.rows) - 1)   # [n] row of each slice
    brain = g.brain_mask()                                                   # [X, Y, Z] input > 0
    label = load_volume(label_path, allow_zero=True).get_fdata(dtype=np.float32) > 0
    seen = np.zeros((n, g.size, g.size), np.float32)
    seen[r.rows] = 1.0
    in_view = np.asarray(to_volume(np.ones_like(seen), g, order=0).dataobj) > 0.5   # window x kept slices
    evaluated = brain & (np.asarray(to_volume(seen, g, order=0).dataobj) > 0.5) if stride > 1 else brain
    r.voxel_labels = label[evaluated]
    r.coverage = {"brain": int(brain.sum()), "lesion": int((label & brain).sum()),
                  "brain_in_view": int((brain & in_view).sum()), "lesion_in_view": int((label & brain & in_view).sum()),
                  "brain_evaluated": int(evaluated.sum()), "lesion_evaluated": int(r.voxel_labels.sum())}
    for name, maps in r.maps.items():
        vol = np.asarray(to_volume(maps[nearest], g).dataobj)
        r.voxel_scores[name] = vol[evaluated].astype(np.float32)
