"""Calibration without labels: thresholds chosen on the run's held-out healthy slices, stored in the run.

`<run>/calibration.json` holds, for MIM-OOD, "lam" (the ATD threshold the loop restores with) and "threshold" (the
anomaly-score level above which a voxel is written as anomalous), so inference can write binary masks with no
labelled data; "methods" holds the same pair for every baseline. How each value was chosen is stored beside it.

    token thresholds  mimood: by default the `lam_percentile`-th (LAM_PERCENTILE = 90th) percentile of the ATD
                      scores of healthy brain tokens; with lam_percentile=None the configured lambda (the paper's
                      0.005). Why a percentile: the paper's 0.005 assumes the authors' ATD (200k steps, depth 12); a
                      smaller or shorter-trained ATD is less confident and can put every healthy token above it (the
                      cpu preset: 100%), so the loop resamples whole slices and the map becomes noise. The rule is a
                      budget: about 10% of healthy brain tokens are resampled at each iteration (the authors'
                      precedent: percentiles of healthy-holdout token scores). Why 90 and not 99: lambda only
                      decides what the loop resamples; the false-alarm rate of the masks is set by the voxel
                      threshold below. A healthy token that is resampled comes back healthy, a missed lesion token
                      is not healed, so a generous budget costs little: with the cpu preset's ATD, P90 gave pixel
                      [DICE] 0.338 / AUROC 0.774 on the demo test set against 0.135 / 0.522 at P99
                      (benchmarks/results/atd_corruption.md). As a label-free check, the share of synthetic
                      ATD-style corruptions (brush masks of random codes on the same healthy slices) scored above
                      lambda is stored beside it, and for an ATD trained on image-space synthetic lesions
                      (masks.lesion_share > 0) the same for those.
                      mvtm_likelihood and token_critic: always the `token_percentile`-th percentile of their healthy
                      token scores (no published value); ar: the configured lambda_NLL (the paper's 6).
    voxel thresholds  the `voxel_percentile`-th percentile of each method's anomaly scores over healthy brain pixels
                      (e.g. 99: about 1% of healthy brain voxels flagged; ties, such as the intensity baseline's
                      clipped top 2%, can flag more: the share actually flagged is stored too). `slice_stride` k
                      restores only every k-th hold-out slice for these (token percentiles always use all).
"""
from __future__ import annotations

import datetime
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mimood.config import GRID, LAM_PERCENTILE, MaskConfig, RestoreConfig, RunConfig
from mimood.contract import atomic_write
from mimood.data.slices import load_slice_set
from mimood.errors import InputError
from mimood.eval.baselines import MVTMLikelihood, ar_nll
from mimood.eval.methods import available_methods, build_methods, load_models
from mimood.eval.metrics import json_ready, token_labels, token_metrics
from mimood.eval.token_critic import CRITIC
from mimood.models.graphs import ATDGraph, encode_slices
from mimood.models.lesions import lesion_tokens
from mimood.models.masks import atd_masks, corrupt
from mimood.restore import intensity_token_scores
from mimood.thresholds import check_calibration, read_calibration

CALIBRATION = "calibration.json"


def load_calibration(run: str | Path) -> dict | None:
    """The run's calibration.json, or None when the run has not been calibrated; its lambdas and thresholds are
    checked (`mimood.thresholds`: finite, in range, numbers; one-line errors naming the file and key)."""
    return read_calibration(Path(run) / CALIBRATION)


def voxel_threshold(values: np.ndarray, voxel_percentile: float) -> dict:
    """The voxel-threshold rule on healthy brain-pixel map values: {"threshold" (their percentile),
    "flagged_share" (the share at or above it; ties can make it more than 1 - q/100), "threshold_rule"}."""
    threshold = float(np.percentile(values, voxel_percentile))
    return {"threshold": threshold, "flagged_share": float(np.mean(values >= threshold)),
            "threshold_rule": f"P{voxel_percentile:g} of healthy brain-pixel anomaly scores"}


@torch.no_grad()
def healthy_token_scores(models: dict, tokens: np.ndarray, batch: int, mvtm_stride: int = 2
                         ) -> dict[str, np.ndarray]:
    """Token scores of the tokens [M, N] of healthy slices (`encode_slices`): {"mimood": ATD probabilities,
    "mvtm_likelihood": MVTM NLLs, "ar": AR NLLs, "token_critic": critic probabilities (the last two when their
    models are loaded)}, each [M, N] float32."""
    atd = ATDGraph(models["atd"]).eval()
    nll = MVTMLikelihood(models["mvtm"], mvtm_stride).eval()
    out = {"mimood": [], "mvtm_likelihood": [], "ar": [], "token_critic": []}
    for i in range(0, len(tokens), batch):
        t = torch.from_numpy(tokens[i:i + batch])                            # [B, N]
        out["mimood"].append(atd(t).numpy())
        out["mvtm_likelihood"].append(nll(t).numpy())
        if "ar" in models:
            out["ar"].append(ar_nll(models["ar"], t).numpy())
        if CRITIC in models:
            out["token_critic"].append(ATDGraph(models[CRITIC]).eval()(t).numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


@torch.no_grad()
def synthetic_corruption_check(atd, tokens: np.ndarray, brain_tokens: np.ndarray, masks: MaskConfig, lam: float,
                               seed: int = 0) -> dict[str, float]:
    """Corrupt healthy tokens [M, N] as the ATD was trained (brush masks filled with random codes, inside the brain)
    and score them: the share of corrupted brain tokens above lam (recall), of clean brain tokens above lam, and
    the ATD's AP/AUROC on this task. A label-free check that lam still catches what the ATD learned to detect."""
    rng = np.random.default_rng(seed)
    t = torch.from_numpy(tokens.astype(np.int64))                                # [M, N]
    mask = atd_masks(rng, len(t), GRID, masks) & torch.from_numpy(brain_tokens)  # [M, N] bool
    bad, target = corrupt(t, mask, atd.cfg.vocab_size, torch.Generator().manual_seed(seed))
    return _check(atd, bad, target.numpy(), brain_tokens, lam)


@torch.no_grad()
def synthetic_lesion_check(atd, vq, images: np.ndarray, tokens: np.ndarray, brain_tokens: np.ndarray, lam: float,
                           seed: int = 0) -> dict[str, float]:
    """The same check with image-space synthetic lesions (mimood.models.lesions), for ATDs trained on them:
    images [M, H, W] are the healthy slices whose clean codes are tokens [M, N]."""
    bad, target = lesion_tokens(vq, images, tokens.astype(np.int16), np.random.default_rng(seed))
    return _check(atd, torch.from_numpy(bad.astype(np.int64)), target & brain_tokens, brain_tokens, lam)


def _check(atd, bad: torch.Tensor, target: np.ndarray, brain_tokens: np.ndarray, lam: float) -> dict[str, float]:
    scores = torch.cat([ATDGraph(atd).eval()(bad[i:i + 64]) for i in range(0, len(bad), 64)]).numpy()
    metrics = token_metrics(scores, target, mask=brain_tokens)

    def share(sel: np.ndarray) -> float:      # NaN, not a warning, when there is nothing to count
        return float(np.mean(scores[sel] > lam)) if sel.any() else float("nan")

    return {"corrupted_share_above_lam": share(target),
            "clean_share_above_lam": share(brain_tokens & ~target),
            "corrupted_tokens": int(target.sum()), "ap": metrics["ap"], "auroc": metrics["auroc"]}


def calibrate(run: str | Path, cfg: RestoreConfig | None = None, methods=None,
              lam_percentile: float | None = LAM_PERCENTILE,
              token_percentile: float = 99.0, voxel_percentile: float = 99.0, mvtm_stride: int = 2,
              slice_stride: int = 1, write: bool = True, progress: bool = True) -> dict:
    """Choose each method's token and voxel thresholds (methods: default every method the run has; MIM-OOD always)
    on `<run>/data/val_slices.npz` (healthy volumes held out from training) and write them to
    `<run>/calibration.json` (when `write`). lam_percentile=None keeps the configured lambda. Returns the
    calibration dict."""
    run = Path(run)
    run_cfg = RunConfig.load(run / "config.json")
    cfg = cfg or run_cfg.restore
    if slice_stride < 1:
        raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
    for name, q in (("lam_percentile", lam_percentile), ("token_percentile", token_percentile),
                    ("voxel_percentile", voxel_percentile)):
        if q is not None and not 0.0 < q < 100.0:
            raise ValueError(f"{name} must be in (0, 100), got {q}")
    methods = available_methods(run) if methods is None else methods
    methods = ["mimood"] + [m for m in methods if m != "mimood"]     # the exporter reads MIM-OOD's pair
    val = load_slice_set(run / "data" / "val_slices.npz")
    if len(val) == 0:
        raise InputError(run / "data" / "val_slices.npz", "no held-out healthy slices to calibrate on")
    images = val.images.astype(np.float32)                                   # [M, H, W] (cache is float16)
    brain = images > 0
    brain_tokens = token_labels(brain).reshape(len(images), -1)              # [M, N] token has brain pixels
    models = load_models(run, methods)

    tokens = encode_slices(models["vqvae"], images, cfg.batch)                 # [M, N], once for every use below
    token_scores = healthy_token_scores(models, tokens, cfg.batch, mvtm_stride)
    lams, rules = {}, {}
    if lam_percentile is None:
        lams["mimood"], rules["mimood"] = cfg.lam, "configured lambda (RestoreConfig.lam)"
    else:
        lams["mimood"] = float(np.percentile(token_scores["mimood"][brain_tokens], lam_percentile))
        rules["mimood"] = f"P{lam_percentile:g} of ATD scores of healthy brain tokens"
    for name, what in (("mvtm_likelihood", "MVTM NLLs"), ("token_critic", "critic scores")):
        if name in token_scores:
            lams[name] = float(np.percentile(token_scores[name][brain_tokens], token_percentile))
            rules[name] = f"P{token_percentile:g} of {what} of healthy brain tokens"
    if "mimood_intensity" in methods:             # the ATD's rule, on the intensity token score
        q = LAM_PERCENTILE if lam_percentile is None else lam_percentile
        lams["mimood_intensity"] = float(np.percentile(intensity_token_scores(images[:, None])[brain_tokens], q))
        rules["mimood_intensity"] = f"P{q:g} of intensity token scores of healthy brain tokens"
    lams["ar"], rules["ar"] = cfg.lam_nll, "configured lambda_NLL (RestoreConfig.lam_nll)"
    lams["mimood_paper"], rules["mimood_paper"] = cfg.lam, "configured lambda (RestoreConfig.lam; the paper's 0.005)"

    per_method = {}
    rows = np.arange(0, len(images), slice_stride)
    for name, method in build_methods(models, methods, cfg, lams, mvtm_stride).items():
        rng = np.random.default_rng(cfg.seed)
        values = []
        per_scan = cfg.lam_scan_percentile is not None and hasattr(method, "begin_scan")
        for v in (np.unique(val.case) if per_scan else [None]):      # per volume: each its own lambda
            own = rows if v is None else rows[val.case[rows] == v]
            if v is not None:
                method.begin_scan(images[val.case == v])
            for i in tqdm(range(0, len(own), cfg.batch), desc=f"calibrate {name}", unit="batch", leave=False,
                          disable=not progress):
                r = own[i:i + cfg.batch]
                out = method(images[r][:, None], rng)
                values.append(out.maps[brain[r]])
        values = np.concatenate(values)
        entry = voxel_threshold(values, voxel_percentile)
        if method.lam is not None:
            entry = {"lam": float(method.lam), "lam_rule": rules[name], **entry}
            if cfg.residual != "abs":                                  # the map's rule, for the export
                entry["residual"] = cfg.residual
            if cfg.contralateral:
                entry["contralateral"] = float(cfg.contralateral)
            if per_scan and method.cfg.detector == "intensity":
                entry["lam_scan_percentile"] = float(cfg.lam_scan_percentile)
                entry["lam_rule"] += f"; per scan min(lam, P{cfg.lam_scan_percentile:g} of its brain tokens)"
            if name in token_scores:
                entry["healthy_token_share_above_lam"] = float(
                    np.mean(token_scores[name][brain_tokens] > method.lam))
        per_method[name] = entry
    per_method["mimood"]["synthetic_corruptions"] = synthetic_corruption_check(
        models["atd"], tokens, brain_tokens, run_cfg.masks, lams["mimood"], cfg.seed)
    if run_cfg.masks.lesion_share > 0:
        per_method["mimood"]["synthetic_lesions"] = synthetic_lesion_check(
            models["atd"], models["vqvae"], images, tokens, brain_tokens, lams["mimood"], cfg.seed)

    cal = {
        "lam": per_method["mimood"]["lam"],
        "threshold": per_method["mimood"]["threshold"],
        "methods": per_method,
        "restore": {k: v for k, v in asdict(cfg).items() if k != "threshold"},
        "mvtm_stride": mvtm_stride,
        "data": {"source": str(run / "data" / "val_slices.npz"), "volumes": val.names, "slices": len(images),
                 "slice_stride": slice_stride, "restored_slices": len(rows), "brain_pixels": int(brain.sum()),
                 "brain_tokens": int(brain_tokens.sum())},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    check_calibration(cal, run / CALIBRATION)   # before json_ready, which would turn a NaN threshold into null
    cal = json_ready(cal)                       # strict JSON: a NaN check (nothing to count) becomes null
    if write:
        with atomic_write(run / CALIBRATION) as tmp:
            tmp.write_text(json.dumps(cal, indent=2) + "\n")
    return cal


def export_threshold(export: str | Path, slices: str | Path, cfg: RestoreConfig | None = None,
                     voxel_percentile: float = 99.0, slice_stride: int = 4, backend: str = "ort", seed: int = 0,
                     progress: bool = True) -> dict:
    """The voxel threshold of an export's own maps on held-out healthy slices, for an export whose training
    weights are not at hand (the bundled model ships graphs only): after a change of a map-side setting such as
    RestoreConfig.contralateral, the threshold must be chosen again on the maps the export now writes.

    slices: a slice set (`<run>/data/val_slices.npz` of the run the export came from, rebuilt by the same data
    stage when the run is gone); cfg: the restoration settings (default the manifest's). Each held-out volume is
    restored through the runtime (the backend given) with its own per-scan lambda (from all its slices), every
    `slice_stride`-th of its slices; threshold = the `voxel_percentile`-th percentile of the maps over brain pixels,
    the rule `calibrate` applies to a run. Returns {"threshold", "flagged_share", "threshold_rule", "volumes",
    "restored_slices", "brain_pixels"}."""
    from mimood.runtime.batching import infer_slices
    from mimood.runtime.infer import load_engine

    engine = load_engine(export, backend)
    cfg = engine.bundle.restore_config() if cfg is None else cfg
    val = load_slice_set(slices)
    if len(val) == 0:
        raise InputError(slices, "no held-out healthy slices to calibrate on")
    values, restored = [], 0
    for v in tqdm(np.unique(val.case), desc="threshold", unit="volume", disable=not progress):
        images = val.images[val.case == v].astype(np.float32)                  # [S, H, W]
        rows = images[::slice_stride]
        values.append(infer_slices(engine, rows, cfg, seed, scan=images)[rows > 0])
        restored += len(rows)
    values = np.concatenate(values)
    return {**voxel_threshold(values, voxel_percentile),
            "volumes": [val.names[int(v)] for v in np.unique(val.case)], "restored_slices": restored,
            "brain_pixels": int(values.size)}
