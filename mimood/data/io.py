"""Reading and writing NIfTI volumes: every way a user file can be bad becomes one `InputError`.

`load_volume` reads the whole file into memory once (decompressing a `.gz` completely, so its CRC is
checked and a truncated or corrupt download is caught here rather than as garbage voxels later),
checks that it holds one finite, non-empty 3-D volume, and returns an in-memory float32 image with
the file's own affine and qform/sform.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from mimood.errors import InputError

_NIFTI_MAGIC = {348: (344, b"n+1\x00", nib.Nifti1Image), 540: (4, b"n+2\x00", nib.Nifti2Image)}


def load_volume(path: str | Path, allow_zero: bool = False) -> nib.Nifti1Image:
    """Read, validate and return one 3-D NIfTI volume as an in-memory float32 `Nifti1Image`.

    Raises `InputError(path, problem)` for: a missing or unreadable file, not a single-file NIfTI,
    truncated or corrupt gzip data, data that is not 3-D (trailing singleton dimensions are dropped),
    NaN/Inf values, and (unless `allow_zero`, as for label volumes) an all-zero volume.
    """
    path = Path(path)
    raw = _read_bytes(path)
    img = _parse_nifti(raw, path)
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as e:  # nibabel raises many types for inconsistent headers; all mean "unreadable"
        raise InputError(path, f"unreadable NIfTI data ({e})") from None
    data = check_volume(data, path, allow_zero=allow_zero)
    return _in_memory(data, img)


def check_volume(data: np.ndarray, path: str | Path, allow_zero: bool = False) -> np.ndarray:
    """Squeeze trailing singleton dims and check for one finite 3-D volume; return the 3-D array."""
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        n = int(np.prod(data.shape[3:]))
        raise InputError(path, f"{data.ndim}-D data of shape {_fmt(shape)} with {n} volumes "
                               "(expected one 3-D volume)")
    if data.ndim < 3 or 1 in data.shape:
        dims = sum(int(n) > 1 for n in data.shape)
        raise InputError(path, f"{dims}-D data of shape {_fmt(shape)} (expected a 3-D volume)")
    finite = np.isfinite(data)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        raise InputError(path, f"contains {n_nan} NaN and {n_inf} Inf values")
    if not allow_zero and not data.any():
        raise InputError(path, "all voxels are zero (empty volume)")
    return data


def _fmt(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _read_bytes(path: Path) -> bytes:
    """The file's NIfTI bytes, gunzipped (by content, not by name) with the gzip CRC checked."""
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as e:
        raise InputError(path, f"cannot read file ({e.strerror or e})") from None
    if not raw:
        raise InputError(path, "empty file")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise InputError(path, "truncated gzip data (incomplete download or copy?)") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise InputError(path, f"corrupt gzip data ({e})") from None
    elif path.name.endswith(".gz"):
        raise InputError(path, "named .gz but not gzip-compressed")
    return raw


def _parse_nifti(raw: bytes, path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Recognise a single-file NIfTI-1/2 by its header size and magic, then let nibabel parse it."""
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0] if len(raw) >= 4 else 0
        if size in _NIFTI_MAGIC:
            at, magic, klass = _NIFTI_MAGIC[size]
            if raw[at:at + 4] == magic:
                break
    else:
        raise InputError(path, "not a NIfTI file (no NIfTI-1/2 header)")
    try:
        img = klass.from_bytes(raw)
        shape, dtype = img.header.get_data_shape(), img.header.get_data_dtype()
        need = int(img.header.get_data_offset()) + int(np.prod(shape)) * dtype.itemsize
    except Exception as e:  # header fields nibabel cannot interpret
        raise InputError(path, f"not a readable NIfTI file ({e})") from None
    if len(raw) < need:
        raise InputError(path, f"truncated file ({len(raw)} bytes, the header needs {need})")
    return img


def _in_memory(data: np.ndarray, img: nib.Nifti1Image | nib.Nifti2Image) -> nib.Nifti1Image:
    """A float32 Nifti1Image holding `data`, with the source's affine, qform and sform (and codes)."""
    header = nib.Nifti1Header.from_header(img.header)
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)  # the data is already scaled
    return nib.Nifti1Image(data.astype(np.float32, copy=False), img.affine, header)  # keeps header's forms


def _copy_forms(out: nib.Nifti1Image, header, affine: np.ndarray) -> None:
    """Give `out` the qform/sform codes of `header`, both matrices set to `affine` (exactly, sform)."""
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode == 0 and scode == 0:
        scode = 2  # nibabel's default ("aligned"): without any code the affine would be lost on disk
    out.set_sform(affine, code=scode)
    out.set_qform(affine, code=qcode)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the full suffix (`.nii.gz`, `.npz`, `.png`) so that writers which pick
    the format from the name do the right thing. The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_nifti(data: np.ndarray, affine: np.ndarray, header_like: nib.Nifti1Image | None,
               path: str | Path, dtype=np.float32) -> None:
    """Write `data` (cast to `dtype`, no scaling) with exactly `affine`, atomically.

    The header (units, description, qform/sform codes) is taken from `header_like` when given, so a map
    written for an input scan opens in the same space as that scan in any viewer.
    """
    data = np.asarray(data).astype(dtype, copy=False)
    header = nib.Nifti1Header.from_header(header_like.header) if header_like is not None else None
    if header is not None:
        header.set_data_shape(data.shape)
        header.set_data_dtype(dtype)
        header.set_slope_inter(None, None)
    img = nib.Nifti1Image(data, affine, header)
    _copy_forms(img, header if header is not None else img.header, np.asarray(affine, dtype=np.float64))
    with atomic_write(path) as tmp:
        nib.save(img, tmp)
