"""What `mimood-infer` writes for a scan, and the folder-level report (report.csv and its column sidecar).

Per scan `<name>` (the input file name without .nii[.gz]), every file written atomically (temporary name,
renamed when complete, so a killed run leaves no half-written file):
    <name>.nii[.gz]      float32 anomaly map on the input's grid, with its affine and header
    <name>_mask.nii.gz   uint8 mask: map > the manifest's calibrated threshold, after the connected-component
                         filter (mimood.runtime.components: components under --min-component-ml are dropped);
                         not written without a threshold
    <name>.png           the overlay (mimood.runtime.overlay)
    viewer/<name>.js     the scan and the map for index.html's viewer (mimood.runtime.html_report)

The map's values lie in [0, 1]: the smoothed |restoration - input| of slices scaled to [0, 1] (mimood.restore), put
back on the input grid by linear interpolation (which stays inside [0, 1]); 0 outside the brain and on slices that
were not restored. Its header says so (`map_header`): descrip "mimood <version> anomaly map [0,1]; scan score
<score name>", and the display window cal_min/cal_max = [threshold, 2 x threshold] (the upper half of the overlay
PNG's colour bar: a viewer that hides an overlay below cal_min, as NiiVue and MRIcroGL do, shows the flagged voxels
only, graded), or [0, 1] without a threshold. The mask's descrip names the threshold; its window is [0, 1].

report.csv, one row per scan (`Row`; report.columns.json describes every column with its unit, `columns_sidecar`):
    scan_score      the calibrated scan score in [0, 1]: the raw score against the export's healthy reference
                    scans (mimood.runtime.reference); empty when the export has no reference for the raw score
    raw_score       the raw scan score: the export's OOD score (`manifest.scan_score`, e.g. "mirror": MVTM-feature
                    scores fitted on healthy scans, mimood.runtime.ood) when it has one, else the map score
    score_name      which score raw_score is: "ood.<name>" or "map"
    reference_scans how many healthy reference scans calibrate it
    map_score       always: the mean of the top 1% of anomaly-map values inside the brain, over the processed slices
                    at 1 mm (slice space, so scans of any voxel size are scored on the same grid)
    components ... min_component_ml   the lesion statistics of the filtered mask (components.STAT_COLUMNS)
    slices, seconds, backend
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np

from mimood import __version__
from mimood.data.io import atomic_write, save_nifti
from mimood.data.preprocess import Slices, to_volume
from mimood.runtime.components import MIN_COMPONENT_ML, STAT_COLUMNS, LesionStats, lesion_stats
from mimood.runtime.reference import SCORE_COLUMNS

SCORE_TOP_SHARE = 0.01       # scan score: mean of the top 1% of in-brain map values
SIDECAR = "report.columns.json"


@dataclass
class Row:
    """One line of report.csv (module docstring); `stats` spreads into the component columns."""
    file: str                      # the input file
    status: str                    # "ok" or "failed"
    name: str = ""                 # the scan's output name: <name>.nii.gz, <name>.png (the file name without .nii[.gz])
    error: str = ""                # one line when failed
    scan_score: float | None = None     # calibrated, in [0, 1]; None without a healthy reference
    raw_score: float | None = None      # the OOD score when the export has one, else = map_score
    score_name: str = ""                # "ood.<name>" or "map"
    reference_scans: int | None = None  # healthy reference scans behind scan_score
    map_score: float | None = None      # top-1% mean of the anomaly map inside the brain
    stats: LesionStats | None = None    # the filtered mask's components (None without a threshold)
    slices: int = 0                # slices restored
    seconds: float = 0.0           # preprocessing + this scan's share of the batches + writing
    backend: str = ""              # engine detail, e.g. "ort fp32 CPUExecutionProvider"
    warnings: str = ""             # what the reader warned about ("; "-joined), e.g. not skull-stripped

    def record(self) -> dict:
        """The row as report.csv's columns (COLUMNS order; None where empty)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stats"}
        stats = self.stats.row() if self.stats is not None else dict.fromkeys(STATS)
        return {c: stats[c] if c in stats else d[c] for c in COLUMNS}

    @classmethod
    def from_record(cls, d: dict[str, str]) -> "Row":
        """A row read back from report.csv (strings; "" = empty)."""
        kw = {f.name: _parse(f.type, d.get(f.name, "")) for f in fields(cls) if f.name != "stats"}   # warnings: later
        stats = None
        if d["components"] != "":
            stats = LesionStats(**{f.name: _parse(f.type, d[f.name]) for f in fields(LesionStats)})
        return cls(**kw, stats=stats)


STATS = [f.name for f in fields(LesionStats)]
COLUMNS = ["file", "name", "status", "error", "scan_score", "raw_score", "score_name", "reference_scans", "map_score",
           *STATS, "slices", "seconds", "backend", "warnings"]
assert sorted(COLUMNS) == sorted([f.name for f in fields(Row) if f.name != "stats"] + STATS)


def _parse(kind: str, text: str):
    """A report.csv cell back to its field's type (annotation strings: from __future__ import annotations)."""
    if text == "":
        if "None" in kind:
            return None
        return "" if kind == "str" else {"int": 0, "float": 0.0}[kind]
    if kind.startswith("int"):
        return int(float(text))
    if kind.startswith("float"):
        return float(text)
    return text


def scan_score(maps: np.ndarray, brain: np.ndarray) -> float:
    """Mean of the top 1% of maps [S,H,W] values where brain [S,H,W] (bool); 0 for a scan without brain."""
    from mimood.ood.scan import topk_mean  # the project's one top-k rule

    values = maps[brain]
    return topk_mean(values, SCORE_TOP_SHARE) if values.size else 0.0


def output_paths(out: Path, name: str, image: Path) -> dict[str, Path]:
    """The files written for a case: map (with the input's own suffix), mask, png and viewer data."""
    suffix = ".nii.gz" if image.name.lower().endswith(".nii.gz") else ".nii"
    return {"map": out / f"{name}{suffix}", "mask": out / f"{name}_mask.nii.gz", "png": out / f"{name}.png",
            "viewer": out / "viewer" / f"{name}.js"}


def map_header(vol: nib.Nifti1Image, threshold: float | None, score_name: str = "map",
               mask: bool = False) -> nib.Nifti1Image:
    """`vol` with a header that tells the truth about the map (or its mask): descrip and display window (module
    docstring); the rest of the input's header (units, qform/sform) is kept."""
    header = vol.header.copy()
    if mask:
        rule = f"map > {threshold:.6g}" if threshold is not None else "no threshold"
        text, window = f"mimood {__version__} anomaly mask: {rule}", (0.0, 1.0)
    else:
        text = f"mimood {__version__} anomaly map [0,1]; scan score {score_name}"
        window = ((float(threshold), min(2.0 * threshold, 1.0)) if threshold is not None and 0 < threshold < 1
                  else (0.0, 1.0))
    header["descrip"] = text.encode("ascii", "replace")[:79]             # 80 bytes, NUL-terminated
    header["cal_min"], header["cal_max"] = window
    header["aux_file"] = b""                                               # the input's, not ours
    return nib.Nifti1Image(vol.dataobj, vol.affine, header)


@dataclass
class ScanMaps:
    """A restored scan on its input grid: the map (with its header), the filtered mask and their numbers."""
    volume: nib.Nifti1Image        # float32 map [X, Y, Z] in [0, 1], header from map_header
    mask: np.ndarray | None        # bool [X, Y, Z]: map > threshold after the component filter; None without one
    map_score: float
    stats: LesionStats | None      # the mask's components; None without a threshold
    threshold: float | None


def scan_maps(slices: Slices, maps: np.ndarray, threshold: float | None, score_name: str = "map",
              min_ml: float = MIN_COMPONENT_ML) -> ScanMaps:
    """Slice maps [S, H, W] -> the map on the input grid, its mask after the component filter (components of at
    least min_ml, mimood.runtime.components) and the map score."""
    vol = to_volume(maps, slices.geometry)                                  # float32 on the input grid
    data = np.asarray(vol.dataobj, dtype=np.float32)                        # [X, Y, Z]
    mask = stats = None
    if threshold is not None:
        mask, stats = lesion_stats(data > threshold, vol.affine, min_ml)
    return ScanMaps(map_header(nib.Nifti1Image(data, vol.affine, vol.header), threshold, score_name), mask,
                    scan_score(maps, slices.brain), stats, threshold)


def write_maps(paths: dict[str, Path], m: ScanMaps) -> None:
    """Write a scan's map and (with a threshold) its filtered mask."""
    save_nifti(np.asarray(m.volume.dataobj), m.volume.affine, m.volume, paths["map"])
    if m.mask is not None:
        save_nifti(m.mask.astype(np.uint8), m.volume.affine, map_header(m.volume, m.threshold, mask=True),
                   paths["mask"], dtype=np.uint8)


def write_scan(paths: dict[str, Path], slices: Slices, maps: np.ndarray, threshold: float | None,
               score_name: str = "map", min_ml: float = MIN_COMPONENT_ML) -> ScanMaps:
    """`scan_maps` + `write_maps`: the map and the filtered mask of a scan, written; returns them."""
    m = scan_maps(slices, maps, threshold, score_name, min_ml)
    write_maps(paths, m)
    return m


ROW_COLUMNS: dict[str, tuple[str, str]] = {            # column -> (unit, description), for the sidecar
    "file": ("path", "the input scan"),
    "name": ("", "the scan's output name: <name>.nii.gz (the map), <name>_mask.nii.gz, <name>.png"),
    "status": ("", "ok or failed"),
    "error": ("", "why the scan failed, one line"),
    "score_name": ("", "which score raw_score is: ood.<name> (the export's OOD score) or map (= map_score)"),
    "map_score": ("map value in [0, 1]", "mean of the top 1% of in-brain anomaly-map values, on the 1 mm slices"),
    "slices": ("count", "axial slices restored"),
    "seconds": ("s", "preprocessing + this scan's share of the batches + writing"),
    "backend": ("", "engine detail, e.g. ort fp32 CPUExecutionProvider"),
    "warnings": ("", "what reading the scan warned about (trailing data, a repaired header, not skull-stripped), "
                     "'; '-joined"),
}


def describe_columns(columns: list[str], **extra: dict[str, tuple[str, str]]) -> dict:
    """The sidecar JSON (report.columns.json) describing report.csv's columns, in order, with their units:
    {"columns": [{"name", "unit", "description"}, ...]}. Descriptions come from ROW_COLUMNS, then from the
    dicts in `extra` (e.g. stats=components.STAT_COLUMNS, score=reference.SCORE_COLUMNS; later ones win);
    a column without a description is an error, so the sidecar never omits one."""
    known = dict(ROW_COLUMNS)
    for d in extra.values():
        known.update(d)
    missing = [c for c in columns if c not in known]
    if missing:
        raise KeyError(f"report columns without a description: {', '.join(missing)}")
    return {"columns": [{"name": c, "unit": known[c][0], "description": known[c][1]} for c in columns]}


def columns_sidecar() -> dict:
    """report.columns.json: every column of report.csv with its unit (describe_columns of COLUMNS)."""
    return describe_columns(COLUMNS, stats=STAT_COLUMNS, score=SCORE_COLUMNS)


def write_report(path: Path, rows: list[Row]) -> None:
    """report.csv, rewritten whole (atomically) after each scan: it always lists every scan done so far."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.record().items()})
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_report(path: Path) -> list[Row]:
    """Rows of an existing report ([] when there is none or it is not one of ours, e.g. an older version's)."""
    try:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    except OSError:
        return []
    if not records or list(records[0]) not in (COLUMNS, COLUMNS[:-1]):     # (before the warnings column)
        return []
    try:
        return [Row.from_record(d) for d in records]
    except (TypeError, ValueError, KeyError):       # a hand-edited or foreign file: start afresh
        return []


def write_json(path: Path, obj: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def geometry_summary(slices: Slices) -> dict:
    """Per-scan provenance: the input grid and what preprocessing did to it (no voxel data)."""
    g = slices.geometry
    A = np.array(g.affine)
    return {"shape": g.shape, "voxel_mm": np.sqrt((A[:3, :3] ** 2).sum(0)).round(4).tolist(),
            "orientation": "".join(nib.aff2axcodes(A)), "resampled": g.resampled,
            "slices": len(g.index), "crop": g.crop, "intensity": g.intensity}
