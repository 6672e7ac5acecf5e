"""Issue 13: false positives on healthy scans. `mimood-infer` (the library call behind it) with an export on
folders of healthy scans; per scan the volume the calibrated mask flags (report.csv's flagged_ml: after the
component filter; reports from before it have anomalous_ml, unfiltered) and the scan score. Target: at most 5 ml
per scan.

    python benchmarks/healthy_fp.py --export EXPORT [--export EXPORT2 ...] --healthy DIR [--healthy DIR2 ...] \
        --work W --out benchmarks/results/healthy_fp.json

Healthy sets used for the issue: held-out synthetic subjects (label maps never used in training:
`mimood-data synth --select 18:20`), the MNI152 T2 1 mm brain template, the two healthy demo test scans.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from mimood.runtime.infer import infer_folder


def _ml(row: dict) -> float:
    """Flagged ml of a report row (this version: flagged_ml; before the component filter: anomalous_ml)."""
    return float(row.get("flagged_ml", row.get("anomalous_ml")) or 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", action="append", type=Path, required=True)
    p.add_argument("--healthy", action="append", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="ort")
    args = p.parse_args()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    for export in args.export:
        rows = {}
        for folder in args.healthy:
            out = args.work / export.parent.name / folder.name
            report = infer_folder(folder, out, export, backend=args.backend, resume=True, progress=False)
            with open(report.path, newline="") as f:
                for r in csv.DictReader(f):
                    rows[r["file"]] = {k: r[k] for k in r if k not in ("file", "backend")}
        worst = max((_ml(r) for r in rows.values()), default=float("nan"))
        result[str(export)] = {"scans": rows, "max_ml": worst, "over_5ml": sum(_ml(r) > 5 for r in rows.values())}
        print(f"{export}: max {worst:.2f} ml flagged; " + ", ".join(
            f"{Path(k).name.split('.nii')[0]} {_ml(v):.2f}" for k, v in rows.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
