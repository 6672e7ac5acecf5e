"""`manifest.json`: everything inference needs, written beside the exported graphs.

An export folder is self-describing: the runtime reads shapes, precisions, the restoration
parameters (lambda, T, R, temperature, pooling), the calibrated threshold and the preprocessing
parameters from here and never imports `mimood.train`. Each graph is recorded with its SHA-256,
so `verify` notices a graph that was replaced or edited after export. TensorRT engines are not
listed: they belong to one machine and are keyed and checked by `mimood.export.trt`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mimood.config import GRID, RunConfig
from mimood.errors import InputError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (graphs and engines reach 100s of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder and rename it over `path`, so a reader
    never sees a half-written graph, engine or manifest."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
class Manifest:
    preset: str                 # name of the config preset the models were trained with
    batch: int                  # slices per fixed-shape batch (graphs have static shapes)
    R: int                      # restorations in parallel
    T: int                      # restoration iterations
    lam: float                  # ATD threshold lambda
    temperature: float          # MVTM sampling temperature
    min_pool: int               # smoothing of |restoration - input|
    avg_pool: int
    data: dict[str, Any]        # preprocessing parameters (asdict(DataConfig))
    vocab_size: int             # codebook size K
    mask_id: int                # [MASK] token id (= K)
    grid: int = GRID            # token grid side (20 -> 400 tokens)
    threshold: float | None = None     # calibrated anomaly-score threshold, None if not calibrated
    scan_score: str | None = None      # chosen scan-level OOD score (extra["ood"] has its files), None if none
    # name -> {file, sha256, precision, inputs: {name: [shape, dtype]}, outputs: {...}}
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)   # graph -> checks against PyTorch
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=current_versions)
    created: str = field(default_factory=_utc_now)              # UTC, ISO 8601
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_config(cls, cfg: RunConfig, **overrides: Any) -> "Manifest":
        """The manifest fields a run's config determines; `overrides` sets or replaces any field."""
        r = cfg.restore
        kw: dict[str, Any] = dict(
            preset=cfg.preset, batch=r.batch, R=r.R, T=r.T, lam=r.lam, temperature=r.temperature,
            min_pool=r.min_pool, avg_pool=r.avg_pool, threshold=r.threshold,
            data=json.loads(json.dumps(asdict(cfg.data))),   # as it reads back (tuples are lists in JSON)
            vocab_size=cfg.vqvae.num_embeddings, mask_id=cfg.vqvae.num_embeddings, grid=GRID)
        kw.update(overrides)
        return cls(**kw)

    def add_graph(self, name: str, path: str | Path, precision: str) -> None:
        """Record a graph file that lies in the manifest's folder: its hash and I/O signature."""
        from mimood.export.validate import graph_io  # onnx is only needed when graphs are added

        path = Path(path)
        self.graphs[name] = {"file": path.name, "sha256": file_sha256(path),
                             "precision": precision, **graph_io(path)}

    def save(self, path: str | Path) -> None:
        text = json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        write_atomic(path, text.encode())

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
        unknown, missing = set(d) - names, names - set(d)
        if unknown or missing:
            raise InputError(path, f"manifest keys do not match: unknown {sorted(unknown)}, "
                                   f"missing {sorted(missing)}")
        return cls(**d)

    def verify(self, folder: str | Path) -> list[str]:
        """Problems with the graph files in `folder`, and with the OOD scan score's graph and statistics when
        the export has them (`extra["ood"]`): missing, or bytes that differ from export."""
        folder = Path(folder)
        files = sorted((f"graph '{name}'", g) for name, g in self.graphs.items())
        ood = self.extra.get("ood")
        if ood:
            files += [("OOD feature graph", ood["graph"]), ("OOD statistics", ood["stats"])]
        problems = []
        for what, g in files:
            p = folder / g["file"]
            if not p.is_file():
                problems.append(f"{p}: {what} is missing")
            elif file_sha256(p) != g["sha256"]:
                problems.append(f"{p}: {what} differs from the exported one (sha256 mismatch)")
        return problems
