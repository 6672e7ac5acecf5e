"""Issue #7 on BraTS without a leak: two-fold cross-fitting. Each run was trained (VQ-VAE, MVTM, ATD, OOD
statistics) on the tumour-free slices (>= 10 mm from tumour) of three BraTS T2 cases plus the 16 healthy demo
volumes, and scores only the other three cases, which it never saw. The slice/scan table pools both folds.

    python benchmarks/ood_crossfit.py --work WORK --out benchmarks/results/ood_crossfit_brats.json \
        --fold runs/foldA=data/foldB --fold runs/foldB=data/foldA [--slice-stride 1] [--no-comparisons]

Fold 1 (the first --fold) is the development fold: the `mirror` score's design (5 x 5 token mean, no atlas) and
the aggregation defaults (axial smoothing) were chosen on it; fold 2 was evaluated once, afterwards. Each fold's
own table is printed and stored beside the pooled one, with a sweep over the aggregation and the lesion-blind
confounds. A single --fold RUN=DATA evaluates one run on one labelled folder (e.g. the demo test set).

The OOD statistics are refitted with the current code into WORK (the run folders are only read); cases are
cached there by ood_table.cached_cases (tokens, mirror tokens, and with comparisons the ATD and the maps).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ood_table import cached_cases, confounds  # noqa: E402

from mimood.eval.metrics import json_ready  # noqa: E402
from mimood.eval.ood import case_parts, evaluate_folds, format_table  # noqa: E402
from mimood.ood.scan import OODScorer  # noqa: E402
from mimood.train.ood_fit import OODFitConfig, fit_ood  # noqa: E402

SIGMAS = (0.0, 1.0, 2.0, 3.0)
TOPK = (0.02, 0.05, 0.1)


def sweep(folds, agg) -> dict:
    """Slice AUROC of every score for each axial smoothing and top-k share (the rest as fitted)."""
    out = {}
    for sigma in SIGMAS:
        for k in TOPK:
            t = evaluate_folds(folds, replace(agg, axial_sigma=sigma, token_topk=k))
            out[f"axial_sigma={sigma},k={k}"] = {n: v["auroc"] for n, v in t["slice"].items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", action="append", required=True, help="RUN=DATA: a run and the labelled cases it "
                                                                  "never saw")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--slice-stride", type=int, default=1)
    p.add_argument("--modality", default="t2")
    p.add_argument("--no-comparisons", action="store_true", help="OOD scores only (no ATD, no restoration)")
    args = p.parse_args()
    folds, result = [], {"folds": [], "slice_stride": args.slice_stride}
    for i, spec in enumerate(args.fold):
        run, data = (Path(x) for x in spec.split("=", 1))
        work = args.work / f"fold{i + 1}"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        stats = work / "ood.safetensors"
        if not stats.exists():                                              # reused: delete to refit
            fit_ood(run, OODFitConfig(), out=stats)
        scorer = OODScorer.load(stats, mvtm=run / "mvtm" / "best.safetensors")
        cases = cached_cases(run, work, data.name, data, args.slice_stride, args.modality, not args.no_comparisons)
        cases = [replace(c, parts=case_parts(c, scorer)) for c in cases]   # features and token scores once
        folds.append((scorer, cases))
        table = evaluate_folds([(scorer, cases)])
        print(format_table(table, f"\n== fold {i + 1}: {run} on {data} ({time.time() - t0:.0f} s) {table['counts']}"),
              flush=True)
        result["folds"].append({"run": str(run), "data": str(data), "cases": [c.name for c in cases],
                                "fit": scorer.meta["fit"], "table": table, "confounds": confounds(cases),
                                "sweep_slice_auroc": sweep([(scorer, cases)], scorer.agg)})
    agg = folds[0][0].agg
    pooled = evaluate_folds(folds)
    print(format_table(pooled, f"\n== pooled over {len(folds)} folds {pooled['counts']}"))
    conf = confounds([c for _, cases in folds for c in cases])
    print("lesion-blind confounds (slice AUROC):", ", ".join(f"{k} {v:.3f}" for k, v in conf.items()))
    result.update(pooled=pooled, confounds=conf, sweep_slice_auroc=sweep(folds, agg),
                  scan_score=folds[0][0].scan_score_name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_ready(result), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
