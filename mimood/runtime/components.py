"""Connected components of a scan's mask: the size filter and the per-scan lesion statistics.

The mask (map > calibrated threshold) is split into connected components (scipy.ndimage.label, 26-connected by
default: voxels touching by a face, an edge or a corner belong together); components smaller than `min_ml` are
dropped from the mask and from the statistics.

MIN_COMPONENT_ML = 0.5 ml by default: about a sphere of 1 cm diameter, or 8 slices of one 8 x 8 mm token. The map's
resolution is one token (8 x 8 mm in-plane) smoothed, so smaller flagged specks are below what the model resolves
and are, on the demo and BraTS maps, mostly partial-volume edges and noise. Set it to 0 to keep every voxel.

Per scan (`LesionStats`, the report.csv columns in STAT_COLUMNS with their units):
    components           components of at least min_ml
    flagged_ml           their total volume
    largest_ml           the largest one's volume
    largest_r/a/s_mm     its centroid in world millimetres: the input's affine applied to the voxel centroid
                         (nibabel's RAS+ convention: +x right, +y anterior, +z superior)
    largest_slice_first/last   its first and last slice in the INPUT's voxel grid, along `slice_axis`
    slice_axis           the input voxel axis (0, 1, 2 = i, j, k) closest to superior-inferior
    removed_components / removed_ml   what the size filter dropped
Volumes use the input's voxel volume |det(affine[:3, :3])|, so anisotropic and oblique grids are measured right.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MIN_COMPONENT_ML = 0.5     # components smaller than this are dropped (module docstring)
CONNECTIVITY = 3           # scipy.ndimage.generate_binary_structure(3, c): 1 = 6, 2 = 18, 3 = 26 neighbours

STAT_COLUMNS: dict[str, tuple[str, str]] = {          # column -> (unit, description)
    "components": ("count", "connected components of the mask of at least min_component_ml"),
    "flagged_ml": ("ml", "total volume of those components"),
    "largest_ml": ("ml", "volume of the largest component"),
    "largest_r_mm": ("mm", "largest component's centroid, world x (RAS+: + is toward the patient's right)"),
    "largest_a_mm": ("mm", "largest component's centroid, world y (RAS+: + is anterior)"),
    "largest_s_mm": ("mm", "largest component's centroid, world z (RAS+: + is superior)"),
    "largest_slice_first": ("voxel index", "largest component's first slice in the input grid, along slice_axis"),
    "largest_slice_last": ("voxel index", "largest component's last slice in the input grid, along slice_axis"),
    "slice_axis": ("axis", "input voxel axis closest to superior-inferior: 0, 1, 2 (i, j, k)"),
    "removed_components": ("count", "components smaller than min_component_ml, dropped from the mask"),
    "removed_ml": ("ml", "their total volume"),
    "min_component_ml": ("ml", "the size filter's minimum component volume"),
}


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml: |det(affine[:3, :3])| mm^3 / 1000."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def superior_axis(affine: np.ndarray) -> tuple[int, bool]:
    """(the voxel axis closest to superior-inferior, whether its index grows toward superior), from nibabel's
    orientation of the axes (the same rule that reorients a volume to RAS in mimood.data.preprocess)."""
    from nibabel.orientations import io_orientation   # here, not at the top: mimood-infer --help stays light

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))            # [3, 2]: (RAS axis, +-1) per voxel axis
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return axis, bool(ornt[axis, 1] > 0)


def label_components(mask: np.ndarray, ml_per_voxel: float, min_ml: float = MIN_COMPONENT_ML,
                     connectivity: int = CONNECTIVITY) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Components of bool mask [X, Y, Z] of at least min_ml: (labels int32 [X, Y, Z], 0 = none and 1..n by
    decreasing size (ties: first in scan order), voxel counts [n], removed count, removed ml)."""
    from scipy import ndimage                          # here, not at the top: mimood-infer --help stays light

    structure = ndimage.generate_binary_structure(3, connectivity)
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=structure)
    if n == 0:
        return labels.astype(np.int32), np.zeros(0, np.int64), 0, 0.0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]              # [n] voxels per component
    keep = sizes * ml_per_voxel >= min_ml - 1e-12
    order = np.argsort(-sizes, kind="stable")
    order = order[keep[order]]                                           # kept components, largest first
    relabel = np.zeros(n + 1, np.int32)
    relabel[order + 1] = np.arange(1, len(order) + 1, dtype=np.int32)
    removed = sizes[~keep]
    return relabel[labels], sizes[order], int(removed.size), float(removed.sum() * ml_per_voxel)


@dataclass
class LesionStats:
    """One scan's component statistics (module docstring); None where there is no component."""
    components: int
    flagged_ml: float
    largest_ml: float | None
    largest_r_mm: float | None
    largest_a_mm: float | None
    largest_s_mm: float | None
    largest_slice_first: int | None
    largest_slice_last: int | None
    slice_axis: int
    removed_components: int
    removed_ml: float
    min_component_ml: float

    def row(self, digits: int = 3) -> dict:
        """The report.csv columns (STAT_COLUMNS), floats rounded to `digits`."""
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}


def lesion_stats(mask: np.ndarray, affine: np.ndarray, min_ml: float = MIN_COMPONENT_ML,
                 connectivity: int = CONNECTIVITY) -> tuple[np.ndarray, LesionStats]:
    """(the filtered mask, bool [X, Y, Z], and its LesionStats) of a mask on a grid with this affine."""
    affine = np.asarray(affine, dtype=np.float64)
    ml = voxel_ml(affine)
    labels, sizes, removed, removed_ml = label_components(mask, ml, min_ml, connectivity)
    axis, _ = superior_axis(affine)
    stats = LesionStats(len(sizes), float(sizes.sum() * ml), None, None, None, None, None, None, axis, removed,
                        removed_ml, float(min_ml))
    if len(sizes):
        voxels = np.argwhere(labels == 1)                                 # [n, 3] voxel indices of the largest
        centre = affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3]      # world mm
        stats.largest_ml = float(sizes[0] * ml)
        stats.largest_r_mm, stats.largest_a_mm, stats.largest_s_mm = (float(c) for c in centre)
        stats.largest_slice_first = int(voxels[:, axis].min())
        stats.largest_slice_last = int(voxels[:, axis].max())
    return labels > 0, stats
