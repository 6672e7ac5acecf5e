"""Reading and writing NIfTI volumes: every way a user file can be bad becomes one `InputError`.

`load_volume` streams the file, gunzipping on the fly (by content, not by name), and reads only the bytes its
header declares (`mimood.data.header.declared_size`), so a gzip bomb or a header asking for terabytes is refused
before anything large is allocated. It checks the header's geometry (`check_geometry`), that the data hold one
finite, non-empty 3-D volume, and returns an in-memory float32 image with the file's own affine and
qform/sform. nibabel's header-repair messages become `InputWarning`s instead of lines on stderr.

Data beyond the declared volume (the file goes on after header + dim[1] x ... x dim[n] voxels): at most
`TRAILING_MARGIN` bytes plus one slice of it are read, never the rest, and
- zero bytes (padding; the "small header + gigabytes of zeros" bomb) are ignored with an `InputWarning`;
- non-zero bytes amounting to at least one more slice of the declared in-plane grid are refused: the header
  says the scan is smaller than its data (a damaged dim[3], dim[1..2] or datatype), and reading only the part
  it declares would map a cut or scrambled scan without a word;
- non-zero bytes shorter than a slice are ignored with an `InputWarning`.
A gzip stream is inflated completely (and its CRC checked) unless it holds trailing data: then it is left
unread after the margin.
"""
from __future__ import annotations

import errno
import os
import struct
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from mimood.contract import atomic_write  # the project's one writer; data.io.atomic_write stays its name here
from mimood.data.header import MAX_VOXELS, check_geometry, declared_size, nibabel_messages
from mimood.errors import InputError, InputWarning

_NIFTI_MAGIC = {348: (344, b"n+1\x00", nib.Nifti1Image), 540: (4, b"n+2\x00", nib.Nifti2Image)}
_PAIR_MAGIC = (b"ni1\x00", b"ni2\x00")      # header of a two-file .hdr/.img pair
_GZIP = b"\x1f\x8b"
_CHUNK = 1 << 20                            # compressed bytes read at a time
TRAILING_MARGIN = 64 << 10                  # bytes read past the declared volume (plus one slice)


def load_volume(path: str | Path, allow_zero: bool = False, max_voxels: int = MAX_VOXELS) -> nib.Nifti1Image:
    """Read, validate and return one 3-D NIfTI volume as an in-memory float32 `Nifti1Image`.

    Raises `InputError(path, problem)` for: a missing or unreadable file, a broken or looping symbolic link,
    not a single-file NIfTI, truncated or corrupt gzip data, a header declaring more than `max_voxels` voxels
    or less data than the file holds (module docstring), an invalid affine/voxel size, data that is not 3-D
    (trailing singleton dimensions are dropped), NaN/Inf values, and (unless `allow_zero`, as for label
    volumes) an all-zero volume.
    """
    path = Path(path)
    with nibabel_messages(path):
        img = _parse_nifti(*_read_declared(path, max_voxels), path)
        try:
            with np.errstate(over="ignore", invalid="ignore"):   # overflow -> Inf, refused by check_volume
                data = img.get_fdata(dtype=np.float32)
        except Exception as e:  # nibabel raises many types for inconsistent headers; all mean "unreadable"
            raise InputError(path, f"unreadable NIfTI data ({e})") from None
    data = check_volume(data, path, allow_zero=allow_zero)
    out = _in_memory(data, img)
    out.set_filename(str(path))          # so that later errors (preprocessing) name the file
    return out


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


class _Stream:
    """A file's bytes, gunzipped on the fly when it starts with the gzip magic: `read(n)` returns the next n
    bytes (fewer only at the end). Written over zlib rather than `gzip.GzipFile` to name the two ways a gzip
    file is bad (cut off, corrupt) as `InputError`s; multi-member files and zero padding are read as gzip
    reads them."""

    def __init__(self, f, path: Path, gz: bool):
        self.f, self.path, self.gz = f, path, gz
        self.inflate = zlib.decompressobj(31) if gz else None   # 31: gzip header and CRC
        self.ended = False

    def read(self, n: int) -> bytes:
        if not self.gz:
            return self.f.read(n)
        parts, got = [], 0
        while got < n and not self.ended:
            part = self._inflate(n - got)
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def remaining(self) -> int | None:
        """Bytes left in an uncompressed file (None for gzip: unknown without inflating them)."""
        return None if self.gz else os.fstat(self.f.fileno()).st_size - self.f.tell()

    def _inflate(self, limit: int) -> bytes:
        d = self.inflate
        if d.eof:                                    # a member ended: another one, zero padding, or the end
            rest = d.unused_data
            while len(rest.lstrip(b"\0")) < 2:
                more = self.f.read(_CHUNK)
                if not more:
                    break
                rest += more
            rest = rest.lstrip(b"\0")
            if not rest:
                self.ended = True
                return b""
            if not rest.startswith(_GZIP):              # as gzip(1): "trailing garbage ignored"
                warnings.warn(InputWarning(self.path, "bytes after the end of the gzip data ignored"), stacklevel=5)
                self.ended = True
                return b""
            self.inflate = d = zlib.decompressobj(31)
            data = rest
        else:
            data = d.unconsumed_tail or self.f.read(_CHUNK)
        try:
            if not data:                             # input exhausted: whatever zlib still holds, else cut off
                out = d.decompress(b"", limit)
                if not out:
                    raise InputError(self.path, "truncated gzip data (incomplete download or copy?)")
                return out
            return d.decompress(data, limit)
        except zlib.error as e:
            raise InputError(self.path, f"corrupt gzip data ({e})") from None


def _open(path: Path):
    """The open file, with one-line errors for folders, missing files and broken or looping links."""
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InputError(path, "symbolic link loop (its chain of links never reaches a file)") from None
        raise InputError(path, f"broken symbolic link (its target {os.readlink(path)} does not exist)")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as e:
        raise InputError(path, f"cannot read file ({e.strerror or e})") from None


def _read_declared(path: Path, max_voxels: int) -> tuple[bytes, type]:
    """(header + data as the header declares them, gunzipped; the nibabel image class); data beyond that: the
    module docstring."""
    with _open(path) as f:
        try:
            return _read_open(f, path, max_voxels)
        except OSError as e:                         # e.g. EIO on a failing disk, EISDIR on odd mounts
            raise InputError(path, f"cannot read file ({e.strerror or e})") from None


def _read_open(f, path: Path, max_voxels: int) -> tuple[bytes, type]:
    magic = f.read(2)
    if not magic:
        raise InputError(path, "empty file")
    f.seek(0)
    gz = magic == _GZIP
    if not gz and path.name.lower().endswith(".gz"):
        raise InputError(path, "named .gz but not gzip-compressed")
    stream = _Stream(f, path, gz)
    head, header, klass, need = _read_header(stream, path, max_voxels)
    raw = head + stream.read(max(0, need - len(head)))
    if len(raw) < need:
        what = "gzip data holds" if gz else "file has"
        raise InputError(path, f"truncated file (the {what} {len(raw)} bytes, the header needs {need})")
    shape = header.get_data_shape()
    slice_bytes = int(np.prod(shape[:2], dtype=np.int64)) * header.get_data_dtype().itemsize
    _trailing(path, stream, min(TRAILING_MARGIN + slice_bytes, 64 << 20), slice_bytes, shape)
    return raw[:need], klass


def _read_header(stream: _Stream, path: Path, max_voxels: int):
    """(header bytes as nibabel repaired them, the parsed header, the image class, bytes declared in all) of a
    single-file NIfTI-1/2, with its declared size and geometry checked before any data is read."""
    head = stream.read(4)
    for endian in "<>":
        size = struct.unpack(endian + "i", head)[0] if len(head) == 4 else 0
        if size in _NIFTI_MAGIC:
            break
    else:
        raise InputError(path, "not a NIfTI file (no NIfTI-1/2 header)")
    at, want, klass = _NIFTI_MAGIC[size]
    head += stream.read(size + 4 - len(head))      # the header and NIfTI's 4 extension-flag bytes
    if head[at:at + 4] in _PAIR_MAGIC:
        raise InputError(path, "header of a two-file NIfTI (.hdr + .img): convert it to one .nii file")
    if head[at:at + 4] != want or len(head) < size:
        raise InputError(path, "not a NIfTI file (no NIfTI-1/2 header)")
    try:
        raw_header = klass.header_class(head[:size], check=False)     # as written, before nibabel's repairs
        header = klass.header_class(head[:size])
    except Exception as e:  # header fields nibabel cannot interpret
        raise InputError(path, f"not a readable NIfTI file ({e})") from None
    offset, need = declared_size(header, path, max_voxels)
    if offset < size + 4:                # nibabel would read a single file's "data" from inside the header
        warnings.warn(InputWarning(path, f"header: vox_offset {offset} lies inside the header; reading the data "
                                         f"from byte {size + 4}"), stacklevel=5)
        header.set_data_offset(size + 4)
        offset, need = declared_size(header, path, max_voxels)
    head = header.binaryblock + head[size:]          # as nibabel repaired it (each repair is a warning)
    check_geometry(header, path, raw_header=raw_header)
    dtype = header.get_data_dtype()
    if dtype.kind == "c" or dtype.fields:
        what = "complex" if dtype.kind == "c" else "RGB/structured"
        raise InputError(path, f"{what} data (NIfTI datatype {int(header['datatype'])}); expected a real-valued "
                               "scalar image")
    return head, header, klass, need


def _trailing(path: Path, stream: _Stream, margin: int, slice_bytes: int, shape) -> None:
    """Refuse or warn about data after the declared volume (module docstring); reads at most `margin` bytes."""
    left = stream.remaining()
    extra = stream.read(margin if left is None else min(margin, left))
    if not extra:
        return
    exact = left is not None or len(extra) < margin        # the whole rest was read
    n = len(extra) if left is None else left
    declared, plane = _fmt(shape), _fmt(shape[:2])
    if not extra.strip(b"\0"):
        warnings.warn(InputWarning(path, f"{'' if exact else 'at least '}{n} zero bytes after the declared "
                                         f"{declared} volume ignored"), stacklevel=4)
    elif n >= slice_bytes > 0:
        more = f"{n} bytes, {n / slice_bytes:.4g} slices of {plane}" if exact else f"more than a {plane} slice"
        raise InputError(path, f"non-zero data beyond the {declared} volume its header declares ({more}): a "
                               "damaged header (dim[3] smaller than the data?); not reading part of a scan")
    else:
        warnings.warn(InputWarning(path, f"{n} bytes after the declared {declared} volume ignored"), stacklevel=4)


def _parse_nifti(raw: bytes, klass: type, path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Let nibabel parse the header + data bytes `_read_declared` found."""
    try:
        return klass.from_bytes(raw)
    except Exception as e:  # header fields nibabel cannot interpret
        raise InputError(path, f"not a readable NIfTI file ({e})") from None


def _in_memory(data: np.ndarray, img: nib.Nifti1Image | nib.Nifti2Image) -> nib.Nifti1Image:
    """A float32 Nifti1Image holding `data`, with the source's affine, qform and sform (and codes)."""
    with nibabel_messages(None):        # a NIfTI-2 header's fields are checked against NIfTI-1's here
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
