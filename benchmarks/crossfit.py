"""Issue 13: detection quality on the eight expert-labelled BraTS cases without a leak (cross-fit).

Each fold's run was trained (every stage, and the baselines: `mimood-train dae`, `mimood-train atd_paper`) on healthy
material that includes no slice of the fold's test cases; it is calibrated label-free on its own held-out healthy
volumes (`mimood.eval.calibrate`), then scores only its test cases. Metrics pool every evaluated brain voxel of
all eight cases (each scored by the run that never saw it):

    python benchmarks/crossfit.py --fold RUN_A=DATA_A --fold RUN_B=DATA_B --work W --out J.json \
        [--methods mimood,mimood_paper,dae,intensity,mvtm_likelihood] [--slice-stride 2] [--tag NAME]

Per (fold, case, method) the voxel scores and labels are cached in W (evaluated once; a later call with more
methods evaluates only those), so the pooled table, the per-case Dice at the calibrated threshold and the
token-level table are recomputed from the cache. `--tag` names a variant (e.g. another lambda) evaluated with
`--lam-percentile` or `--set key=value` (RestoreConfig fields) and stored under that name.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mimood.config import RunConfig
from mimood.data.discover import discover
from mimood.eval.calibrate import calibrate, load_calibration
from mimood.eval.crossfit import check_no_leak
from mimood.eval.evaluate import evaluate
from mimood.eval.metrics import dice, json_ready, pixel_metrics, token_metrics
from mimood.eval.tables import PAPER_NAMES

PIXEL_KEYS = ("dice", "ap", "auroc")
CAL_STRIDE = 4      # voxel thresholds from every 4th healthy hold-out slice (about 280 slices, 2M brain pixels)


def variant_calibration(run: Path, methods: list[str], work: Path, cfg_overrides: dict,
                        lam_percentile: float | None) -> dict:
    """A variant's own label-free calibration (lambda and voxel thresholds with its settings), kept in the work
    folder: the run's calibration.json stays the shipped settings'."""
    path = work / "calibration.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = replace(RunConfig.load(run / "config.json").restore, **cfg_overrides)
    kw = {} if lam_percentile is None else {"lam_percentile": lam_percentile}
    cal = calibrate(run, cfg, methods=methods, write=False, slice_stride=CAL_STRIDE, progress=False, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal, indent=1))
    return cal


def ensure_calibrated(run: Path, methods: list[str]) -> dict:
    """The run's own calibration.json with every method in it (the shipped settings)."""
    cal = load_calibration(run)
    have = set(cal.get("methods", {})) if cal else set()
    need = [m for m in methods if m not in have]
    if cal is None or need:
        t0 = time.perf_counter()
        cal = calibrate(run, methods=sorted(have | set(methods)), slice_stride=CAL_STRIDE, progress=False)
        print(f"calibrated {run} ({', '.join(sorted(cal['methods']))}) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return cal


def evaluate_fold(run: Path, data: Path, methods: list[str], work: Path, stride: int, tag: str,
                  cfg_overrides: dict, lam: float | None = None) -> None:
    """Evaluate the methods not cached yet; cache voxel scores/labels and token scores/labels per case."""
    check_no_leak(run, [c.name for c in discover(data)])    # refuses a fold whose run saw one of its cases
    todo = [m for m in methods if not any((work / tag).glob(f"*/{m}.npz"))]
    if not todo:
        return
    cfg = replace(RunConfig.load(run / "config.json").restore, **cfg_overrides)
    t0 = time.perf_counter()
    res = evaluate(run, data, cfg, todo, lam=lam, slice_stride=stride, progress=False)
    for c in res.cases:
        d = work / tag / c.name
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "labels.npz", voxels=c.voxel_labels, tokens=c.token_labels, brain_tokens=c.brain_tokens,
                 lesion_slices=c.lesion_slices)
        for m in todo:
            np.savez(d / f"{m}.npz", voxels=c.voxel_scores[m].astype(np.float32), tokens=c.token_scores[m],
                     seconds=c.seconds[m], slices=len(c.rows))
    print(f"evaluated {', '.join(todo)} of {run} on {data}: {len(res.cases)} cases, "
          f"{res.settings['slices']} slices, {time.perf_counter() - t0:.0f} s", flush=True)


def pooled(folds: list[tuple[Path, Path, Path]], methods: list[str], tag: str) -> dict:
    """Pooled pixel and token metrics, per-case Dice at each fold's calibrated threshold and at the pooled-best one."""
    out = {}
    for m in methods:
        scores, labels, tok_s, tok_l, cases = [], [], [], [], []
        for run, _, work in folds:
            own = work / tag / "calibration.json"
            cal = json.loads(own.read_text()) if own.exists() else load_calibration(run)
            thr = cal["methods"].get(m, {}).get("threshold")
            for d in sorted((work / tag).iterdir()):
                if not (d / f"{m}.npz").exists():
                    continue
                lab, sc = np.load(d / "labels.npz"), np.load(d / f"{m}.npz")
                scores.append(sc["voxels"])
                labels.append(lab["voxels"])
                bt = lab["brain_tokens"]
                tok_s.append(sc["tokens"][bt])
                tok_l.append(lab["tokens"][bt])
                cases.append((d.name, sc["voxels"], lab["voxels"], thr, float(sc["seconds"]), int(sc["slices"])))
        if not scores:
            continue
        px = pixel_metrics(np.concatenate(scores), np.concatenate(labels))
        tk = token_metrics(np.concatenate(tok_s), np.concatenate(tok_l))
        per_case = {name: {"dice_calibrated": dice(s >= t, l) if t is not None else None,
                           "dice_best": dice(s >= px["threshold"], l), "lesion_voxels": int(l.sum()),
                           "flagged_share_calibrated": float(np.mean(s >= t)) if t is not None else None}
                    for name, s, l, t, _, _ in cases}
        cal_d = [v["dice_calibrated"] for v in per_case.values() if v["dice_calibrated"] is not None]
        out[m] = {**{k: px[k] for k in PIXEL_KEYS}, "best_threshold": px["threshold"],
                  "token_ap": tk["ap"], "token_auroc": tk["auroc"],
                  "case_dice_calibrated_mean": float(np.mean(cal_d)) if cal_d else None,
                  "case_dice_best_mean": float(np.mean([v["dice_best"] for v in per_case.values()])),
                  "seconds_per_32_slices": 32 * sum(c[4] for c in cases) / max(1, sum(c[5] for c in cases)),
                  "voxels": int(sum(len(s) for s in scores)), "lesion_voxels": int(sum(l.sum() for l in labels)),
                  "cases": per_case}
    return out


def markdown(table: dict, title: str) -> str:
    lines = [f"### {title}", "", "| method | [DICE] | AP | AUROC | token AP | token AUROC | mean case Dice @cal | "
             "mean case Dice @best | s / 32 slices |", "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"   # noqa: E731
    for m, r in table.items():
        lines.append(f"| {PAPER_NAMES.get(m, m)} | {f(r['dice'])} | {f(r['ap'])} | {f(r['auroc'])} | "
                     f"{f(r['token_ap'])} | {f(r['token_auroc'])} | {f(r['case_dice_calibrated_mean'])} | "
                     f"{f(r['case_dice_best_mean'])} | {r['seconds_per_32_slices']:.1f} |")
    names = sorted(next(iter(table.values()))["cases"])
    lines += ["", "Per case Dice at the calibrated threshold:", "",
              "| case | lesion voxels | " + " | ".join(PAPER_NAMES.get(m, m) for m in table) + " |",
              "|---|---|" + "---|" * len(table)]
    for n in names:
        first = next(r["cases"][n] for r in table.values() if n in r["cases"])
        lines.append(f"| {n} | {first['lesion_voxels']} | " + " | ".join(
            f(r["cases"].get(n, {}).get("dice_calibrated")) for r in table.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", action="append", required=True, help="RUN=DATA: a run and the labelled cases it never saw")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default="mimood,mimood_paper,dae,intensity")
    p.add_argument("--slice-stride", type=int, default=2)
    p.add_argument("--tag", default="default", help="name of this variant (cache folder and JSON key)")
    p.add_argument("--lam-percentile", type=float, default=None,
                   help="variant: MIM-OOD's lambda at this percentile of the fold's healthy ATD token scores")
    p.add_argument("--set", action="append", default=[], help="variant: RestoreConfig field=value")
    args = p.parse_args()
    methods = args.methods.split(",")
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = type(getattr(RunConfig().restore, k))(v) if getattr(RunConfig().restore, k) is not None \
            else float(v)
    folds = []
    for spec in args.fold:
        run, data = (Path(x) for x in spec.split("=", 1))
        work = args.work / run.name                  # per run: folds can be evaluated in parallel processes
        lam = None
        if overrides or args.lam_percentile is not None:
            lam = variant_calibration(run, methods, work / args.tag, overrides, args.lam_percentile)["lam"]
        else:
            ensure_calibrated(run, methods)
        evaluate_fold(run, data, methods, work, args.slice_stride, args.tag, overrides, lam)
        folds.append((run, data, work))
    table = pooled(folds, methods, args.tag)
    text = markdown(table, f"{args.tag}: pooled over {len(folds)} folds, every {args.slice_stride}-th slice")
    print(text, flush=True)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result[args.tag] = {"table": table, "folds": [{"run": str(r), "data": str(d)} for r, d, _ in folds],
                        "slice_stride": args.slice_stride, "overrides": overrides,
                        "lam_percentile": args.lam_percentile, "machine": "2-core CPU " + platform.machine(),
                        "torch_threads": torch.get_num_threads(),
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_ready(result), indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n\n".join(
        markdown(v["table"], f"{k}: pooled over {len(v['folds'])} folds, every {v['slice_stride']}-th slice")
        for k, v in result.items()) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
