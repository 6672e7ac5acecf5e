"""A volume -> 160 x 160 axial slices in [0, 1], and the exact way back.

Forward (`preprocess`), each step undone by `to_volume` in reverse order:
1. reorient to RAS with nibabel (a pure axis permutation/flip: exact);
2. only if the voxel size differs from `cfg.spacing` (by > 1e-3 mm): resample to isotropic
   `cfg.spacing` with nibabel/scipy, keeping the scan's own (possibly oblique) direction cosines, so
   the way back is a per-axis scaling, never a rotation;
3. brain = non-zero voxels of the skull-stripped input; intensities clipped at the `clip_high`
   percentile of brain voxels (and `clip_low`, when > 0) and scaled to [0, 1], background exactly 0;
4. one size x size in-plane window centred on the brain's bounding box over the whole volume (the
   same offsets for every slice; zero padding where the window leaves the grid);
5. axial slices with at least `min_brain_fraction` brain are kept.

Slices are laid out for display: row 0 is anterior, column 0 is the patient's left (neurological
view), so `plt.imshow(slices.images[i])` shows the usual axial picture and a left-right flip is a
flip of the last axis.
"""
from __future__ import annotations

import base64
import bz2
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from nibabel.processing import resample_from_to

from mimood.config import DataConfig
from mimood.data.header import INVALID, MAX_VOXELS, check_affine, nibabel_messages
from mimood.data.io import check_volume, load_volume
from mimood.errors import InputError

_RAS = axcodes2ornt("RAS")
BRAIN_FLOOR = 1e-3        # the smallest normalised value of a brain voxel


@dataclass
class Geometry:
    """Everything `to_volume` needs to put slice-space maps back on the input grid (plain JSON data)."""
    source: str                          # the input file ("<image>" for an in-memory image)
    shape: list[int]                     # input volume shape
    affine: list[list[float]]            # input affine (nibabel's best affine: sform, else qform)
    header: str                          # input NIfTI-1 header block, base64 (qform/sform, codes, units)
    ornt: list[list[float]]              # nibabel orientation of the input axes relative to RAS
    canonical_shape: list[int]           # shape after reorientation to RAS
    canonical_affine: list[list[float]]
    resampled: bool                      # True when the RAS volume was resampled to cfg.spacing
    grid_shape: list[int]                # the grid slices are cut from (== canonical unless resampled)
    grid_affine: list[list[float]]
    crop: list[int]                      # [x0, y0]: grid voxel at the window's first row/col (may be < 0)
    size: int                            # window size (160)
    index: list[int]                     # kept slices: indices along the grid's superior axis
    intensity: list[float]               # [low, high] input values mapped to 0 and 1
    brain: str                           # input-grid brain mask: np.packbits -> bz2 -> base64 (~20 kB)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(**d)

    def brain_mask(self) -> np.ndarray:
        """The input's brain mask (non-zero voxels) on the input grid, bool [X, Y, Z]."""
        bits = np.frombuffer(bz2.decompress(base64.b64decode(self.brain)), dtype=np.uint8)
        n = int(np.prod(self.shape))
        return np.unpackbits(bits, count=n).astype(bool).reshape(self.shape)


@dataclass
class Slices:
    images: np.ndarray                   # [S, 160, 160] float32 in [0, 1], background exactly 0
    brain: np.ndarray                    # [S, 160, 160] bool, brain mask (non-zero voxels of the input)
    index: np.ndarray                    # [S] int, slice index along the canonical superior axis
    geometry: Geometry
    labels: np.ndarray | None = None     # [S, 160, 160] bool (label > 0) when a label volume was given
    lesion_distance: np.ndarray | None = None  # [S] mm from each slice to the nearest labelled voxel


def preprocess(image: nib.Nifti1Image | str | Path, cfg: DataConfig,
               label: nib.Nifti1Image | str | Path | None = None,
               keep_all_slices: bool = False) -> Slices:
    """Cut a volume (and its optional label volume) into normalised 160 x 160 axial slices."""
    img, source = _load(image, allow_zero=False)
    data = img.get_fdata(dtype=np.float32)
    affine = img.affine
    ornt = io_orientation(affine)
    canonical_affine = affine @ inv_ornt_aff(ornt, data.shape)
    canonical = np.ascontiguousarray(apply_orientation(data, ornt))
    grid_shape, grid_affine, resampled = _target_grid(canonical.shape, canonical_affine, cfg.spacing, source)

    brain_in = data != 0
    vol, brain = canonical, canonical != 0
    if resampled:
        vol = _resample(canonical, canonical_affine, grid_shape, grid_affine, order=1)
        brain = _resample(brain.astype(np.float32), canonical_affine, grid_shape, grid_affine, order=1) >= 0.5
        if not brain.any():
            raise InputError(source, "no brain voxel left after resampling (volume too small?)")
    vol, low, high = normalise(vol, brain, cfg, source)

    size = cfg.size
    x0, y0 = _crop_start(brain, size)
    win_img, win_brain = _window(vol, x0, y0, size), _window(brain, x0, y0, size)  # [size, size, Z]
    fraction = win_brain.sum(axis=(0, 1)) / float(size * size)
    index = np.arange(vol.shape[2]) if keep_all_slices else np.flatnonzero(fraction >= cfg.min_brain_fraction)
    if index.size == 0:
        raise InputError(source, f"no axial slice has {cfg.min_brain_fraction:.0%} brain in the "
                                 f"{size} x {size} window (brain too small or mostly empty volume)")

    geometry = Geometry(
        source=source, shape=[int(n) for n in data.shape], affine=affine.tolist(),
        header=base64.b64encode(img.header.binaryblock).decode("ascii"),
        ornt=ornt.tolist(), canonical_shape=list(canonical.shape), canonical_affine=canonical_affine.tolist(),
        resampled=resampled, grid_shape=list(grid_shape), grid_affine=grid_affine.tolist(),
        crop=[x0, y0], size=size, index=index.tolist(), intensity=[low, high],
        brain=base64.b64encode(bz2.compress(np.packbits(brain_in).tobytes())).decode("ascii"))
    out = Slices(images=_to_display(win_img[:, :, index]).astype(np.float32),
                 brain=_to_display(win_brain[:, :, index]), index=index, geometry=geometry)
    if label is not None:
        out.labels, out.lesion_distance = _labels(label, img, source, ornt, canonical_affine, grid_shape,
                                                  grid_affine, resampled, x0, y0, size, index)
    return out


def normalise(vol: np.ndarray, brain: np.ndarray, cfg: DataConfig, source: str = "<image>"
              ) -> tuple[np.ndarray, float, float]:
    """Clip brain intensities to [P_low, P_high] and scale to [0, 1]; background 0.

    clip_low = 0 (the paper): values are divided by P_high. clip_low > 0 (the authors' code used 2): min-max
    scaling from P_low. Either way brain voxels are at least BRAIN_FLOOR, so negative or floor-clipped voxels of a
    raw scan stay brain.
    """
    values = vol[brain]
    high = float(np.percentile(values, cfg.clip_high))
    low = float(np.percentile(values, cfg.clip_low)) if cfg.clip_low > 0 else 0.0
    if not high > low or values.min() == values.max():
        raise InputError(source, f"brain intensities have no range to normalise (P{cfg.clip_low:g} = "
                                 f"{low:g}, P{cfg.clip_high:g} = {high:g}, min = max? is this a mask?)")
    out = (np.clip(vol, low, high) - low) / (high - low)
    # a brain voxel stays brain (> 0) even where a raw, unclipped skull-stripped scan has values <= the floor
    # (negative voxels inside the brain): else it would read as background, a hole in the slice
    out = np.where(brain, np.maximum(out, BRAIN_FLOOR), 0.0)
    return out.astype(np.float32), low, high


def to_volume(maps: np.ndarray, geometry: Geometry, order: int = 1) -> nib.Nifti1Image:
    """Slice-space maps [S, size, size] (same order as `Slices.images`) -> float32 NIfTI on the input grid.

    The result has the input's shape, affine and header; it is 0 outside the crop window, on skipped
    slices and outside the input's brain. `order=0` for label/mask maps, 1 for continuous maps.
    """
    g = geometry
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape != (len(g.index), g.size, g.size):
        raise ValueError(f"maps of shape {maps.shape} do not match the geometry "
                         f"({len(g.index)} slices of {g.size} x {g.size})")
    window = np.zeros((g.size, g.size, g.grid_shape[2]), dtype=np.float32)
    window[:, :, g.index] = _from_display(maps)
    vol = _unwindow(window, g.crop[0], g.crop[1], g.grid_shape)
    if g.resampled:
        vol = _resample(vol, np.array(g.grid_affine), g.canonical_shape, np.array(g.canonical_affine), order)
    ornt = np.array(g.ornt)
    vol = apply_orientation(vol, ornt_transform(_RAS, ornt))
    vol = np.where(g.brain_mask(), vol, 0).astype(np.float32)

    header = nib.Nifti1Header(binaryblock=base64.b64decode(g.header))
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)
    return nib.Nifti1Image(vol, np.array(g.affine), header)


def _load(image, allow_zero: bool) -> tuple[nib.Nifti1Image, str]:
    if isinstance(image, (str, Path)):
        return load_volume(image, allow_zero=allow_zero), str(image)
    source = image.get_filename() or "<image>"
    check_affine(image.affine, source)
    data = check_volume(image.get_fdata(dtype=np.float32), source, allow_zero=allow_zero)
    with nibabel_messages(None):            # a NIfTI-2 header's fields are checked against NIfTI-1's here
        header = nib.Nifti1Header.from_header(image.header)
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)
    return nib.Nifti1Image(data, image.affine, header), source


def _target_grid(shape, affine: np.ndarray, spacing: float, source: str = "<image>"
                 ) -> tuple[tuple[int, ...], np.ndarray, bool]:
    """The isotropic grid covering the same field of view with the same direction cosines; an `InputError` when
    that grid would exceed `MAX_VOXELS` (voxel sizes that are plausible one by one, but not for this grid)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.all(np.abs(zooms - spacing) <= 1e-3):
        return tuple(shape), affine, False
    n = np.asarray(shape, dtype=float)
    new_shape = np.maximum(1, np.round(n * zooms / spacing)).astype(int)
    if float(np.prod(new_shape.astype(float))) > MAX_VOXELS:
        raise InputError(source, f"{INVALID} ({' x '.join(f'{z:.3g}' for z in zooms)} mm voxels: a field of view "
                                 f"of {' x '.join(f'{f:.0f}' for f in n * zooms)} mm, {spacing:g} mm resampling "
                                 f"would need more than {MAX_VOXELS} voxels)")
    new_affine = np.eye(4)
    new_affine[:3, :3] = affine[:3, :3] / zooms * spacing
    centre = affine[:3, :3] @ ((n - 1) / 2) + affine[:3, 3]   # the two grids share their centre
    new_affine[:3, 3] = centre - new_affine[:3, :3] @ ((new_shape - 1) / 2)
    return tuple(int(s) for s in new_shape), new_affine, True


def _resample(vol: np.ndarray, affine: np.ndarray, shape, to_affine: np.ndarray, order: int) -> np.ndarray:
    """nibabel's resampling (scipy.ndimage) of `vol` onto (shape, to_affine); edges extended, not zeroed."""
    out = resample_from_to(nib.Nifti1Image(vol.astype(np.float32), affine), (tuple(shape), to_affine),
                           order=order, mode="nearest")
    return np.asarray(out.dataobj, dtype=np.float32)


def _crop_start(brain: np.ndarray, size: int) -> tuple[int, int]:
    """First grid voxel (x0, y0) of the size x size window centred on the brain's in-plane bounding box."""
    starts = []
    for axis in (0, 1):
        hit = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        starts.append(int((hit[0] + hit[-1] + 1 - size) // 2))
    return starts[0], starts[1]


def _overlap(start: int, size: int, n: int) -> tuple[slice, slice]:
    """(window slice, grid slice) of the part of [start, start + size) inside [0, n)."""
    lo, hi = max(start, 0), min(start + size, n)
    if hi <= lo:
        return slice(0, 0), slice(0, 0)
    return slice(lo - start, hi - start), slice(lo, hi)


# Cropping and padding by index arithmetic rather than MONAI SpatialCrop/SpatialPad: the window may
# overhang the grid on any side, and its exact inverse (`_unwindow`) must reuse the same offsets.
def _window(vol: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """[X, Y, Z] -> [size, size, Z]: the window starting at (x0, y0), zero where it leaves the grid."""
    out = np.zeros((size, size, vol.shape[2]), dtype=vol.dtype)
    (wx, gx), (wy, gy) = _overlap(x0, size, vol.shape[0]), _overlap(y0, size, vol.shape[1])
    out[wx, wy] = vol[gx, gy]
    return out


def _unwindow(window: np.ndarray, x0: int, y0: int, shape) -> np.ndarray:
    """Inverse of `_window`: [size, size, Z] -> [X, Y, Z] grid, zero outside the window."""
    out = np.zeros(tuple(shape), dtype=window.dtype)
    size = window.shape[0]
    (wx, gx), (wy, gy) = _overlap(x0, size, shape[0]), _overlap(y0, size, shape[1])
    out[gx, gy] = window[wx, wy]
    return out


def _to_display(win: np.ndarray) -> np.ndarray:
    """[X, Y, S] RAS window -> [S, rows = anterior..posterior, cols = left..right]."""
    return np.ascontiguousarray(np.transpose(win, (2, 1, 0))[:, ::-1, :])


def _from_display(maps: np.ndarray) -> np.ndarray:
    """Inverse of `_to_display`: [S, rows, cols] -> [X, Y, S]."""
    return np.transpose(maps[:, ::-1, :], (2, 1, 0))


def _labels(label, img, source, ornt, canonical_affine, grid_shape, grid_affine, resampled, x0, y0, size,
            index) -> tuple[np.ndarray, np.ndarray]:
    """Label slices (label > 0) cut exactly like the image, and each kept slice's distance to the lesion."""
    lab, lab_source = _load(label, allow_zero=True)
    if lab.shape != img.shape:
        raise InputError(lab_source, f"label grid {' x '.join(map(str, lab.shape))} does not match the "
                                     f"image grid {' x '.join(map(str, img.shape))} of {source}")
    if not np.allclose(lab.affine, img.affine, atol=1e-3):
        raise InputError(lab_source, f"label affine differs from the affine of {source}")
    mask = np.ascontiguousarray(apply_orientation(lab.get_fdata(dtype=np.float32) > 0, ornt))
    if resampled:
        mask = _resample(mask.astype(np.float32), canonical_affine, grid_shape, grid_affine, order=1) >= 0.5
    labelled = np.flatnonzero(mask.any(axis=(0, 1)))
    if labelled.size:
        dz = float(np.sqrt((grid_affine[:3, 2] ** 2).sum()))   # mm between axial slices
        distance = np.abs(index[:, None] - labelled[None, :]).min(axis=1) * dz
    else:
        distance = np.full(index.shape, np.inf)
    return _to_display(_window(mask, x0, y0, size)[:, :, index]), distance.astype(np.float64)
