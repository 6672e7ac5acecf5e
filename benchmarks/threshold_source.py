"""Issue 13: does the voxel threshold's healthy hold-out decide the masks' Dice? A label-free variant of the
calibration rule, measured on the cross-fit cache of `benchmarks/crossfit.py`.

The shipped rule: P99 of the anomaly scores of the healthy brain pixels of the run's hold-out volumes
(`mimood.eval.calibrate`; for the bundle recipe 8 synthetic volumes + 1 BraTS case's healthy slices). The variant:
the same percentile over the hold-out volumes of one source only (`--source brats`: the real scan's healthy
slices; `--source synth`). Neither looks at a label. Per fold the run's own hold-out is used, so every case is
still scored by a model and threshold that never saw it.

    python benchmarks/threshold_source.py --fold RUN_A=CACHE_A --fold RUN_B=CACHE_B --methods mimood,mimood_intensity \
        --out benchmarks/results/threshold_source.json

CACHE is crossfit.py's `<work>/<run name>/<tag>` folder (per case: labels.npz and <method>.npz).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mimood.config import RunConfig
from mimood.data.slices import load_slice_set
from mimood.eval.calibrate import load_calibration
from mimood.eval.methods import build_methods, load_models

SOURCES = {"brats": lambda name: name.startswith("brats"), "synth": lambda name: name.startswith("synth")}


def holdout_threshold(run: Path, method: str, source: str, q: float = 99.0) -> tuple[float, int]:
    """P`q` of `method`'s maps over the brain pixels of the run's hold-out slices from `source` (all of them)."""
    val = load_slice_set(run / "data" / "val_slices.npz")
    keep = np.array([SOURCES[source](val.names[c]) for c in val.case])
    images = val.images[keep].astype(np.float32)                             # [M, H, W]
    cal = load_calibration(run)
    cfg = RunConfig.load(run / "config.json").restore
    lams = {m: e["lam"] for m, e in cal["methods"].items() if "lam" in e}
    method_fn = build_methods(load_models(run, [method]), [method], cfg, lams)[method]
    rng, values = np.random.default_rng(cfg.seed), []
    for i in range(0, len(images), cfg.batch):
        x = images[i:i + cfg.batch]
        values.append(method_fn(x[:, None], rng).maps[x > 0])
    return float(np.percentile(np.concatenate(values), q)), int(len(images))


def case_dice(scores: np.ndarray, labels: np.ndarray, thr: float) -> float:
    pred = scores >= thr
    denom = pred.sum() + labels.sum()
    return float(2 * (pred & labels).sum() / denom) if denom else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", action="append", required=True, help="RUN=CACHE")
    p.add_argument("--methods", default="mimood,mimood_intensity")
    p.add_argument("--source", action="append", default=None, choices=sorted(SOURCES))
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    sources = a.source or ["brats"]
    out: dict = {"rule": "P99 of healthy hold-out brain-pixel scores, hold-out volumes of one source", "folds": {}}
    for fold in a.fold:
        run, cache = (Path(s) for s in fold.split("=", 1))
        cal = load_calibration(run)
        f = out["folds"][run.name] = {}
        for m in a.methods.split(","):
            thresholds = {"all (shipped)": cal["methods"][m]["threshold"]}
            for s in sources:
                thresholds[s], n = holdout_threshold(run, m, s)
                print(f"{run.name} {m}: P99 over the {n} {s} hold-out slices = {thresholds[s]:.4f} "
                      f"(shipped, all sources: {thresholds['all (shipped)']:.4f})", flush=True)
            cases = {}
            for d in sorted(cache.iterdir()):
                if (d / f"{m}.npz").exists():
                    lab, sc = np.load(d / "labels.npz")["voxels"], np.load(d / f"{m}.npz")["voxels"]
                    cases[d.name] = {k: case_dice(sc, lab, t) for k, t in thresholds.items()}
            f[m] = {"thresholds": thresholds, "case_dice": cases,
                    "mean_case_dice": {k: float(np.mean([c[k] for c in cases.values()])) for k in thresholds}}
            print("  mean case Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in f[m]["mean_case_dice"].items()))
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
