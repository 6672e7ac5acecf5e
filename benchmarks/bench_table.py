"""The README's performance table from `mimood-bench --json` files: one row per path, each naming its machine.

    mimood-bench -m RUN -o benchmarks/results/bench_<name>.json            # on each machine
    python benchmarks/bench_table.py benchmarks/results/bench_*.json > benchmarks/results/bench_table.md
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def machine(m: dict) -> str:
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    load = m.get("load_average")
    return where + (f" (load {load:.0f})" if load is not None else "")


def rows(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    m, st, ratios = d["machine"], d["settings"], d["ratios"]
    ref = d["results"][0]["seconds_all"]
    out = []
    for r in d["results"]:
        vol = f"{r['volume_seconds']:.0f}" if r.get("volume_seconds") is not None else "-"
        out.append(f"| {machine(m)} | {st['source']} | {st['batch']} x R{st['R']}, T{st['T']} | {r['path']} | "
                   f"{r['seconds_per_batch']:.1f} | {r['slices_per_second']:.2f} | "
                   f"{statistics.median(a / b for a, b in zip(ref, r['seconds_all'])):.2f}x | "
                   f"{r['achieved_flops'] / 1e9:.1f} "
                   f"({100 * r['peak_share']:.1f}%) | {vol} |")
    if d.get("ar"):
        a = d["ar"]
        out.append(f"| {machine(m)} | {st['source']} | {st['batch']} x R{st['R']} | AR restoration (paper, "
                   f"{a['passes']} passes; {a['positions_timed']} timed, scaled) | {a['seconds_per_batch']:.0f} | "
                   f"{st['batch'] / a['seconds_per_batch']:.3f} | mimood_vs_ar {ratios['mimood_vs_ar']:.1f} | - | - |")
    for s in d.get("skipped", []):
        out.append(f"| {machine(m)} | | | {s['path']} | not measured: {s['reason']} | | | | |")
    return out


def main(paths: list[str]) -> None:
    print("| machine | weights | batch | path | s / batch (median) | slices / s | vs torch eager (median of "
          "per-round ratios) | GFLOP/s (% of the measured peak) "
          "| 155-slice volume, s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        print("\n".join(rows(Path(p))))


if __name__ == "__main__":
    main(sys.argv[1:])
