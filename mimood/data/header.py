"""What a NIfTI header must say before its data is read or its geometry used.

- `declared_size`: the bytes the header says the file holds (data offset + voxels x item size), refused when the
  header asks for more than any brain MRI volume needs (`MAX_VOXELS`) or for an absurd data offset. The reader
  (`mimood.data.io`) inflates only that much, so a gzip bomb is refused before anything large is allocated.
- `check_geometry` / `check_affine`: every form a reader may use (nibabel's best affine, and the qform and sform
  whenever their code says they are valid) must be finite, invertible, with plausible voxel sizes
  (`VOXEL_MM`) and axes that map onto distinct anatomical directions, so reorientation and resampling cannot
  fail later. All of these are "invalid affine/voxel size" `InputError`s naming the file.
- `nibabel_messages`: nibabel logs header repairs ("pixdim[1,2,3] should be positive; setting to abs of pixdim
  values") straight to stderr; inside this context they become `InputWarning`s that name the file instead.
"""
from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from nibabel.imageglobals import logger as _nib_logger

from mimood.errors import InputError, InputWarning

MAX_VOXELS = 512 ** 3          # 134 M voxels: a 0.5 mm whole head is 400 x 480 x 400 = 77 M
MAX_DATA_OFFSET = 64 << 20     # header + extensions: CIFTI XML reaches a few MB, nothing real 64 MiB
VOXEL_MM = (1e-2, 50.0)        # plausible voxel sizes in mm: 10 um (ex-vivo) to 50 mm (an absurd slab)
MIN_AXIS_SINE = 0.1            # |det| of the unit voxel axes: below this two axes are nearly parallel
INVALID = "invalid affine/voxel size"


def declared_size(header, path: str | Path, max_voxels: int = MAX_VOXELS) -> tuple[int, int]:
    """(data offset, total bytes) the header declares; `InputError` for a size no brain volume needs."""
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = int(header.get_data_dtype().itemsize)
        offset = int(header.get_data_offset())
    except Exception as e:  # nibabel raises several types for fields it cannot interpret
        raise InputError(path, f"not a readable NIfTI header ({e})") from None
    voxels = math.prod(shape)                      # Python ints: NIfTI-2 dims reach 2^63
    if voxels > max_voxels:
        raise InputError(path, f"header declares {' x '.join(map(str, shape))} = {voxels} voxels, more than the "
                               f"{max_voxels} a brain MRI volume can need (damaged header or not a brain scan?)")
    if not 0 <= offset <= MAX_DATA_OFFSET:
        raise InputError(path, f"header declares its data at byte {offset} (damaged header?)")
    return offset, offset + voxels * itemsize


def check_geometry(header, path: str | Path, raw_header=None) -> np.ndarray:
    """nibabel's best affine of `header` (sform, else qform, else pixdim), after checking it and every form
    whose code marks it valid (`check_affine`). Returns the affine [4, 4] float64.

    `raw_header`: the same header parsed with `check=False`. nibabel quietly repairs a zero voxel size to 1 mm
    when it parses a header; where pixdim feeds an affine (qform, or no sform) such a size is refused instead.
    """
    if raw_header is not None and (int(raw_header["qform_code"]) > 0 or int(raw_header["sform_code"]) <= 0):
        pixdim = np.asarray(raw_header["pixdim"][1:4], dtype=np.float64)
        if not (np.isfinite(pixdim) & (pixdim != 0)).all():
            raise InputError(path, f"{INVALID} (pixdim[1..3] = {_mm(pixdim)})")
    forms = []
    for name, code_key, get in (("sform", "sform_code", header.get_sform), ("qform", "qform_code", header.get_qform)):
        if int(header[code_key]) > 0:
            try:
                forms.append((name, get()))
            except Exception as e:  # an impossible quaternion: "w2 should be positive" (ValueError)
                raise InputError(path, f"{INVALID} ({name}: {e})") from None
    try:
        best = header.get_best_affine()
    except Exception as e:
        raise InputError(path, f"{INVALID} ({e})") from None
    for name, affine in forms + [("affine", best)]:
        check_affine(affine, path, name)
    return np.asarray(best, dtype=np.float64)


def check_affine(affine, path: str | Path, what: str = "affine") -> None:
    """`InputError(path, "invalid affine/voxel size (...)")` unless `affine` [4, 4] is finite, its voxel sizes
    (column norms) lie in `VOXEL_MM` and its three axes span space well (`MIN_AXIS_SINE`)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(path, f"{INVALID} ({what} has NaN/Inf entries)" if a.shape == (4, 4)
                         else f"{INVALID} ({what} of shape {a.shape})")
    zooms = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if not ((zooms >= VOXEL_MM[0]) & (zooms <= VOXEL_MM[1])).all():
        raise InputError(path, f"{INVALID} ({what} gives voxel sizes {_mm(zooms)} mm, expected "
                               f"{VOXEL_MM[0]:g} to {VOXEL_MM[1]:g} mm)")
    sine = abs(np.linalg.det(a[:3, :3] / zooms))
    if not sine >= MIN_AXIS_SINE:
        raise InputError(path, f"{INVALID} ({what} is singular or nearly so: its voxel axes are almost "
                               f"coplanar, |det| of the unit axes {sine:.2g})")


def _mm(zooms) -> str:
    return " x ".join(f"{z:.3g}" for z in zooms)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def nibabel_messages(path: str | Path | None) -> Iterator[None]:
    """Inside: nibabel's header-repair log lines become `InputWarning("<path>: header: <message>")` instead of
    lines on stderr (dropped when `path` is None: for headers mimood converts itself, e.g. NIfTI-2 -> NIfTI-1).

    nibabel writes them through its own logger with a stderr handler (nibabel.imageglobals); the handlers are
    swapped for the duration and restored after, so nibabel behaves as before outside this context.
    """
    collect = _Collect()
    saved, propagate = _nib_logger.handlers[:], _nib_logger.propagate
    _nib_logger.handlers[:] = [collect]
    _nib_logger.propagate = False
    try:
        yield
    finally:
        _nib_logger.handlers[:] = saved
        _nib_logger.propagate = propagate
        for message in dict.fromkeys(collect.messages) if path is not None else ():   # once each, in order
            warnings.warn(InputWarning(path, f"header: {message}"), stacklevel=3)
