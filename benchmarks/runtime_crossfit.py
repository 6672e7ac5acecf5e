"""Issue 13: cross-fit quality of what a user gets from `mimood-infer`: the exported model's map and mask on the input
grid, whole volumes (every slice), through the onnxruntime backend.

    python benchmarks/runtime_crossfit.py --fold EXPORT_A=LESION_A --fold EXPORT_B=LESION_B \
        [--other DIR ...] [--healthy DIR ...] --work W --out benchmarks/results/runtime_crossfit.json

Each `--fold` pairs an export with the BraTS-style folder (<case>_t2 + <case>_seg) of the cases its run never saw
in training or calibration (`benchmarks/crossfit.py` checks the same on runs; here the pairing is the caller's);
the pooled metrics take every brain voxel (input != 0) of every fold's cases, each scored by its own fold's
export. `--other` folders (e.g. `lesion_algseg`) and `--healthy` folders are scored by every export.
Maps are cached in W (`infer_folder --continue`). Per case: the Dice of the mask at each label-free mask rule
(below; only the export's calibrated threshold enters it); per healthy scan: the flagged volume (target <= 5 ml).

Mask rules: `threshold` (what mimood-infer writes: map > threshold, components >= 0.5 ml) and `hysteresis`
(components of map > threshold / 2 that hold a voxel above the threshold), measured to see whether growing the
calibrated mask's seeds recovers the tumour voxels below the threshold.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mimood.data.discover import discover
from mimood.eval.metrics import dice, pixel_metrics
from mimood.runtime.bundle import Bundle
from mimood.runtime.components import CONNECTIVITY, lesion_stats
from mimood.runtime.infer import infer_folder


def hysteresis(vol: np.ndarray, t: float, low: float) -> np.ndarray:
    """Components of vol > low (26-connected) that hold a voxel of vol > t."""
    lab, _ = ndimage.label(vol > low, structure=ndimage.generate_binary_structure(3, CONNECTIVITY))
    hit = np.unique(lab[vol > t])
    return np.isin(lab, hit[hit > 0])


RULES = {"threshold": lambda v, t: v > t, "hysteresis": lambda v, t: hysteresis(v, t, 0.5 * t)}


def scored(folder: Path, export: Path, threshold: float, work: Path) -> dict[str, dict]:
    """Map the folder with the export (cached in work/<export>/<folder>); per scan the mask rules at the export's
    threshold, its in-brain map values and labels."""
    out = work / export.name / folder.name
    infer_folder(folder, out, export, backend="ort", resume=True, progress=False, viewer=False)
    rows = {}
    for c in discover(folder):
        m = nib.load(out / f"{c.name}.nii.gz")
        vol = np.asarray(m.dataobj, np.float32)
        seg = None if c.label is None else np.asarray(nib.load(c.label).dataobj) > 0
        row = {}
        for rule, fn in RULES.items():
            mask, stats = lesion_stats(fn(vol, threshold), m.affine)
            row[rule] = {"flagged_ml": stats.flagged_ml, **({} if seg is None else {"dice": dice(mask, seg)})}
        brain = np.asarray(nib.load(c.image).dataobj) != 0
        rows[c.name] = {"rules": row, "scores": vol[brain], "labels": None if seg is None else seg[brain]}
    return rows


def pooled(rows: list[dict]) -> dict:
    keep = [r for r in rows if r["labels"] is not None]
    pm = pixel_metrics(np.concatenate([r["scores"] for r in keep]), np.concatenate([r["labels"] for r in keep]))
    return {**{k: float(pm[k]) for k in ("dice", "ap", "auroc", "threshold")},
            **{f"mean_case_dice_{rule}": float(np.mean([r["rules"][rule]["dice"] for r in keep])) for rule in RULES}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", action="append", required=True, help="EXPORT=LESION_DIR")
    p.add_argument("--other", action="append", type=Path, default=[])
    p.add_argument("--healthy", action="append", type=Path, default=[])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    folds = [tuple(Path(x) for x in f.split("=", 1)) for f in args.fold]
    result = {"folds": {}, "machine": f"{platform.machine()} CPU, {platform.node()}",
              "date": datetime.date.today().isoformat(), "rules": list(RULES)}
    fold_rows = []
    for export, lesion in folds:
        threshold = Bundle.open(export).manifest.threshold
        f = {"export": str(export), "threshold": threshold, "cases": {}, "other": {}, "healthy": {}}
        rows = scored(lesion, export, threshold, args.work)
        fold_rows += rows.values()
        f["cases"] = {n: r["rules"] for n, r in rows.items()}
        f["pooled"] = pooled(list(rows.values()))
        for other in args.other:
            o = scored(other, export, threshold, args.work)
            f["other"][other.name] = {"pooled": pooled(list(o.values())), "cases": {n: r["rules"] for n, r in o.items()}}
        for healthy in args.healthy:
            f["healthy"].update({n: r["rules"] for n, r in scored(healthy, export, threshold, args.work).items()})
        result["folds"][export.name] = f
        ml = [v["threshold"]["flagged_ml"] for v in f["healthy"].values()]
        print(f"{export.name} on {lesion.name}: " + json.dumps({k: round(v, 3) for k, v in f["pooled"].items()})
              + f"; healthy ml {[round(x, 1) for x in ml]}", flush=True)
        for name, o in f["other"].items():
            print(f"  {name}: " + json.dumps({k: round(v, 3) for k, v in o["pooled"].items()}), flush=True)
    result["pooled"] = pooled(fold_rows)
    print("pooled over the folds: " + json.dumps({k: round(v, 3) for k, v in result["pooled"].items()}))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
