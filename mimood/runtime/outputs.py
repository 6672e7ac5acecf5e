"""What `mimood-infer` writes for a scan, and the folder-level report and provenance.

Per scan `<name>` (the input file name without .nii[.gz]), every file written atomically (temporary name,
renamed when complete, so a killed run leaves no half-written file):
    <name>.nii[.gz]      float32 anomaly map on the input's grid, with its affine and header
    <name>_mask.nii.gz   uint8 mask: map > the manifest's calibrated threshold (not written without one)
    <name>.png           the most anomalous axial slices: input in grey, map as a heat overlay, mask contour

The map's values lie in [0, 1]: the smoothed |restoration - input| of slices scaled to [0, 1] (mimood.restore), put
back on the input grid by linear interpolation (which stays inside [0, 1]); 0 outside the brain and on slices that
were not restored. Its header says so (`map_header`): descrip "mimood <version> anomaly map [0,1]; scan score
<score name>", and the display window cal_min/cal_max = [threshold, 2 x threshold] (the upper half of the overlay
PNG's colour bar: a viewer that hides an overlay below cal_min, as NiiVue and MRIcroGL do, shows the flagged voxels
only, graded), or [0, 1] without a threshold. The mask's descrip names the threshold; its window is [0, 1].

report.csv's scan score: the export's OOD score (`manifest.scan_score`, e.g. "vim": MVTM-feature scores fitted on
healthy scans, mimood.ood.runtime) when it has one; else the anomaly-map score. The anomaly-map score is always
its own column `map_score`: the mean of the top 1% of anomaly-map values inside the brain, over the processed
slices at 1 mm (slice space, so scans of any voxel size are scored on the same grid). `score_name` says which
score `scan_score` is: "ood.<name>" or "map".
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np

from mimood import __version__
from mimood.data.io import atomic_write, save_nifti
from mimood.data.preprocess import Slices, to_volume

SCORE_TOP_SHARE = 0.01       # scan score: mean of the top 1% of in-brain map values
OVERLAY_SLICES = 4           # slices shown in the PNG


@dataclass
class Row:
    """One line of report.csv."""
    file: str                      # the input file
    status: str                    # "ok" or "failed"
    error: str = ""                # one line when failed
    scan_score: float | None = None     # the OOD score when the export has one, else = map_score
    score_name: str = ""                # "ood.<name>" or "map"
    map_score: float | None = None      # top-1% mean of the anomaly map inside the brain
    anomalous_ml: float | None = None   # mask voxels x voxel volume (empty without a threshold)
    slices: int = 0                # slices restored
    seconds: float = 0.0           # preprocessing + this scan's share of the batches + writing
    backend: str = ""              # engine detail, e.g. "ort fp32 CPUExecutionProvider"
    warnings: str = ""             # what the reader warned about ("; "-joined), e.g. not skull-stripped


def scan_score(maps: np.ndarray, brain: np.ndarray) -> float:
    """Mean of the top 1% of maps [S,H,W] values where brain [S,H,W] (bool); 0 for a scan without brain."""
    from mimood.ood.scan import topk_mean  # the project's one top-k rule

    values = maps[brain]
    return topk_mean(values, SCORE_TOP_SHARE) if values.size else 0.0


def output_paths(out: Path, name: str, image: Path) -> dict[str, Path]:
    """The files written for a case: map (with the input's own suffix), mask and png."""
    suffix = ".nii.gz" if image.name.lower().endswith(".nii.gz") else ".nii"
    return {"map": out / f"{name}{suffix}", "mask": out / f"{name}_mask.nii.gz", "png": out / f"{name}.png"}


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


def write_scan(paths: dict[str, Path], name: str, slices: Slices, maps: np.ndarray,
               threshold: float | None, score_name: str = "map") -> tuple[float, float | None]:
    """Write a scan's map, mask (when `threshold` is set) and overlay; returns (map score, anomalous ml).
    `score_name`: the scan score's name for the map's descrip."""
    score = scan_score(maps, slices.brain)
    vol = to_volume(maps, slices.geometry)                                  # float32 on the input grid
    data = np.asarray(vol.dataobj, dtype=np.float32)                        # [X, Y, Z]
    save_nifti(data, vol.affine, map_header(vol, threshold, score_name), paths["map"])
    ml = None
    if threshold is not None:
        mask = (data > threshold).astype(np.uint8)
        save_nifti(mask, vol.affine, map_header(vol, threshold, mask=True), paths["mask"], dtype=np.uint8)
        ml = float(mask.sum()) * abs(float(np.linalg.det(vol.affine[:3, :3]))) / 1000.0
    write_overlay(paths["png"], name, slices, maps, threshold, score)
    return score, ml


def overlay_slices(brain: np.ndarray, maps: np.ndarray, threshold: float | None, n: int = OVERLAY_SLICES
                   ) -> np.ndarray:
    """Indices of the n slices to show, in slice order: the largest flagged area inside the brain (the in-brain
    map mass without a threshold), ties by the peak. Not the peak alone: the first and last slices of a brain,
    a few pixels of partial volume, can peak higher than a lesion and would push it out of the picture."""
    inside = np.where(brain, maps, 0)                                         # [S, H, W]
    area = (inside > threshold).sum(axis=(1, 2)) if threshold is not None else inside.sum(axis=(1, 2))
    order = np.lexsort((-inside.max(axis=(1, 2)), -area))                   # area first, then the peak
    return np.sort(order[:n])


def write_overlay(path: Path, name: str, slices: Slices, maps: np.ndarray, threshold: float | None,
                  score: float) -> None:
    """PNG of the OVERLAY_SLICES most anomalous slices, in slice order (overlay_slices); nothing without
    matplotlib (the runtime-only install; `infer_folder` says so once: runtime.overlay.NO_MATPLOTLIB)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimood.runtime.overlay import missing_glyphs_quiet

    pick = overlay_slices(slices.brain, maps, threshold)
    vmax = max(float(maps.max()), 1e-6)
    fig, axes = plt.subplots(1, len(pick), figsize=(2.8 * len(pick), 3.2), squeeze=False)
    for ax, i in zip(axes[0], pick):
        ax.imshow(slices.images[i], cmap="gray", vmin=0, vmax=1)
        ax.imshow(maps[i], cmap="inferno", vmin=0, vmax=vmax,
                  alpha=0.75 * np.clip(maps[i] / vmax, 0, 1))                # opaque where anomalous
        if threshold is not None and (maps[i] > threshold).any():
            ax.contour(maps[i] > threshold, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"slice {slices.index[i]}", fontsize=9)
        ax.axis("off")
    mask_note = "" if threshold is not None else " (no calibrated threshold: no mask)"
    fig.suptitle(f"{name}: map score {score:.4f}{mask_note}", fontsize=10)
    with missing_glyphs_quiet():                                              # the text is drawn here
        fig.tight_layout()
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


COLUMNS = [f.name for f in fields(Row)]

ROW_COLUMNS: dict[str, tuple[str, str]] = {            # column -> (unit, description), for the sidecar
    "file": ("path", "the input scan"),
    "status": ("", "ok or failed"),
    "error": ("", "why the scan failed, one line"),
    "scan_score": ("", "the scan score: the OOD score when the export has one, else = map_score"),
    "score_name": ("", "which score scan_score is: ood.<name> or map"),
    "map_score": ("map value in [0, 1]", "mean of the top 1% of in-brain anomaly-map values, on the 1 mm slices"),
    "anomalous_ml": ("ml", "mask voxels (map > threshold) x voxel volume, before any component filter"),
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


def write_report(path: Path, rows: list[Row]) -> None:
    """report.csv, rewritten whole (atomically) after each scan: it always lists every scan done so far."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_report(path: Path) -> list[Row]:
    """Rows of an existing report ([] when there is none or it is not one of ours)."""
    try:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    except OSError:
        return []
    if not records or set(records[0]) not in (set(COLUMNS), set(COLUMNS) - {"warnings"}):   # (before warnings)
        return []
    def num(v: str) -> float | None:
        return float(v) if v else None

    try:
        return [Row(d["file"], d["status"], d["error"], num(d["scan_score"]), d["score_name"], num(d["map_score"]),
                    num(d["anomalous_ml"]), int(d["slices"] or 0), float(d["seconds"] or 0), d["backend"],
                    d.get("warnings", ""))
                for d in records]
    except (TypeError, ValueError):                 # a hand-edited or foreign file: start afresh
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
