"""The issue #7 tables: slice/scan-level OOD scores of a trained run on BraTS T2 and on the demo test set.

    python benchmarks/ood_table.py --run RUN --work WORK \
        --data brats=/work/shared/data/real/lesion --data demo=RUN/demo_data/test --slice-stride 2 \
        --out benchmarks/results/ood_{name}.json

For each pass type: fit_ood into WORK/ood-<pass>[-heldout].safetensors, then evaluate_ood on every data set with
the ATD-based and anomaly-map-based scores alongside, an aggregation sweep (position normalisation, brain-token
threshold, top-k share of brain tokens, top-m slices) and two lesion-blind confound scores. Cases are
preprocessed, tokenised, scored by the ATD and restored once (mimood.eval.ood.load_cases) and cached in
WORK/cases_<name>_s<stride>.npz; the run folder is only read.

--held-out: the run may have been trained on the healthy slices of the evaluated volumes (mimood-train
--lesion-margin on BraTS). The MVTM has then seen them, which nothing here can undo, but the OOD statistics
(ViM subspace, Mahalanobis means, KNN bank, atlas) are also fitted once more without every training volume
whose name is one of the evaluated cases', and both fits are reported. Without it, the KNN bank holds the
very healthy slices it is asked to score.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from mimood.eval.metrics import detection_metrics
from mimood.eval.metrics import json_ready
from mimood.eval.ood import EvalCase, case_parts, evaluate_ood, format_table, load_cases
from mimood.ood.features import PASSES
from mimood.ood.scan import Aggregation, OODScorer
from mimood.train.ood_fit import OODFitConfig, fit_ood

FIELDS = ("tokens", "fg", "labels", "brain", "index", "mirror_tokens")


def cached_cases(run: Path, work: Path, name: str, root: Path, stride: int, modality: str,
                 comparisons: bool) -> list[EvalCase]:
    cache = work / f"cases_{name}_s{stride}{'' if comparisons else '_tokens'}_v2.npz"   # v2: with mirror_tokens
    if not cache.exists():
        cases = load_cases(run, root, modality, slice_stride=stride, comparisons=comparisons)
        arrays = {}
        for c in cases:
            arrays.update({f"{c.name}/{k}": getattr(c, k) for k in FIELDS})
            if comparisons:
                arrays[f"{c.name}/atd"] = c.token_scores["atd"]
                arrays[f"{c.name}/map"] = c.maps["map"].astype(np.float16)
        np.savez(cache, **arrays)
    z = np.load(cache)
    names = sorted({k.split("/")[0] for k in z.files})
    return [EvalCase(name=n, **{k: z[f"{n}/{k}"] for k in FIELDS},
                     token_scores={"atd": z[f"{n}/atd"]} if comparisons else {},
                     maps={"map": z[f"{n}/map"].astype(np.float32)} if comparisons else {}) for n in names]


def confounds(cases: list[EvalCase]) -> dict[str, float]:
    """Slice-level AUROC of two lesion-blind scores: the slice's brain area and its centrality in the scan
    (lesions sit in central slices, so any score that tracks anatomy position gains from this)."""
    area, central, y = [], [], []
    for c in cases:
        S = len(c.tokens)
        area.append(np.asarray(c.fg, np.float64).sum(axis=1))
        central.append(-np.abs(np.arange(S) / max(S - 1, 1) - 0.5))
        y.append(c.labels.reshape(S, -1).any(axis=1))
    y = np.concatenate(y)
    return {"brain_area": detection_metrics(np.concatenate(area), y)["auroc"],
            "centrality": detection_metrics(np.concatenate(central), y)["auroc"]}


def sweep(cases: list[EvalCase], scorer: OODScorer) -> dict:
    """Slice/scan/token AUROC of every score under each aggregation (fg_min stays the fitted one: the KNN
    bank and the cases' parts were pooled with it)."""
    out = {}
    for norm, k, m in itertools.product((True, False), (1, 0.01, 0.02, 0.05, 0.1, 0.25, 0.999), (3,)):
        t = evaluate_ood(cases, scorer, replace(scorer.agg, token_topk=k, slice_topm=m, position_norm=norm))
        out[f"norm={norm},k={k},m={m}"] = {level: {n: v["auroc"] for n, v in t[level].items()}
                                           for level in ("slice", "scan", "token")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="folder for caches and fitted statistics")
    p.add_argument("--data", action="append", required=True, help="name=folder (labelled cases)")
    p.add_argument("--out", required=True, help="JSON per data set; {name} is replaced by the data set's name")
    p.add_argument("--passes", default=",".join(PASSES))
    p.add_argument("--held-out", action="store_true", help="also fit without the evaluated volumes (docstring)")
    p.add_argument("--slice-stride", type=int, default=1, help="evaluate every k-th slice (restoration cost)")
    p.add_argument("--modality", default="t2")
    p.add_argument("--no-comparisons", action="store_true", help="OOD scores only (no ATD, no restoration)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = dict(d.split("=", 1) for d in args.data)
    sets = {name: cached_cases(args.run, args.work, name, Path(root), args.slice_stride, args.modality,
                               not args.no_comparisons)
            for name, root in data.items()}
    evaluated = tuple(sorted({c.name for cases in sets.values() for c in cases}))
    fits = [("all", ())] + ([("heldout", evaluated)] if args.held_out else [])
    results = {name: {"run": str(args.run), "slice_stride": args.slice_stride, "confounds": confounds(cases)}
               for name, cases in sets.items()}
    for pass_type in args.passes.split(","):
        for fit_name, exclude in fits:
            t0 = time.time()
            path = args.work / f"ood-{pass_type}-{fit_name}.safetensors"
            if not path.exists():                                            # a fit is reused (delete to refit)
                fit_ood(args.run, OODFitConfig(pass_type=pass_type, exclude=exclude), out=path)
            scorer = OODScorer.load(path, mvtm=args.run / "mvtm" / "best.safetensors")
            meta = scorer.meta
            key = f"{pass_type}/{fit_name}"
            print(f"\nfit {key}: {meta['fit']['tokens']} tokens, D = {meta['fit']['D']} "
                  f"(sweep {meta['fit']['dim_sweep_auroc']}), {time.time() - t0:.0f} s", flush=True)
            for name, cases in sets.items():
                t0 = time.time()
                cases = [replace(c, parts=case_parts(c, scorer)) for c in cases]   # features and token scores once
                table = evaluate_ood(cases, scorer)
                print(format_table(table, f"\n== {name}, {key} ({time.time() - t0:.0f} s) {table['counts']}"),
                      flush=True)
                results[name][key] = {"fit": meta["fit"], "table": table, "sweep_auroc": sweep(cases, scorer)}
    for name, res in results.items():
        out = Path(args.out.format(name=name))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_ready(res), indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
