"""The export/runtime contract: what an export folder holds and how its files are written, with no torch.

Three parts, each used by both sides (the exporter writes, the runtime reads and checks):
- files: `file_sha256` (the identity of a graph, engine or checkpoint) and `atomic_write`, the project's one
  way of writing a file (temporary name beside it, renamed when complete);
- graphs: the four loop steps (`GRAPHS`, in loop order), the tensor names, static shapes and dtypes of their
  inputs and outputs for B slices and R restorations (`expected_io`, `IO_NAMES`), the checkpoints the torch
  backend needs (`WEIGHTS`) and `graph_io`, which reads a graph file's I/O (with `onnx`, imported only there);
- `manifest.json`: everything inference needs, written beside the exported graphs.

An export folder is self-describing: the runtime reads shapes, precisions, the restoration
parameters (lambda, T, R, temperature, pooling), the calibrated threshold and the preprocessing
parameters from here and never imports `mimood.train`. Each graph is recorded with its SHA-256,
so `verify` notices a graph that was replaced or edited after export. TensorRT engines are not
listed: they belong to one machine and are keyed and checked by `mimood.runtime.trt`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import secrets
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from mimood.config import GRID, IMAGE_SIZE, NUM_TOKENS, RunConfig
from mimood.errors import InputError
from mimood.thresholds import check_manifest_values

FORMAT_VERSION = 1
# manifest keys added within format 1: absent in older exports, read as their default (the behaviour before them)
ADDED_IN_FORMAT = {"detector", "lam_scan_percentile", "residual", "contralateral"}
MANIFEST_NAME = "manifest.json"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (graphs and engines reach 100s of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds, so a reader
    never sees a half-written map, graph, engine or manifest (the project's one writer: bytes, text, nibabel,
    numpy and safetensors writers all write to the yielded path).

    The temporary name keeps the full suffix (`.nii.gz`, `.npz`, `.png`) so that writers which pick the format
    from the name do the right thing, and is unique per call: `.<stem>.tmp-<host>-<pid>-<random><suffix>`
    (`temporary_name`), so two writers of the same file, in two processes, threads or machines sharing a
    folder, never share a temporary, and one left by a killed process is recognised (`sweep_temporaries`).
    Before the rename the file gets the mode the umask gives new files (0o666 & ~umask): some writers create
    theirs private (0600). The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary_name(path.name))
    try:
        yield tmp
        _umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def temporary_name(name: str, pid: int | None = None) -> str:
    """The name `atomic_write` gives the temporary of file `name` (a `TEMPORARY` match)."""
    suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    return f".{stem}.tmp-{_HOST}-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}{suffix}"


# host tag: the first 8 hex digits of the host name's SHA-256 (short, and safe in a file name)
_HOST = hashlib.sha256(platform.node().encode()).hexdigest()[:8]
TEMPORARY = re.compile(r"^\.(?P<stem>.*)\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}(?P<suffix>[^/]*)$")


def sweep_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries `atomic_write` left in `folder` (not its sub folders) when its process was killed
    (kill -9 skips the clean-up): names matching `TEMPORARY` written on this machine by a process that no longer
    exists. Nothing else is touched: other files, temporaries of live processes, of other machines sharing the
    folder (their processes cannot be asked) and of an older naming scheme. A reused process id only delays the
    sweep to a later start. Returns the removed paths."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for e in entries:
        m = TEMPORARY.match(e.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])) or not e.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(e.path)
        except FileNotFoundError:       # another process swept it first
            continue
        removed.append(Path(e.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)                 # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):   # another user's process; an absurd number
        return pid < 1 << 22            # Linux pids stay below 2^22: above, nothing can be alive
    return True


def _umask_mode(path: Path) -> None:
    """Give a new file the mode the umask gives (0o666 & ~umask): onnx, safetensors and tempfile-based writers
    may create files 0600, and an export or a map must be readable by whoever reads the folder."""
    mode = 0o666 & ~_umask()
    try:
        if path.is_file() and (os.stat(path).st_mode & 0o777) != mode:
            os.chmod(path, mode)
    except OSError:                     # a file system without modes (some network shares): keep the file's
        pass


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status), else set and
    restored at once (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


# -- graphs ----------------------------------------------------------------------------------------------------
GRAPHS = ("encode", "atd", "mvtm_step", "decode_score")   # the loop steps, in loop order
ROW_GRAPHS = ("atd", "mvtm_step")                         # row-wise steps: row i of the output needs row i only
WEIGHTS = ("vqvae", "atd", "mvtm")                        # checkpoints in <export>/weights/ (the torch backend)
ROWS = "rows"                                             # the symbolic row dimension (expected_io(rows=True))


def expected_io(B: int, R: int, rows: bool = False) -> dict[str, dict[str, dict[str, tuple[list, str]]]]:
    """graph -> {"inputs"/"outputs": {tensor name: (static shape, numpy dtype name)}} for B slices, R copies:
    the contract of the exported graphs (mimood.export.graphs) and of every runtime backend; fp16 graphs keep
    the same fp32/int32/bool I/O. Rows of B*R are slice-major (row b*R + r is restoration r of slice b).

    rows=True: the onnxruntime-only copies of the row-wise steps (ROW_GRAPHS, `extra.ort_graphs` and
    `extra.int8`), whose first dimension is the symbol ROWS instead of B*R: they run any number of rows, so the
    onnxruntime engine computes only the rows that can still change (mimood.runtime.ort)."""
    H, N = IMAGE_SIZE, NUM_TOKENS
    BR = ROWS if rows else B * R
    shapes = {
        "encode": ({"x": ([B, 1, H, H], "float32")}, {"tokens": ([B, N], "int32")}),
        "atd": ({"tokens": ([BR, N], "int32")}, {"probs": ([BR, N], "float32")}),
        "mvtm_step": ({"tokens": ([BR, N], "int32"), "mask": ([BR, N], "bool"),
                       "noise": ([BR, N], "float32")}, {"tokens_out": ([BR, N], "int32")}),
        "decode_score": ({"tokens": ([B * R, N], "int32"), "x": ([B, 1, H, H], "float32")},
                         {"maps": ([B, H, H], "float32")}),
    }
    return {name: {"inputs": ins, "outputs": outs} for name, (ins, outs) in shapes.items()}


# graph -> (input names, output names), in the graphs' order
IO_NAMES = {g: (list(io["inputs"]), list(io["outputs"])) for g, io in expected_io(1, 1).items()}


def recorded_io(inputs: dict[str, list], outputs: dict[str, list]) -> dict[str, dict[str, tuple[list[int], str]]]:
    """A graph's I/O as the manifest records it ({name: [shape, dtype]} per side) in `expected_io`'s form."""
    return {side: {k: (list(v[0]), v[1]) for k, v in io.items()} for side, io in (("inputs", inputs),
                                                                                  ("outputs", outputs))}


def graph_io(path: str | Path) -> dict[str, dict[str, list]]:
    """A graph file's {"inputs": {name: [shape, dtype]}, "outputs": {...}}; a symbolic dim is its name (or None).
    Reads the file with `onnx` (the exporter's dependency: the runtime uses the I/O recorded in the manifest)."""
    import numpy as np
    import onnx

    def value_io(values) -> dict[str, list]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            out[v.name] = [shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name]
        return out

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise InputError(path, "ONNX file not found") from None
    except Exception as e:  # protobuf's DecodeError and friends
        raise InputError(path, f"not an ONNX graph: {e}") from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return {"inputs": value_io(inputs), "outputs": value_io(model.graph.output)}


# -- manifest.json -----------------------------------------------------------------------------------------------
def current_versions() -> dict[str, str]:
    """Versions of the packages that produced (or will read) the graphs."""
    out = {"python": platform.python_version()}
    for pkg in ("mimood", "torch", "onnx", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class FileRecord:
    """A file of the export folder and the SHA-256 of its bytes at export."""
    file: str                   # relative to the export folder
    sha256: str


@dataclass
class GraphRecord(FileRecord):
    """A graph file: the fields of a `Manifest.graphs` entry."""
    precision: str                               # "fp32", "fp16" or "int8"
    inputs: dict[str, list]                      # tensor -> [static shape, numpy dtype name]
    outputs: dict[str, list]


@dataclass
class OrtGraphRecord(GraphRecord):
    """An onnxruntime-only copy of a loop graph (fused attention; mimood.export.graphs.export_ort). Its rows are
    symbolic (`expected_io(rows=True)`) in exports from this version on, B*R in earlier ones."""
    source: str                                  # the standard graph of the same function, e.g. "atd.onnx"
    rewrites: dict[str, int]                     # rewrite -> how many times it applied


@dataclass
class Int8GraphRecord(GraphRecord):
    """An int8 copy of an onnxruntime-only graph (mimood.export.quantize, `mimood-export --int8`), run by
    `--precision int8` unless the map check (`Extra.int8_maps`) turned it down."""
    source: str                                  # the graph it was quantised from, e.g. "atd.ort.onnx"
    method: str                                  # quantiser, version and settings
    calibration: str                             # what the activation ranges were measured on
    quantized: dict[str, int]                    # op type -> how many nodes run in int8
    accepted: bool | None = None                 # True: passed the map check; False: failed it, never used;
                                                 # None: not checked (an export without validation), used
    reason: str = ""                             # why it was not accepted


@dataclass
class MapCheck:
    """The seed rule on the export's validation slices (mimood.export.validate.seed_rule): the whole loop's maps
    with int8 graphs against the fp32 onnxruntime maps with the same seed must be no further from them than the
    fp32 maps with another seed (mean |map difference| and mask disagreement, inside the brain)."""
    slices: int
    seeds: list[int]                             # [the reference's and the candidates', the yardstick's]
    threshold: float | None                      # of the mask rule (None: an uncalibrated export, mean rule only)
    yardstick: dict[str, float]                  # fp32 with the other seed against the reference
    candidates: dict[str, dict[str, Any]]        # "atd", "mvtm_step", "atd+mvtm_step" -> agreement + "passed"
    accepted: list[str]                          # the int8 steps `--precision int8` runs


@dataclass
class OODRecord:
    """The scan-level OOD score of the export (mimood.runtime.ood): feature graph, statistics, what was fitted."""
    graph: GraphRecord                           # ood_features.onnx: tokens [B, N] int32 -> h [B, N, d] float32
    stats: FileRecord                            # ood.safetensors
    scan_score: str                              # the chosen score (also Manifest.scan_score)
    pass_type: str                               # "unmasked" or "masked" (mimood.ood.features)
    aggregation: dict[str, Any]                  # mimood.ood.scan.Aggregation's fields
    mvtm_sha256: str                             # the MVTM the statistics were fitted on
    reference: dict[str, float | None]           # healthy reference scan scores: {"n", "mean", "std"} (None: too few)


@dataclass
class ExportValidation:
    """How the graphs were checked against PyTorch (each graph's checks: Manifest.validation)."""
    source: str                                  # the held-out slices used
    slices: int
    blob_slices: int                             # of them, with a bright disc painted in
    lam: float
    forced_mask: float                           # share of tokens masked at random on top of the ATD's mask
    mask_share: float                            # share of tokens the MVTM check re-sampled
    seed: int
    runtime: str                                 # where the graphs ran, e.g. "onnxruntime CPUExecutionProvider"
    tolerances: dict[str, dict[str, float]]      # precision -> mimood.export.export.Tolerances fields


@dataclass
class Extra:
    """What an export adds beyond the loop graphs; every field is optional (an export without OOD statistics,
    without --fp16, not validated, ...)."""
    weights: dict[str, FileRecord] = field(default_factory=dict)        # WEIGHTS kind -> checkpoint copy
    ort_graphs: dict[str, OrtGraphRecord] = field(default_factory=dict)  # loop step -> onnxruntime-only copy
    int8: dict[str, Int8GraphRecord] = field(default_factory=dict)       # loop step -> int8 copy (--int8)
    int8_maps: MapCheck | None = None                                   # the map check of the int8 copies
    ood: OODRecord | None = None
    fp16: dict[str, dict[str, Any]] = field(default_factory=dict)      # graph key -> conversion report
    validation: ExportValidation | None = None
    opset: int | None = None
    engines: str | None = None                   # what happened to the TensorRT engines at export (one line)
    # score name -> raw scan scores of healthy reference scans, for scan scores whose statistics file does not
    # hold them (the OOD scores' are in ood.safetensors): "map", the anomaly-map score of healthy calibration
    # volumes; mimood.runtime.writer turns a raw score into the [0, 1] scan score with it
    reference: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Any) -> "Extra":
        """Rebuild from `asdict` output; a missing required or unknown key is a ValueError naming where."""
        x = _record(cls, d, "extra")
        x.weights = {k: _record(FileRecord, v, f"extra.weights.{k}") for k, v in x.weights.items()}
        x.ort_graphs = {k: _record(OrtGraphRecord, v, f"extra.ort_graphs.{k}") for k, v in x.ort_graphs.items()}
        x.int8 = {k: _record(Int8GraphRecord, v, f"extra.int8.{k}") for k, v in x.int8.items()}
        if x.int8_maps is not None:
            x.int8_maps = _record(MapCheck, x.int8_maps, "extra.int8_maps")
        if x.ood is not None:
            x.ood = _record(OODRecord, x.ood, "extra.ood")
            x.ood.graph = _record(GraphRecord, x.ood.graph, "extra.ood.graph")
            x.ood.stats = _record(FileRecord, x.ood.stats, "extra.ood.stats")
        if x.validation is not None:
            x.validation = _record(ExportValidation, x.validation, "extra.validation")
        return x


def check_file_entry(file: Any, path: str | Path, where: str) -> str:
    """A manifest's file entry must name a file inside the export folder: a relative path without `..`, so a
    manifest cannot make the runtime load (or hash) a file from elsewhere. `InputError(path, ...)` otherwise."""
    from pathlib import PurePosixPath, PureWindowsPath

    ok = isinstance(file, str) and file not in ("", ".") and "\0" not in file
    if ok:
        parts = PurePosixPath(file.replace("\\", "/")).parts
        ok = (not PurePosixPath(file).is_absolute() and not PureWindowsPath(file).drive and ".." not in parts
              and bool(parts))
    if not ok:
        raise InputError(path, f"'{where}' must be a file inside the export folder (a relative path without "
                               f"'..'), got {json.dumps(file)[:80]}")
    return file


def _record(cls, d: Any, where: str):
    """cls(**d) for a JSON object d whose keys are cls's fields (those with defaults may be left out)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} is not a JSON object")
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown, missing = set(d) - names, required - set(d)
    if unknown or missing:
        raise ValueError(f"{where} keys do not match: unknown {sorted(unknown)}, missing {sorted(missing)}")
    return cls(**d)


@dataclass
class Manifest:
    preset: str                 # name of the config preset the models were trained with
    batch: int                  # slices per fixed-shape batch (graphs have static shapes)
    R: int                      # restorations in parallel
    T: int                      # restoration iterations
    lam: float                  # detector threshold lambda (ATD probability, or intensity for "intensity")
    temperature: float          # MVTM sampling temperature
    min_pool: int               # smoothing of |restoration - input|
    avg_pool: int
    data: dict[str, Any]        # preprocessing parameters (asdict(DataConfig))
    vocab_size: int             # codebook size K
    mask_id: int                # [MASK] token id (= K)
    grid: int = GRID            # token grid side (20 -> 400 tokens)
    threshold: float | None = None     # calibrated anomaly-score threshold, None if not calibrated
    scan_score: str | None = None      # chosen scan-level OOD score (extra.ood has its files), None if none
    detector: str = "atd"              # what picks the tokens to re-sample (config.DETECTORS; older exports: atd)
    lam_scan_percentile: float | None = None   # "intensity": lambda per scan (RestoreConfig.lam_scan_percentile)
    residual: str = "abs"              # what decode_score measures (config.RESIDUALS; the graph computes it)
    contralateral: float = 0.0         # map damping by its mirror (RestoreConfig.contralateral; host-side)
    # name -> {file, sha256, precision, inputs: {name: [shape, dtype]}, outputs: {...}}
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)   # graph -> checks against PyTorch
    extra: Extra = field(default_factory=Extra)
    versions: dict[str, str] = field(default_factory=current_versions)
    created: str = field(default_factory=_utc_now)              # UTC, ISO 8601
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_config(cls, cfg: RunConfig, **overrides: Any) -> "Manifest":
        """The manifest fields a run's config determines; `overrides` sets or replaces any field."""
        r = cfg.restore
        kw: dict[str, Any] = dict(
            preset=cfg.preset, batch=r.batch, R=r.R, T=r.T, lam=r.lam, temperature=r.temperature,
            min_pool=r.min_pool, avg_pool=r.avg_pool, threshold=r.threshold, detector=r.detector,
            lam_scan_percentile=r.lam_scan_percentile, residual=r.residual, contralateral=r.contralateral,
            data=json.loads(json.dumps(asdict(cfg.data))),   # as it reads back (tuples are lists in JSON)
            vocab_size=cfg.vqvae.num_embeddings, mask_id=cfg.vqvae.num_embeddings, grid=GRID)
        kw.update(overrides)
        return cls(**kw)

    def add_graph(self, name: str, path: str | Path, precision: str) -> None:
        """Record a graph file that lies in the manifest's folder: its hash and I/O signature."""
        path = Path(path)
        self.graphs[name] = {"file": path.name, "sha256": file_sha256(path),
                             "precision": precision, **graph_io(path)}

    def save(self, path: str | Path) -> None:
        """Write the manifest atomically, after the checks `load` makes (restoration numbers, file entries), so
        no export holds a manifest that inference would refuse."""
        d = asdict(self)
        check_manifest_values(d, path)
        for where, file in self.files():
            check_file_entry(file, path, where)
        text = json.dumps(d, indent=2, sort_keys=True, allow_nan=False) + "\n"
        with atomic_write(path) as tmp:
            tmp.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Read a manifest; a missing, unreadable or foreign file is an `InputError`."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(path, "manifest not found (is this an export folder?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(path, f"cannot read manifest: {e}") from None
        if not isinstance(d, dict):
            raise InputError(path, "manifest is not a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(path, f"manifest format {version!r}, this mimood reads {FORMAT_VERSION}")
        names = {f.name for f in fields(cls)}
        unknown, missing = set(d) - names, names - set(d) - ADDED_IN_FORMAT
        if unknown or missing:
            raise InputError(path, f"manifest keys do not match: unknown {sorted(unknown)}, "
                                   f"missing {sorted(missing)}")
        check_manifest_values(d, path)
        try:
            d["extra"] = Extra.from_json(d["extra"])
        except ValueError as e:
            raise InputError(path, f"manifest {e}") from None
        if not isinstance(d["graphs"], dict) or not all(isinstance(g, dict) and "file" in g
                                                        for g in d["graphs"].values()):
            raise InputError(path, "manifest 'graphs' must map each graph to an object with a 'file'")
        manifest = cls(**d)
        for where, file in manifest.files():
            check_file_entry(file, path, where)
        return manifest

    def files(self) -> list[tuple[str, Any]]:
        """(where in the manifest, file entry) of every file the manifest names."""
        out = [(f"graphs.{k}.file", g.get("file")) for k, g in sorted(self.graphs.items())]
        out += [(f"extra.weights.{k}.file", r.file) for k, r in sorted(self.extra.weights.items())]
        out += [(f"extra.ort_graphs.{k}.file", r.file) for k, r in sorted(self.extra.ort_graphs.items())]
        if self.extra.ood is not None:
            out += [("extra.ood.graph.file", self.extra.ood.graph.file),
                    ("extra.ood.stats.file", self.extra.ood.stats.file)]
        return out

    def verify(self, folder: str | Path) -> list[str]:
        """Problems with the graph files in `folder`, and with the OOD scan score's graph and statistics when
        the export has them (`extra.ood`): missing, or bytes that differ from export."""
        folder = Path(folder)
        files = [(f"graph '{name}'", g["file"], g["sha256"]) for name, g in sorted(self.graphs.items())]
        if self.extra.ood is not None:
            files += [("OOD feature graph", self.extra.ood.graph.file, self.extra.ood.graph.sha256),
                      ("OOD statistics", self.extra.ood.stats.file, self.extra.ood.stats.sha256)]
        problems = []
        for what, file, sha256 in files:
            p = folder / file
            if not p.is_file():
                problems.append(f"{p}: {what} is missing")
            elif file_sha256(p) != sha256:
                problems.append(f"{p}: {what} differs from the exported one (sha256 mismatch)")
        return problems
