"""Inference on a folder of scans with an export folder: the Python API behind `mimood-infer`.

    engine = load_engine("export/", backend="auto")            # trt | ort | torch, says which and why
    maps = infer_slices(engine, images, engine.bundle.restore_config(), seed=0)   # [S,160,160] -> [S,160,160]
    report = infer_folder("scans/", "out/", "export/")         # maps, masks, overlays, report.csv

Scans are read one at a time; their slices are packed into the engine's fixed batches (`batching.Packer`),
so a folder of small scans wastes no padding, and memory holds only the scans whose slices are in flight
(at most one batch's worth of scans plus the one being read). A scan's outputs are written as soon as its
last slice is restored.

Scan score: with an export that has OOD statistics (manifest.extra.ood), each batch's input tokens and the
engine's encoding of its left-right mirrored slices (the `mirror` score) go through the MVTM features computed
in onnxruntime from the export's feature graph (mimood.runtime.ood, the same on every backend); the raw scan
score is then the chosen OOD score, else the anomaly-map score (`outputs`). report.csv's scan_score is the raw
score calibrated to [0, 1] against the export's healthy reference scans (mimood.runtime.reference; empty without
one); provenance.json records it with the z-score and percentile (given with at least 20 reference scans).

What is written, in the `files` or the `mood` format, and when `--continue` counts a scan as finished:
mimood.runtime.writer. Per run or per part, beside the maps (files) or in `report_dir` (mood):
    report.csv / report.part<I>of<N>.csv         one row per scan, rewritten atomically after each scan
    report.columns.json                          every column with its unit
    provenance.json / provenance.part<I>of<N>.json   arguments, versions, export identity, backend, times,
                                                     per-scan geometry and score
    index.html                                   every scan of every part found there, with the viewer
`--part I/N` takes the cases i (0-based, in discovery order: sorted by path) with i % N == I - 1 and writes its
own report and provenance, so N machines can share one output folder without ever writing the same file;
concatenate the part reports afterwards (`report.part*of<N>.csv`, one header each); index.html lists the parts
found when a part finishes (`writer.write_folder_index` rebuilds it).
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
from mimood.data.preprocess import Slices
from mimood.errors import InputError, OutputError
from mimood.ood.mirror import mirror_slices
from mimood.ood.scan import SliceParts
from mimood.restore import scan_lambda
from mimood.runtime.batching import Batch, Packer, infer_slices, restore_batch
from mimood.runtime.bundle import BACKENDS, PRECISIONS, Bundle
from mimood.runtime.components import MIN_COMPONENT_ML
from mimood.runtime.ood import OODRuntime
from mimood.runtime.outputs import Row, geometry_summary, output_paths
from mimood.runtime.overlay import NO_MATPLOTLIB, overlay_available
from mimood.runtime.safety import (ErrorLog, check_out, check_unique_outputs, is_disk_error, prepare_out, read_scan,
                                   stop_for_disk, writing)
from mimood.runtime.writer import RunWriter, healthy_reference, reference_note

__all__ = ["BACKENDS", "InferJob", "Report", "ScanState", "infer_folder", "infer_slices", "load_engine",
           "pick_backend"]


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
        try:
            import torch
        except ImportError:                  # the runtime-only install: onnxruntime is the engine
            return "ort", "torch not installed: onnxruntime"
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
    elif backend == "auto" and precision == "int8":
        backend, reason = "ort", "int8 graphs are onnxruntime's"
    elif precision == "int8" and backend != "ort":
        raise ValueError(f"int8 graphs run on the onnxruntime backend only, not {backend} (--backend ort)")
    elif backend == "auto":
        backend, reason = pick_backend(device)
    if backend == "trt":
        from mimood.runtime.trt_backend import TrtEngine
        engine = TrtEngine(bundle, precision)
    elif backend == "ort":
        from mimood.runtime.ort import OrtEngine
        engine = OrtEngine(bundle, precision, device)
    else:
        try:
            from mimood.runtime.torch_backend import load_torch_engine
        except ImportError as e:             # e.g. the runtime-only install
            raise ValueError(f"the torch backend needs PyTorch and MONAI ({e}): pip install 'mimood[train]'"
                             ) from None
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
    problems: list[str] = field(default_factory=list)     # --format mood: what the folder check found

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status != "ok"]


@dataclass
class ScanState:
    """A scan whose slices are in flight: read and preprocessed, waiting for its batches to come back."""
    key: int                         # the case's place in this part's list (the report's order)
    case: Case
    slices: Slices
    maps: np.ndarray                 # [S, H, W] float32, filled as batches return
    left: int                        # slices not restored yet
    seconds: float                   # time spent on this scan so far
    ood: list[tuple[np.ndarray, SliceParts]] = field(default_factory=list)   # per batch: (slice indices [n],
                                                                             # their OOD parts), with OOD stats
    warnings: list[str] = field(default_factory=list)                        # the reader's, one line each
    lam: float | None = None                                                 # its detector threshold (scan_lambda)


def infer_folder(input: str | Path, out: str | Path, export_dir: str | Path, backend: str = "auto",
                 precision: str = "fp32", resume: bool = False, part: tuple[int, int] = (1, 1),
                 progress: bool = True, modality: str | None = None, seed: int = 0, skull: str = "warn",
                 fmt: str = "files", report_dir: str | Path | None = None,
                 min_component_ml: float = MIN_COMPONENT_ML, radiological: bool = True, viewer: bool = True,
                 device: str | None = None) -> Report:
    """Anomaly maps, masks, overlays and the report for every volume under `input` (see the module docstring;
    fmt "files" or "mood", report_dir for mood: mimood.runtime.writer)."""
    return InferJob(input, out, export_dir, backend, precision, resume, part, progress, modality, seed, skull,
                    fmt, report_dir, min_component_ml, radiological, viewer, device).run()


class InferJob:
    """One `infer_folder` run: the cases of one part, the export and its engine, the rows written so far.

        job = InferJob("scans/", "out/", "export/")   # checks the arguments, the export and the folders
        report = job.run()                            # reads, restores and writes every case; report.csv

    Scans are read one at a time (`_read`) and their slices packed into the engine's fixed batches; each batch
    is restored (`_restore`), its maps (and OOD parts) scattered back to the `ScanState`s in flight, and a scan
    whose last slice came back is written (`_finish`) and leaves memory. A scan that cannot be read or written
    becomes a failed row (`_fail`; `mimood.runtime.safety`: unexpected errors too, their tracebacks in
    errors.log); the others go on. An output disk that fails (full, read-only) stops the run with an
    `OutputError`, the last complete report kept. `skull`: what a scan that does not look skull-stripped gets
    (`mimood.data.checks`): "warn" (mapped, a warning), "refuse" (a failed row) or "ignore".
    """

    def __init__(self, input: str | Path, out: str | Path, export_dir: str | Path, backend: str = "auto",
                 precision: str = "fp32", resume: bool = False, part: tuple[int, int] = (1, 1),
                 progress: bool = True, modality: str | None = None, seed: int = 0, skull: str = "warn",
                 fmt: str = "files", report_dir: str | Path | None = None,
                 min_component_ml: float = MIN_COMPONENT_ML, radiological: bool = True, viewer: bool = True,
                 device: str | None = None):
        self.started = _now()
        I, N = part
        if not (N >= 1 and 1 <= I <= N):
            raise ValueError(f"--part {I}/{N}: need 1 <= I <= N")
        self.input, self.out = Path(input), Path(out)
        self.backend, self.precision, self.resume, self.part = backend, precision, resume, (I, N)
        self.progress, self.seed, self.skull, self.device = progress, seed, skull, device
        check_out(self.out)
        if report_dir is not None:
            check_out(Path(report_dir))
        self.bundle = Bundle.open(export_dir)
        self.data_cfg = self.bundle.data_config()
        if modality:
            self.data_cfg.modality = modality
        cases = discover(self.input, modality=self.data_cfg.modality)
        _check_out(self.input, self.out, cases)
        if report_dir is not None:
            _check_out(self.input, Path(report_dir), cases)
        self.all_cases = cases
        self.cases = [c for i, c in enumerate(cases) if i % N == I - 1]
        self.threshold = self.bundle.manifest.threshold
        self.png = overlay_available()
        info = self.bundle.manifest.extra.ood
        self.ood = OODRuntime.open(self.bundle.folder, info) if info is not None else None
        self.score_name = "map" if self.ood is None else f"ood.{self.ood.score_name}"
        self.reference = healthy_reference(self.score_name, None if self.ood is None else
                                           self.ood.scorer.meta.get("reference"), self.bundle.manifest.extra.reference)
        self.writer = RunWriter(self.out, fmt, report_dir, self.threshold, self.reference, min_component_ml,
                                self.png, viewer, radiological, "" if N == 1 else f".part{I}of{N}")
        self.writer.check(self.input, cases)
        self.report_path, self.prov_path = self.writer.report_path, self.writer.prov_path
        logs = self.writer.reports if self.writer.reports is not None else self.out    # only made when needed
        self.errors = ErrorLog(logs / f"errors{'' if N == 1 else f'.part{I}of{N}'}.log")
        if fmt == "files":                   # (mood: RunWriter.check refuses two inputs with one file name)
            check_unique_outputs({str(c.image): output_paths(self.out, c.name, c.image).values() for c in cases},
                                 own=[p for p in (self.report_path, self.prov_path, self.errors.path) if p])
        self.notes: list[str] = []
        self.rows: dict[int, Row] = {}               # case key -> its report row (finished or failed)
        self.scans: dict[str, dict] = {}             # input file -> geometry summary (+ OOD report)
        self.pending: dict[int, ScanState] = {}      # case key -> scan in flight

    def say(self, msg: str) -> None:
        """A note for the user (stderr) and for provenance.json."""
        self.notes.append(msg)
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def run(self) -> Report:
        swept = prepare_out(self.out)
        if swept:
            self.say(f"removed {len(swept)} temporary files left by killed runs: "
                     + ", ".join(p.name for p in swept[:3]) + (", ..." if len(swept) > 3 else ""))
        for w in self.bundle.warnings:
            self.say(f"warning: {w}")
        if self.threshold is None:
            self.say("the export has no calibrated threshold: no masks written, flagged volume left empty")
        if not self.png and self.writer.reports is not None:
            self.say(NO_MATPLOTLIB)
        if self.ood is None:
            self.say("the export has no OOD statistics: the raw scan score is the anomaly-map score")
        note = reference_note(self.reference, self.score_name)
        if note:
            self.say(note)
        if self.resume:
            self.rows, self.scans = self.writer.finished(self.cases, self.bundle.sha256)
            if self.rows:
                self.say(f"--continue: {len(self.rows)} finished scans skipped")
        self.engine = load_engine(self.bundle, self.backend, self.precision, self.device)
        self.cfg = self.bundle.restore_config()
        self.say(f"backend: {self.engine.detail} ({self.engine.reason})")
        m = self.bundle.manifest
        w = self.writer
        self.prov = {"argv": sys.argv, "input": str(self.input), "out": str(self.out), "format": w.fmt,
                     "report_dir": None if w.reports is None else str(w.reports),
                     "export": str(self.bundle.folder), "backend": self.backend, "precision": self.precision,
                     "part": list(self.part), "resume": self.resume, "seed": self.seed,
                     "modality": self.data_cfg.modality, "min_component_ml": w.min_ml,
                     "backend_used": self.engine.detail, "backend_reason": self.engine.reason,
                     "manifest_sha256": self.bundle.sha256,
                     "manifest": {k: getattr(m, k) for k in ("preset", "batch", "R", "T", "detector", "lam",
                                                             "lam_scan_percentile", "residual", "contralateral",
                                                             "threshold", "scan_score", "created", "versions")},
                     "reference": None if self.reference is None else self.reference.summary(),
                     "versions": current_versions(), "started": self.started, "finished": None,
                     "notes": self.notes, "scans": self.scans}
        w.start()
        self._save_provenance()

        todo = [(k, c) for k, c in enumerate(self.cases) if k not in self.rows]
        self.scan_bar = tqdm(total=len(todo), desc="scans", unit="scan", disable=not self.progress, position=0)
        self.slice_bar = tqdm(total=0, desc="slices", unit="slice", disable=not self.progress, position=1,
                              leave=False)
        packer = Packer(self.engine.batch)
        per_scan = self.cfg.lam_scan_percentile is not None      # else every scan has the config's lambda
        try:
            for key, case in todo:
                scan = self._read(key, case)
                if scan is None:
                    continue
                self.pending[key] = scan
                packer.add(key, scan.slices.images, scan.lam if per_scan else None)
                for batch in packer.full():
                    self._restore_or_fail(batch)
            for batch in packer.flush():
                self._restore_or_fail(batch)
        finally:                             # also when a failing disk stops the run: its message on a clean line
            self.slice_bar.close()
            self.scan_bar.close()

        self._save_report()
        rows = [self.rows[k] for k in sorted(self.rows)]
        problems = self.writer.close(rows, self.notes, self.all_cases)
        for p in problems:
            self.say(f"MOOD check: {p}")
        self.prov["finished"] = _now()
        self._save_provenance()
        return Report(rows, self.report_path, self.prov_path, self.engine.detail, self.notes, problems)

    def _read(self, key: int, case: Case) -> ScanState | None:
        """Read and preprocess one case (None, and a failed row, when it cannot be read)."""
        t0 = time.perf_counter()
        try:
            slices, warned = read_scan(case.image, self.data_cfg, self.skull)
        except Exception as e:               # any error is this scan's row (safety.ErrorLog), never the run's
            self._fail(key, case, e, time.perf_counter() - t0)
            return None
        for w in warned if self.progress else ():
            self.scan_bar.write(f"warning: {w}", file=sys.stderr)
        self.slice_bar.total += len(slices.index)
        self.slice_bar.refresh()
        return ScanState(key, case, slices, np.zeros_like(slices.images), len(slices.index),
                         time.perf_counter() - t0, warnings=warned, lam=scan_lambda(slices.images, self.cfg))

    def _restore_or_fail(self, batch: Batch) -> None:
        """`_restore`; an unexpected error fails the scans of this batch (not the run)."""
        t0 = time.perf_counter()
        try:
            self._restore(batch)
        except OutputError:
            raise
        except Exception as e:
            for key in sorted({k for k, _ in batch.rows} & set(self.pending)):
                scan = self.pending.pop(key)
                self._fail(key, scan.case, e, scan.seconds + time.perf_counter() - t0)

    def _restore(self, batch: Batch) -> None:
        """Restore one batch, hand its maps (and OOD parts) to the scans they belong to, finish completed scans."""
        t0 = time.perf_counter()
        if not any(k in self.pending for k, _ in batch.rows):           # its scans all failed already
            return
        n = len(batch.rows)
        restored = restore_batch(self.engine, batch, self.cfg, self.seed)
        if self.ood is not None:                                              # OOD parts of the filled rows
            e = self.engine
            mirrored = e.get(e.encode(e.put(mirror_slices(batch.images)[:, None])))   # [B, N]
            parts = self.ood.parts(restored.input_tokens[:n], batch.images[:n], mirrored[:n])
            for key in {k for k, _ in batch.rows} & set(self.pending):
                rows = np.array([j for j, (k, _) in enumerate(batch.rows) if k == key])
                self.pending[key].ood.append((np.array([batch.rows[j][1] for j in rows]), parts.take(rows)))
        share = (time.perf_counter() - t0) / n
        for (key, i), m in zip(batch.rows, restored.maps[:n]):                # maps [n, H, W]
            if key not in self.pending:                                       # a scan failed in a batch before
                continue
            scan = self.pending[key]
            scan.maps[i] = m
            scan.left -= 1
            scan.seconds += share
        self.slice_bar.update(n)
        for key in sorted({k for k, _ in batch.rows} & set(self.pending)):
            if self.pending[key].left == 0:
                self._finish(self.pending.pop(key))

    def _finish(self, scan: ScanState) -> None:
        """Write a restored scan's outputs and its report row."""
        t0 = time.perf_counter()
        case = scan.case
        try:
            ood_report = None
            if self.ood is not None:
                order = np.argsort(np.concatenate([i for i, _ in scan.ood]), kind="stable")
                ood_report = self.ood.score(SliceParts.cat([p for _, p in scan.ood]).take(order))
            raw = None if ood_report is None else ood_report["value"]
            row = self.writer.write(case, scan.slices, scan.maps, raw, self.score_name, self.engine.detail,
                                    scan.seconds)
        except Exception as e:               # any error is this scan's row (safety.ErrorLog), never the run's
            return self._fail(scan.key, case, e, scan.seconds + time.perf_counter() - t0)
        row.seconds = round(scan.seconds + time.perf_counter() - t0, 3)
        row.warnings = "; ".join(scan.warnings)
        self.rows[scan.key] = row
        self.scans[str(case.image)] = {**geometry_summary(scan.slices), "lam": scan.lam}
        if self.reference is not None:
            self.scans[str(case.image)]["score"] = self.reference.report(row.raw_score)
        if ood_report is not None:               # its z and percentile are "score"'s, given with >= 20 references
            self.scans[str(case.image)]["ood"] = {k: ood_report[k] for k in ("score", "value")}
        self._save_report()
        self.scan_bar.update()

    def _fail(self, key: int, case: Case, error: Exception, seconds: float) -> None:
        """The scan's failed row (its one-line error: safety.ErrorLog); a failing output disk stops the run."""
        message = self.errors.describe(error, case.image)
        self.rows[key] = self.writer.failed(case, message, round(seconds, 3), self.engine.detail)
        if self.progress:
            self.scan_bar.write(f"failed: {message}", file=sys.stderr)
        self._save_report()
        self.scan_bar.update()
        if is_disk_error(error):
            raise stop_for_disk(error, case.image, self.out, self.report_path or self.out, len(self.rows))

    def _save_report(self) -> None:
        """report.csv rewritten atomically: on a full disk the last complete one stays (an OutputError)."""
        if self.report_path is not None:
            with writing(self.report_path, "write the report", "; the last complete report is kept"):
                self.writer.save_report([self.rows[k] for k in sorted(self.rows)])

    def _save_provenance(self) -> None:
        if self.prov_path is not None:
            with writing(self.prov_path, "write the provenance"):
                self.writer.save_provenance(self.prov)


def _check_out(input: Path, out: Path, cases: list[Case]) -> None:
    """Outputs never go into an input folder: they could overwrite a scan, and a rerun would read them."""
    o = out.resolve()
    folders = {c.image.parent.resolve() for c in cases} | ({input.resolve()} if input.is_dir() else set())
    if any(o == f or f in o.parents for f in folders):
        raise InputError(out, "the output folder must lie outside the input folder")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
