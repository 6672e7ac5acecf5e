"""The issue #7 tables: slice/scan-level OOD scores of a trained run on BraTS T2 and on the demo test set.

    python benchmarks/ood_table.py --run /work/runs/cpu1-ood \
        --data brats=/work/shared/data/real/lesion --data demo=/work/runs/cpu1-ood/demo_data/test \
        --out /work/runs/cpu1-ood/ood_table.json

For each pass type: fit_ood into <run>/ood-<pass>.safetensors (the chosen one is also written as
<run>/ood.safetensors with --default-pass), then evaluate_ood on every data set with the ATD-based and
anomaly-map-based scan scores alongside, and an aggregation sweep (top-k share of brain tokens, top-m slices).
Cases are preprocessed, tokenised and restored once and cached in <run>/ood_bench_<name>.npz.
Only cases with a label volume are used (BraTS: tumour = seg > 0; demo: healthy_test_* have all-zero labels).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mimood.config import RunConfig
from mimood.data.discover import discover
from mimood.data.preprocess import preprocess
from mimood.eval.metrics import detection_metrics
from mimood.ood.evaluate import EvalCase, evaluate_ood, format_table
from mimood.ood.features import PASSES, brain_share
from mimood.ood.fit import OODFitConfig, fit_ood
from mimood.ood.scan import OOD_FILE, Aggregation, OODScorer
from mimood.restore import TorchEngine, restore


def prepare(run: Path, name: str, root: Path, maps: bool, stride: int) -> list[EvalCase]:
    """Preprocess, tokenise, score with the ATD and (optionally) restore every `stride`-th slice of every
    labelled case; cached."""
    cache = run / f"ood_bench_{name}_s{stride}.npz"
    cfg = RunConfig.load(run / "config.json")
    if not cache.exists():
        engine = TorchEngine.from_run(run)
        arrays = {}
        cases = [c for c in discover(root, modality=cfg.data.modality) if c.label is not None]
        for i, case in enumerate(cases):
            t0 = time.time()
            s = preprocess(case.image, cfg.data, label=case.label)
            rows = np.arange(0, len(s.images), stride)
            x = s.images[rows, None].astype(np.float32)                       # [S, 1, H, W]
            with torch.no_grad():
                tokens = np.concatenate([engine.get(engine.encode(engine.put(x[j:j + 64])))
                                         for j in range(0, len(x), 64)])      # [S, N]
                atd = np.concatenate([engine.get(engine.detect(engine.put(tokens[j:j + 256])))
                                      for j in range(0, len(x), 256)])        # [S, N]
            out = {"tokens": tokens.astype(np.int16), "fg": brain_share(s.brain[rows]), "labels": s.labels[rows],
                   "brain": s.brain[rows], "atd": atd.astype(np.float32)}
            if maps:
                b = cfg.restore.batch
                out["maps"] = np.concatenate([restore(engine, x[j:j + b], cfg.restore).maps
                                              for j in range(0, len(x), b)]).astype(np.float16)
            for k, v in out.items():
                arrays[f"{case.name}/{k}"] = v
            print(f"  {name} {case.name}: {len(x)} slices, {int(out['labels'].any(axis=(1, 2)).sum())} with lesion, "
                  f"{time.time() - t0:.0f} s", flush=True)
        np.savez(cache, **arrays)
    z = np.load(cache)
    names = sorted({k.split("/")[0] for k in z.files})
    return [EvalCase(name=n, tokens=z[f"{n}/tokens"], fg=z[f"{n}/fg"], labels=z[f"{n}/labels"],
                     token_scores={"atd": z[f"{n}/atd"]}, brain=z[f"{n}/brain"],
                     maps={"map": z[f"{n}/maps"].astype(np.float32)} if f"{n}/maps" in z.files else {})
            for n in names]


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", action="append", required=True, help="name=folder (labelled cases)")
    p.add_argument("--out", type=Path, required=True, help="JSON with every table")
    p.add_argument("--passes", default=",".join(PASSES))
    p.add_argument("--default-pass", default=None, help="also write this pass's fit as <run>/ood.safetensors")
    p.add_argument("--no-maps", action="store_true", help="skip the restoration (anomaly-map) scores")
    p.add_argument("--slice-stride", type=int, default=1, help="evaluate every k-th slice (restoration cost)")
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args()
    data = dict(d.split("=", 1) for d in args.data)
    sets = {name: prepare(args.run, name, Path(root), not args.no_maps, args.slice_stride)
            for name, root in data.items()}
    if args.prepare_only:
        return
    results = {}
    for pass_type in args.passes.split(","):
        t0 = time.time()
        path = args.run / f"ood-{pass_type}.safetensors"
        meta = fit_ood(args.run, OODFitConfig(pass_type=pass_type), out=path)
        print(f"\nfit {pass_type}: {meta['fit']['tokens']} tokens, D = {meta['fit']['D']} "
              f"(sweep {meta['fit']['dim_sweep_auroc']}), {time.time() - t0:.0f} s")
        if pass_type == args.default_pass:
            (args.run / OOD_FILE).write_bytes(path.read_bytes())
        scorer = OODScorer.load(path)
        results[pass_type] = {"fit": meta["fit"]}
        for name, cases in sets.items():
            t0 = time.time()
            cases = [replace(c, h=scorer.features(c.tokens)) for c in cases]  # features once per pass
            table = evaluate_ood(cases, scorer)
            print(format_table(table, f"\n== {name}, {pass_type} pass, {table['counts']} "
                                      f"({time.time() - t0:.0f} s)"))
            sweep = {}
            for norm, fg_min, k, m in itertools.product((True, False), (0.5, 1.0), (1, 0.02, 0.05, 0.999), (1, 3)):
                t = evaluate_ood(cases, scorer, Aggregation(fg_min, k, m, norm))
                sweep[f"norm={norm},fg_min={fg_min},k={k},m={m}"] = {
                    "slice": {n: v["auroc"] for n, v in t["slice"].items()},
                    "scan": {n: v["auroc"] for n, v in t["scan"].items()},
                    "token": {n: v["auroc"] for n, v in t["token"].items()}}
            results[pass_type][name] = {"table": table, "sweep_auroc": sweep, "confounds": confounds(cases)}
    args.out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
