"""Inference on a folder of scans with an export folder: the Python API behind `mimood-infer`.

    engine = load_engine("export/", backend="auto")            # trt | ort | torch, says which and why
    maps = infer_slices(engine, images, engine.bundle.restore_config(), seed=0)   # [S,160,160] -> [S,160,160]
    report = infer_folder("scans/", "out/", "export/")         # maps, masks, overlays, report.csv

Scans are read one at a time; their slices are packed into the engine's fixed batches (`batching.Packer`),
so a folder of small scans wastes no padding, and memory holds only the scans whose slices are in flight
(at most one batch's worth of scans plus the one being read). A scan's outputs are written as soon as its
last slice is restored.

Scan score: with an export that has OOD statistics (manifest.extra["ood"]), each batch's input tokens and the
engine's encoding of its left-right mirrored slices (the `mirror` score) go through the MVTM features computed
in onnxruntime from the export's feature graph (mimood.runtime.ood, the same on every backend); report.csv's
scan_score is then the chosen OOD score, and map_score the anomaly-map score (`outputs`). provenance.json
records each scan's OOD score against the healthy reference scans of the fit (z, percentile).

Output files (`outputs`) and, per run or per part:
    report.csv / report.part<I>of<N>.csv         one row per scan, rewritten atomically after each scan
    provenance.json / provenance.part<I>of<N>.json   arguments, versions, export identity, backend, times,
                                                     per-scan geometry
`--part I/N` takes the cases i (0-based, in discovery order: sorted by path) with i % N == I - 1 and writes its
own report and provenance, so N machines can share one output folder without ever writing the same file;
concatenate the part reports afterwards (`report.part*of<N>.csv`, one header each).

`resume` (`--continue`): a scan is finished, and skipped, when this part's report lists it as ok and its map,
png and (with a threshold) mask exist; every other scan is redone. Outputs made with another export (the
manifest's hash in the previous provenance differs) are refused rather than mixed.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mimood.contract import current_versions
from mimood.data.discover import Case, discover
from mimood.data.preprocess import Slices, preprocess
from mimood.errors import InputError
from mimood.ood.mirror import mirror_slices
from mimood.ood.scan import SliceParts
from mimood.runtime.batching import Batch, Packer, infer_slices, restore_batch
from mimood.runtime.bundle import BACKENDS, PRECISIONS, Bundle
from mimood.runtime.ood import OODRuntime
from mimood.runtime.outputs import (Row, geometry_summary, output_paths, read_report, write_json, write_report,
                                    write_scan)

__all__ = ["BACKENDS", "Report", "infer_folder", "infer_slices", "load_engine", "pick_backend"]


def pick_backend(device: str | None = None) -> tuple[str, str]:
    """(backend, why) for `--backend auto`: TensorRT where it runs; else on a CUDA GPU torch with CUDA graphs;
    else onnxruntime (which uses its CUDA provider when it has one). On the CPU onnxruntime runs the loop
    faster than torch eager: cpu preset (B 32, R 4, T 8), one 155-slice BraTS volume on an idle 2-core CPU,
    42.9 s vs 62.3 s (benchmarks/README.md). The GPU order (TensorRT, then CUDA graphs, then
    onnxruntime-CUDA) is by expectation, not yet measured."""
    from mimood.runtime.trt import trt_available

    if device != "cpu":
        ok, why = trt_available()
        if ok:
            return "trt", why
        import torch

        if torch.cuda.is_available():
            return "torch", f"CUDA GPU without TensorRT ({why}): torch with CUDA graphs"
    return "ort", "no TensorRT/CUDA GPU: onnxruntime" if device != "cpu" else "device cpu: onnxruntime"


def load_engine(export_dir: str | Path | Bundle, backend: str = "auto", precision: str = "fp32",
                device: str | None = None):
    """An engine for the export folder: `mimood.restore.Engine` with .name, .R, .batch, .manifest, .bundle,
    .detail (backend, precision, device) and .reason (why this backend)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    bundle = export_dir if isinstance(export_dir, Bundle) else Bundle.open(export_dir)
    reason = "asked for"
    if backend == "auto" and precision == "bf16":
        backend, reason = "torch", "bf16 is the torch backend's autocast"
    elif backend == "auto":
        backend, reason = pick_backend(device)
    if backend == "trt":
        from mimood.runtime.trt_backend import TrtEngine
        engine = TrtEngine(bundle, precision)
    elif backend == "ort":
        from mimood.runtime.ort import OrtEngine
        engine = OrtEngine(bundle, precision, device)
    else:
        from mimood.runtime.torch_backend import load_torch_engine
        engine = load_torch_engine(bundle, precision, device)
    engine.bundle, engine.reason = bundle, reason
    return engine


@dataclass
class Report:
    rows: list[Row]
    path: Path                       # report csv
    provenance: Path
    backend: str                     # engine detail
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status != "ok"]


@dataclass
class _Scan:
    """A scan whose slices are in flight."""
    case: Case
    slices: Slices
    maps: np.ndarray                 # [S, H, W], filled as batches return
    left: int                        # slices not restored yet
    seconds: float                   # time spent on this scan so far
    ood: list = field(default_factory=list)   # (slice indices [n], SliceParts) per batch, with OOD statistics


def infer_folder(input: str | Path, out: str | Path, export_dir: str | Path, backend: str = "auto",
                 precision: str = "fp32", resume: bool = False, part: tuple[int, int] = (1, 1),
                 progress: bool = True, modality: str | None = None, seed: int = 0) -> Report:
    """Anomaly maps, masks and overlays for every volume under `input` (see the module docstring)."""
    started = _now()
    I, N = part
    if not (N >= 1 and 1 <= I <= N):
        raise ValueError(f"--part {I}/{N}: need 1 <= I <= N")
    input, out = Path(input), Path(out)
    bundle = Bundle.open(export_dir)
    data_cfg = bundle.data_config()
    if modality:
        data_cfg.modality = modality
    cases = discover(input, modality=data_cfg.modality)
    _check_out(input, out, cases)
    cases = [c for i, c in enumerate(cases) if i % N == I - 1]
    tag = "" if N == 1 else f".part{I}of{N}"
    report_path, prov_path = out / f"report{tag}.csv", out / f"provenance{tag}.json"
    threshold = bundle.manifest.threshold
    notes: list[str] = []

    def say(msg: str) -> None:                 # a note for the user (stderr) and for provenance.json
        notes.append(msg)
        if progress:
            print(msg, file=sys.stderr, flush=True)

    if threshold is None:
        say("the export has no calibrated threshold: no masks written, anomalous volume left empty")

    rows: dict[int, Row] = {}
    scans_info: dict[str, dict] = {}
    if resume:
        rows, scans_info = _finished(cases, out, report_path, prov_path, bundle.sha256, threshold is not None)
        if rows:
            say(f"--continue: {len(rows)} finished scans skipped")

    engine = load_engine(bundle, backend, precision)
    cfg = bundle.restore_config()
    say(f"backend: {engine.detail} ({engine.reason})")
    ood_info = bundle.manifest.extra.get("ood")
    ood = OODRuntime.open(bundle.folder, ood_info) if ood_info else None
    if ood is None:
        say("the export has no OOD statistics: the scan score is the anomaly-map score")
    prov = {"argv": sys.argv, "input": str(input), "out": str(out), "export": str(bundle.folder),
            "backend": backend, "precision": precision, "part": [I, N], "resume": resume, "seed": seed,
            "modality": data_cfg.modality, "backend_used": engine.detail, "backend_reason": engine.reason,
            "manifest_sha256": bundle.sha256,
            "manifest": {k: getattr(bundle.manifest, k) for k in ("preset", "batch", "R", "T", "lam", "threshold",
                                                                   "scan_score", "created", "versions")},
            "versions": current_versions(), "started": started, "finished": None, "notes": notes,
            "scans": scans_info}
    out.mkdir(parents=True, exist_ok=True)
    write_json(prov_path, prov)

    def save_report():
        write_report(report_path, [rows[k] for k in sorted(rows)])

    todo = [(k, c) for k, c in enumerate(cases) if k not in rows]
    scan_bar = tqdm(total=len(todo), desc="scans", unit="scan", disable=not progress, position=0)
    slice_bar = tqdm(total=0, desc="slices", unit="slice", disable=not progress, position=1, leave=False)
    pending: dict[int, _Scan] = {}
    packer = Packer(engine.batch)

    def fail(k: int, case: Case, e: Exception, seconds: float):
        rows[k] = Row(str(case.image), "failed", str(e), slices=0, seconds=round(seconds, 3),
                      backend=engine.detail)
        if progress:
            scan_bar.write(f"failed: {e}", file=sys.stderr)
        save_report()
        scan_bar.update()

    def finish(k: int):
        s = pending.pop(k)
        t0 = time.perf_counter()
        try:
            paths = output_paths(out, s.case.name, s.case.image)
            map_score, ml = write_scan(paths, s.case.name, s.slices, s.maps, threshold)
            ood_report = None
            if ood is not None:
                order = np.argsort(np.concatenate([i for i, _ in s.ood]), kind="stable")
                ood_report = ood.score(SliceParts.cat([p for _, p in s.ood]).take(order))
        except (InputError, OSError) as e:
            return fail(k, s.case, e, s.seconds + time.perf_counter() - t0)
        seconds = s.seconds + time.perf_counter() - t0
        score, name = (map_score, "map") if ood_report is None else (ood_report["value"], f"ood.{ood.score_name}")
        rows[k] = Row(str(s.case.image), "ok", "", round(score, 6), name, round(map_score, 6),
                      None if ml is None else round(ml, 6), len(s.slices.index), round(seconds, 3), engine.detail)
        scans_info[str(s.case.image)] = geometry_summary(s.slices)
        if ood_report is not None:
            scans_info[str(s.case.image)]["ood"] = ood_report
        save_report()
        scan_bar.update()

    def run(batch: Batch):
        t0 = time.perf_counter()
        n = len(batch.rows)
        restored = restore_batch(engine, batch, cfg, seed)
        maps = restored.maps[:n]                                             # [n, H, W]
        if ood is not None:                                                  # OOD parts of the filled rows
            mirrored = engine.get(engine.encode(engine.put(mirror_slices(batch.images)[:, None])))  # [B, N]
            parts = ood.parts(restored.input_tokens[:n], batch.images[:n], mirrored[:n])
            for k in {k for k, _ in batch.rows}:
                rows_k = np.array([j for j, (kk, _) in enumerate(batch.rows) if kk == k])
                pending[k].ood.append((np.array([batch.rows[j][1] for j in rows_k]), parts.take(rows_k)))
        share = (time.perf_counter() - t0) / len(batch.rows)
        for (k, i), m in zip(batch.rows, maps):
            pending[k].maps[i] = m
            pending[k].left -= 1
            pending[k].seconds += share
        slice_bar.update(len(batch.rows))
        for k in sorted({k for k, _ in batch.rows}):
            if pending[k].left == 0:
                finish(k)

    for k, case in todo:
        t0 = time.perf_counter()
        try:
            slices = preprocess(case.image, data_cfg)
        except InputError as e:
            fail(k, case, e, time.perf_counter() - t0)
            continue
        pending[k] = _Scan(case, slices, np.zeros_like(slices.images), len(slices.index),
                           time.perf_counter() - t0)
        packer.add(k, slices.images)
        slice_bar.total += len(slices.index)
        slice_bar.refresh()
        for batch in packer.full():
            run(batch)
    for batch in packer.flush():
        run(batch)
    slice_bar.close()
    scan_bar.close()

    save_report()
    prov["finished"] = _now()
    write_json(prov_path, prov)
    return Report([rows[k] for k in sorted(rows)], report_path, prov_path, engine.detail, notes)


def _check_out(input: Path, out: Path, cases: list[Case]) -> None:
    """Outputs never go into an input folder: they could overwrite a scan, and a rerun would read them."""
    o = out.resolve()
    folders = {c.image.parent.resolve() for c in cases} | ({input.resolve()} if input.is_dir() else set())
    if any(o == f or f in o.parents for f in folders):
        raise InputError(out, "the output folder must lie outside the input folder")


def _finished(cases: list[Case], out: Path, report_path: Path, prov_path: Path, sha: str, with_mask: bool
              ) -> tuple[dict[int, Row], dict[str, dict]]:
    """The rows (by case index) and geometry summaries of scans a previous run finished (module docstring)."""
    import json

    try:
        old = json.loads(prov_path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("manifest_sha256") not in (None, sha):
        raise InputError(out, "was written with another export (manifest hash differs); "
                              "drop --continue or choose another --out")
    previous = {r.file: r for r in read_report(report_path) if r.status == "ok"}
    info = old.get("scans", {}) if isinstance(old, dict) else {}
    rows, scans = {}, {}
    for k, c in enumerate(cases):
        row = previous.get(str(c.image))
        paths = output_paths(out, c.name, c.image)
        needed = [paths["map"], paths["png"]] + ([paths["mask"]] if with_mask else [])
        if row is not None and all(p.is_file() for p in needed):
            rows[k] = row
            if str(c.image) in info:
                scans[str(c.image)] = info[str(c.image)]
    return rows, scans


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
