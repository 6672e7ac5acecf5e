"""An export folder as the runtime sees it: the manifest, the graph file of each loop step at a precision,
the shapes every backend binds, and the restoration/preprocessing parameters.

Everything here is read from `manifest.json` (never from a run folder or `mimood.train`), and checked when
the folder is opened, so a wrong or edited export fails with one `InputError` line before any scan is read:
graph files must exist with the hashes recorded at export, and each graph's inputs and outputs must be the
names, static shapes and dtypes of the loop contract (`expected_io`) for the manifest's B and R.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mimood.config import DataConfig, RestoreConfig, from_dict
from mimood.contract import GRAPHS, MANIFEST_NAME, Manifest, expected_io, file_sha256, recorded_io
from mimood.errors import InputError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "trt", "ort", "torch")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")   # bf16: the torch backend's autocast only (no bf16 graphs);
                                                # int8: the onnxruntime backend only (extra.int8)


@dataclass
class Bundle:
    folder: Path
    manifest: Manifest
    sha256: str                  # of manifest.json (it holds every graph's hash): the export's identity
    warnings: list[str] = field(default_factory=list)   # usable, but the user should know (one line each)

    @classmethod
    def open(cls, folder: str | Path) -> "Bundle":
        """Read and check an export folder (see the module docstring)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(folder, "export folder not found")
        manifest = Manifest.load(folder)
        problems = manifest.verify(folder)
        if problems:
            raise InputError(folder, "; ".join(problems))
        missing = [g for g in GRAPHS if g not in manifest.graphs]
        if missing:
            raise InputError(folder / MANIFEST_NAME, f"no graph {', '.join(missing)} in the manifest")
        want = expected_io(manifest.batch, manifest.R)
        for key, g in manifest.graphs.items():
            if _base(key) not in GRAPHS:
                raise InputError(folder / MANIFEST_NAME, f"graph {key!r} is not one of the loop steps {GRAPHS}")
            io = want[_base(key)]
            got = recorded_io(g["inputs"], g["outputs"])
            if got != io:
                raise InputError(folder / g["file"], f"graph I/O {got} does not match the loop contract {io} "
                                                     f"for batch {manifest.batch}, R {manifest.R}")
        sha = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
        return cls(folder, manifest, sha, version_warnings(folder, manifest))

    def graph(self, name: str, precision: str) -> Path:
        """The ONNX file of loop step `name` at `precision`. An fp16 export may keep a step in fp32 only (the
        manifest says which); that step then runs in fp32, logged once. int8 is onnxruntime's alone
        (`int8_graph`): here it is an error."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if precision == "bf16":
            raise ValueError("bf16 runs on the torch backend only (autocast); the export has no bf16 graphs")
        if precision == "int8":
            raise ValueError("int8 graphs run on the onnxruntime backend only (--backend ort)")
        found = {g["precision"]: g["file"] for key, g in self.manifest.graphs.items() if _base(key) == name}
        if precision not in found:
            if precision == "fp16" and not any(p == "fp16" for p in self.precisions()):
                raise InputError(self.folder, "no fp16 graphs in this export (export it with --fp16)")
            log.info("%s has no %s graph; it runs in fp32", name, precision)
            precision = "fp32"
        return self.folder / found[precision]

    def ort_graph(self, name: str) -> Path | None:
        """The onnxruntime-only fp32 copy of step `name` (contrib MultiHeadAttention, recorded by the exporter in
        `manifest.extra.ort_graphs`; faster on onnxruntime's CPU provider), checked like the standard graphs;
        None when the export has none for this step."""
        g = self.manifest.extra.ort_graphs.get(name)
        return None if g is None else self._checked(name, g, "onnxruntime graph")

    def int8_graph(self, name: str) -> Path | None:
        """The int8 copy of step `name` (`manifest.extra.int8`, `mimood-export --int8`), checked like the others;
        None when the export has none, or when its map check failed (the record says why)."""
        g = self.manifest.extra.int8.get(name)
        if g is None or g.accepted is False:
            return None
        return self._checked(name, g, "int8 graph")

    def rows_symbolic(self, name: str) -> bool:
        """Whether the onnxruntime-only copy of step `name` takes any number of rows (`expected_io(rows=True)`;
        exports made before that have B*R)."""
        g = self.manifest.extra.ort_graphs.get(name)
        return g is not None and recorded_io(g.inputs, g.outputs) == expected_io(1, 1, rows=True)[name]

    def _checked(self, name: str, g, what: str) -> Path:
        path = self.folder / g.file
        if not path.is_file():
            raise InputError(path, f"{what} for '{name}' is missing")
        if file_sha256(path) != g.sha256:
            raise InputError(path, f"{what} for '{name}' differs from the exported one (sha256 mismatch)")
        got = recorded_io(g.inputs, g.outputs)
        want = [expected_io(self.manifest.batch, self.manifest.R, rows)[name] for rows in (True, False)]
        if got not in want:
            raise InputError(path, f"graph I/O {got} does not match the loop contract {want[0]}")
        return path

    def int8_steps(self) -> list[str]:
        """The steps `--precision int8` runs in int8 (those with an int8 copy its map check did not turn down)."""
        return [k for k, g in self.manifest.extra.int8.items() if g.accepted is not False]

    def precisions(self) -> list[str]:
        return sorted({g["precision"] for g in self.manifest.graphs.values()})

    def weights(self, kind: str) -> Path:
        """A model checkpoint for the torch backend (`weights/<kind>.safetensors`)."""
        p = self.folder / "weights" / f"{kind}.safetensors"
        if not p.is_file():
            raise InputError(p, "checkpoint not found in the export folder (needed by the torch backend)")
        recorded = self.manifest.extra.weights.get(kind)
        if recorded is not None and file_sha256(p) != recorded.sha256:
            raise InputError(p, "differs from the exported checkpoint (sha256 mismatch)")
        return p

    def restore_config(self) -> RestoreConfig:
        m = self.manifest
        return RestoreConfig(lam=m.lam, T=m.T, R=m.R, temperature=m.temperature, min_pool=m.min_pool,
                             avg_pool=m.avg_pool, batch=m.batch, threshold=m.threshold, detector=m.detector,
                             lam_scan_percentile=m.lam_scan_percentile, residual=m.residual,
                             contralateral=m.contralateral)

    def data_config(self) -> DataConfig:
        return from_dict(DataConfig, self.manifest.data)


def version_warnings(folder: Path, manifest: Manifest) -> list[str]:
    """A line when the export was written by another mimood version than the one running (graphs and manifest
    are checked, so it runs; but preprocessing or scoring may have changed between the versions)."""
    from mimood import __version__

    written = manifest.versions.get("mimood", "unknown")
    if written == __version__:
        return []
    return [f"{folder}: exported by mimood {written}, running mimood {__version__}: results may differ from "
            f"that version's (re-export the run with this version to be sure)"]


def _base(key: str) -> str:
    """Manifest graph key -> loop step ("atd.fp16" -> "atd")."""
    return key.split(".")[0]
