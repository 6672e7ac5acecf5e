"""Calibration without labels: thresholds chosen on the run's held-out healthy slices, stored in the run.

`<run>/calibration.json` holds, for MIM-OOD, "lam" (the ATD threshold the loop restores with) and "threshold" (the
anomaly-score level above which a voxel is written as anomalous), so inference can write binary masks with no
labelled data; "methods" holds the same pair for every baseline. How each value was chosen is stored beside it.

    token thresholds  mimood: the configured lambda (the paper's 0.005), or with `lam_percentile` the P-th
                      percentile of the ATD scores of healthy brain tokens (the authors' precedent: percentiles of
                      healthy-holdout token scores); mvtm_likelihood and token_critic: always the
                      `token_percentile`-th percentile of their healthy token scores (no published value); ar: the
                      configured lambda_NLL (the paper's 6).
    voxel thresholds  the `voxel_percentile`-th percentile of each method's anomaly scores over healthy brain pixels
                      (e.g. 99: about 1% of healthy brain voxels flagged; ties, such as the intensity baseline's
                      clipped top 2%, can flag more: the share actually flagged is stored too).
"""
from __future__ import annotations

import datetime
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mimood.config import RestoreConfig, RunConfig
from mimood.data.io import atomic_write
from mimood.data.slices import load_slice_set
from mimood.errors import InputError
from mimood.eval.baselines import MVTMLikelihood, ar_nll
from mimood.eval.methods import available_methods, build_methods, load_models
from mimood.eval.token_critic import CRITIC
from mimood.eval.metrics import token_labels
from mimood.models.graphs import ATDGraph, EncodeGraph

CALIBRATION = "calibration.json"


def load_calibration(run: str | Path) -> dict | None:
    """The run's calibration.json, or None when the run has not been calibrated."""
    path = Path(run) / CALIBRATION
    if not path.exists():
        return None
    try:
        cal = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    if "lam" not in cal or "threshold" not in cal:
        raise InputError(path, "missing 'lam' or 'threshold'")
    return cal


@torch.no_grad()
def healthy_token_scores(models: dict, images: np.ndarray, batch: int, mvtm_stride: int = 2
                         ) -> dict[str, np.ndarray]:
    """Token scores of the input tokens of healthy slices [M,H,W]: {"mimood": ATD probabilities,
    "mvtm_likelihood": MVTM NLLs, "ar": AR NLLs, "token_critic": critic probabilities (the last two when their
    models are loaded)}, each [M, N] float32."""
    encode, atd = EncodeGraph(models["vqvae"]).eval(), ATDGraph(models["atd"]).eval()
    nll = MVTMLikelihood(models["mvtm"], mvtm_stride).eval()
    out = {"mimood": [], "mvtm_likelihood": [], "ar": [], "token_critic": []}
    for i in range(0, len(images), batch):
        tokens = encode(torch.from_numpy(images[i:i + batch, None]))          # [B, N]
        out["mimood"].append(atd(tokens).numpy())
        out["mvtm_likelihood"].append(nll(tokens).numpy())
        if "ar" in models:
            out["ar"].append(ar_nll(models["ar"], tokens).numpy())
        if CRITIC in models:
            out["token_critic"].append(ATDGraph(models[CRITIC]).eval()(tokens).numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def calibrate(run: str | Path, cfg: RestoreConfig | None = None, methods=None, lam_percentile: float | None = None,
              token_percentile: float = 99.0, voxel_percentile: float = 99.0, mvtm_stride: int = 2,
              write: bool = True, progress: bool = True) -> dict:
    """Choose each method's token and voxel thresholds (methods: default every method the run has; MIM-OOD always)
    on `<run>/data/val_slices.npz` (healthy volumes held out from training) and write them to
    `<run>/calibration.json` (when `write`). Returns the calibration dict."""
    run = Path(run)
    cfg = cfg or RunConfig.load(run / "config.json").restore
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

    token_scores = healthy_token_scores(models, images, cfg.batch, mvtm_stride)
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
    lams["ar"], rules["ar"] = cfg.lam_nll, "configured lambda_NLL (RestoreConfig.lam_nll)"

    per_method = {}
    for name, method in build_methods(models, methods, cfg, lams, mvtm_stride).items():
        rng = np.random.default_rng(cfg.seed)
        values = []
        for i in tqdm(range(0, len(images), cfg.batch), desc=f"calibrate {name}", unit="batch", leave=False,
                      disable=not progress):
            out = method(images[i:i + cfg.batch, None], rng)
            values.append(out.maps[brain[i:i + cfg.batch]])
        values = np.concatenate(values)
        threshold = float(np.percentile(values, voxel_percentile))
        entry = {"threshold": threshold, "flagged_share": float(np.mean(values >= threshold)),
                 "threshold_rule": f"P{voxel_percentile:g} of healthy brain-pixel anomaly scores"}
        if method.lam is not None:
            entry = {"lam": float(method.lam), "lam_rule": rules[name], **entry}
            if name in token_scores:
                entry["healthy_token_share_above_lam"] = float(
                    np.mean(token_scores[name][brain_tokens] > method.lam))
        per_method[name] = entry

    cal = {
        "lam": per_method["mimood"]["lam"],
        "threshold": per_method["mimood"]["threshold"],
        "methods": per_method,
        "restore": {k: v for k, v in asdict(cfg).items() if k != "threshold"},
        "mvtm_stride": mvtm_stride,
        "data": {"source": str(run / "data" / "val_slices.npz"), "volumes": val.names, "slices": len(images),
                 "brain_pixels": int(brain.sum()), "brain_tokens": int(brain_tokens.sum())},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if write:
        with atomic_write(run / CALIBRATION) as tmp:
            tmp.write_text(json.dumps(cal, indent=2) + "\n")
    return cal
