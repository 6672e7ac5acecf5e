"""Seeded malformed inputs for mimood's readers and `mimood-infer`: hand-made edge cases, header-field and
byte-level mutations of a valid scan, gzip bombs, links, awkward names and output-name collisions.

    inputs = make_inputs(folder, synthetic_scan(), seed=0, n_mutations=40, bomb_bytes=256 << 20)
    for i in inputs:
        o = load_outcome(folder / i.name)           # load + skull check + preprocess, as inference does
        assert not problems(i, o)

Every input says what must happen to it (`expect`):
    ok      a valid scan in an unusual form: it must load and be mapped;
    refuse  an `InputError` (one line, naming the file) whose message contains `fragment`;
    warn    it loads, with an `InputWarning` containing `fragment`;
    any     a random mutation: mapped or refused, never anything else (a traceback, a hang, a huge allocation).
The same seed writes the same bytes. tests/test_fuzz.py runs a small slice through loading and preprocessing;
benchmarks/fuzz_infer.py runs the full set through `mimood-infer`.
"""
from __future__ import annotations

import gzip
import os
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mimood.errors import InputError

EXPECT = ("ok", "refuse", "warn", "any")
# header fields a mutation may set, and the values it picks from (cast to the field's type)
FIELDS = ("dim", "pixdim", "vox_offset", "scl_slope", "scl_inter", "datatype", "bitpix", "qform_code", "sform_code",
          "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z",
          "dim_info", "xyzt_units", "intent_code", "slice_code", "sizeof_hdr", "magic")
SPECIAL = (0, -1, 1, 2, 3, 7, 255, 32767, -32768, 2 ** 31 - 1, np.nan, np.inf, -np.inf, 1e24, -1e24, 1e-24, 0.5)


@dataclass
class FuzzInput:
    name: str                # path relative to the folder (a sub folder for collisions)
    kind: str                # edge, geometry, dtype, bomb, name, link, collision, head, mutation
    expect: str              # one of EXPECT
    fragment: str = ""       # part of the expected error or warning
    note: str = ""           # what was done to the scan


# ---------------------------------------------------------------- valid scans


def synthetic_scan(shape=(96, 112, 30), seed: int = 0, head: bool = False) -> nib.Nifti1Image:
    """A small skull-stripped T2-like scan (int16, 1 mm, LAS, qform and sform set): a textured ellipsoid brain
    with bright ventricles and an empty top and bottom slice. `head=True` adds a skull, scalp and noisy air."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.85) ** 2)
    data = np.where(r <= 1, 300 + 60 * np.sin(7 * x) * np.cos(5 * y) + rng.normal(0, 15, shape), 0)
    data[(x / 0.2) ** 2 + (y / 0.35) ** 2 + (z / 0.3) ** 2 <= 1] = 700          # ventricles
    if head:
        data[(r > 1.0) & (r <= 1.08)] = 40                                      # skull: dark
        data[(r > 1.08) & (r <= 1.15)] = 500                                    # scalp: bright
        air = r > 1.15
        data[air] = np.abs(rng.normal(0, 8, int(air.sum())))                    # Rician-like noise
    data = np.clip(data, 0, None).astype(np.int16)
    affine = np.array([[-1.0, 0, 0, 48], [0, 1.0, 0, -56], [0, 0, 1.0, -15], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def gzip_zeros(head: bytes, n_zero: int, chunk: int = 16 << 20) -> bytes:
    """A gzip file of `head` followed by `n_zero` zero bytes, made in about 0.4 s per GiB: one compressed block of
    `chunk` zeros after a full flush (which resets the compressor) repeated, and the CRC computed directly."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)                # raw deflate; the gzip frame is written here
    parts = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", c.compress(head), c.flush(zlib.Z_FULL_FLUSH)]
    zeros = bytes(chunk)
    n, rest = divmod(n_zero, chunk)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(head)
    for _ in range(n):
        crc = zlib.crc32(zeros, crc)
    parts.append(block * n)
    if rest:
        parts.append(c.compress(zeros[:rest]) + c.flush(zlib.Z_FULL_FLUSH))
        crc = zlib.crc32(zeros[:rest], crc)
    parts.append(c.flush(zlib.Z_FINISH))
    parts.append(crc.to_bytes(4, "little") + ((len(head) + n_zero) & 0xFFFFFFFF).to_bytes(4, "little"))
    return b"".join(parts)


# ---------------------------------------------------------------- writing the set


class _Writer:
    def __init__(self, folder: Path):
        self.folder = folder
        self.inputs: list[FuzzInput] = []

    def bytes(self, name: str, data: bytes, kind: str, expect: str, fragment: str = "", note: str = "",
              compress: bool | None = None) -> None:
        """Write `data` (gzip-compressed when the name ends in .gz, unless `compress` says otherwise)."""
        assert expect in EXPECT
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if compress if compress is not None else name.lower().endswith(".gz"):
            data = gzip.compress(data, compresslevel=1, mtime=0)
        path.write_bytes(data)
        self.inputs.append(FuzzInput(name, kind, expect, fragment, note))

    def image(self, name: str, img, kind: str, expect: str, fragment: str = "", note: str = "") -> None:
        self.bytes(name, img.to_bytes(), kind, expect, fragment, note)

    def link(self, name: str, target: str, expect: str, fragment: str = "", note: str = "") -> None:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        self.inputs.append(FuzzInput(name, "link", expect, fragment, note))


def _with(img: nib.Nifti1Image, data=None, **fields) -> nib.Nifti1Image:
    """A copy of `img` (new data optional) with header fields set after nibabel's own updates."""
    out = nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data, img.affine, img.header.copy())
    for k, v in fields.items():
        out.header[k] = v
    return out


def _raw_with(img: nib.Nifti1Image, **fields) -> bytes:
    """`img`'s single-file bytes with header fields overwritten in place (no nibabel check or fix)."""
    raw = bytearray(img.to_bytes())
    header = np.frombuffer(raw, dtype=img.header.template_dtype, count=1).copy()
    for k, v in fields.items():
        header[k] = v
    raw[:348] = header.tobytes()
    return bytes(raw)


def edge_inputs(w: _Writer, base: nib.Nifti1Image, rng: np.random.Generator, bomb_bytes: int) -> None:
    """The hand-made set: every way a file can be bad that we know of, and valid scans in unusual forms."""
    raw = base.to_bytes()
    gz = gzip.compress(raw, compresslevel=1, mtime=0)
    data = np.asarray(base.dataobj)
    A = base.affine
    X, Y, Z = data.shape

    w.bytes("empty.nii.gz", b"", "edge", "refuse", "empty file", compress=False)
    w.bytes("three_bytes.nii", b"abc", "edge", "refuse", "not a NIfTI")
    w.bytes("text.nii", b"this is not an image\n" * 40, "edge", "refuse", "not a NIfTI")
    w.bytes("text_in_gzip.nii.gz", b"hello world\n" * 100, "edge", "refuse", "not a NIfTI")
    w.bytes("plain_named_gz.nii.gz", raw, "edge", "refuse", "not gzip", compress=False)
    w.bytes("truncated_gzip.nii.gz", gz[: len(gz) // 2], "edge", "refuse", "truncated gzip", compress=False)
    w.bytes("bad_crc.nii.gz", gz[:-8] + bytes(b ^ 0xFF for b in gz[-8:-4]) + gz[-4:], "edge", "refuse",
            "corrupt gzip", compress=False)
    w.bytes("header_only.nii", raw[:352], "edge", "refuse", "truncated file")
    w.bytes("truncated_data.nii", raw[: 352 + (len(raw) - 352) * 2 // 3], "edge", "refuse", "truncated file")
    w.bytes("garbage_after_gzip.nii.gz", gz + b"GARBAGE" * 10, "edge", "warn", "after the end of the gzip",
            compress=False)
    w.bytes("two_gzip_members.nii.gz", gzip.compress(raw[:1000], mtime=0) + gzip.compress(raw[1000:], mtime=0),
            "edge", "ok", compress=False)
    pair = nib.Nifti1Pair(data, A)
    w.bytes("analyze_pair_header.nii", pair.header.binaryblock, "edge", "refuse", "two-file")
    w.image("flat_2d.nii.gz", nib.Nifti1Image(data[:, :, Z // 2], A), "edge", "refuse", "2-D")
    w.image("one_voxel.nii.gz", nib.Nifti1Image(np.ones((1, 1, 1), np.int16), A), "edge", "refuse", "3-D")
    w.image("slab_1_slice.nii.gz", nib.Nifti1Image(data[:, :, Z // 2:Z // 2 + 1], A), "edge", "refuse", "2-D")
    w.image("series_4d.nii.gz", nib.Nifti1Image(np.stack([data] * 3, -1), A), "edge", "refuse", "3 volumes")
    w.image("singleton_4d.nii.gz", nib.Nifti1Image(data[..., None], A), "edge", "ok")
    f = data.astype(np.float32)
    f[X // 2, Y // 2, Z // 2] = np.nan
    w.image("one_nan.nii.gz", nib.Nifti1Image(f, A), "edge", "refuse", "1 NaN")
    f = data.astype(np.float32)
    f[X // 2, Y // 2, Z // 2] = np.inf
    w.image("one_inf.nii.gz", nib.Nifti1Image(f, A), "edge", "refuse", "1 Inf")
    w.image("all_zero.nii.gz", nib.Nifti1Image(np.zeros_like(data), A), "edge", "refuse", "all voxels are zero")
    w.image("constant_brain.nii.gz", nib.Nifti1Image((data > 0).astype(np.int16) * 5, A), "edge", "refuse",
            "no range")
    w.image("negative_values.nii.gz", nib.Nifti1Image(np.where(data > 0, data - 320, 0).astype(np.int16), A),
            "edge", "ok", note="brain values -320..+380, as in unclipped skull-stripped raw scans")
    huge = nib.Nifti1Header()
    huge.set_data_shape((10000, 10000, 10000))
    w.bytes("header_10000_cubed.nii.gz", huge.binaryblock + b"\0" * 4 + raw[352:], "edge", "refuse", "more than")

    # bombs: refused or cut short before anything large is inflated
    big = nib.Nifti1Header()
    big.set_data_shape((1024, 1024, 1024))
    big.set_data_dtype(np.float32)
    w.bytes("bomb_declared.nii.gz", gzip_zeros(big.binaryblock + b"\0" * 4, bomb_bytes), "bomb", "refuse",
            "more than", note=f"header declares 1024^3 float32 (4 GiB), inflates to {bomb_bytes} bytes",
            compress=False)
    w.bytes("bomb_trailing.nii.gz", gzip_zeros(raw, bomb_bytes), "bomb", "warn", "zero bytes after",
            note=f"a valid scan followed by {bomb_bytes} zero bytes", compress=False)
    w.bytes("double_gzip.nii.gz", gz, "edge", "refuse", "not a NIfTI", note="gzip of a .nii.gz")

    # trailing data and a header that declares less than the data
    w.bytes("trailing_junk.nii", raw + rng.integers(1, 255, 100, dtype=np.uint8).tobytes(), "edge", "warn",
            "bytes after the declared")
    w.bytes("trailing_zeros.nii.gz", raw + bytes(5000), "edge", "warn", "zero bytes after")
    w.bytes("dim3_shrunk.nii.gz", _raw_with(base, dim=[3, X, Y, Z // 3, 1, 1, 1, 1]), "edge", "refuse",
            "dim[3] smaller", note=f"dim[3] {Z} -> {Z // 3}")
    w.bytes("dim3_shrunk_empty_top.nii.gz", _raw_with(base, dim=[3, X, Y, Z - 1, 1, 1, 1, 1]), "edge", "warn",
            "zero bytes after", note=f"dim[3] {Z} -> {Z - 1}: only the empty top slice is cut")
    w.bytes("dim3_grown.nii.gz", _raw_with(base, dim=[3, X, Y, Z * 2, 1, 1, 1, 1]), "edge", "refuse",
            "truncated file")
    w.bytes("datatype_narrowed.nii.gz", _raw_with(base, datatype=2, bitpix=8), "edge", "refuse", "beyond the",
            note="int16 data labelled uint8")
    w.bytes("vox_offset_huge.nii", _raw_with(base, vox_offset=2.0 ** 31), "edge", "refuse", "data at byte")

    # data types and scaling
    for dt in (np.uint8, np.int8, np.uint16, np.int32, np.int64, np.float32, np.float64):
        w.image(f"dtype_{np.dtype(dt).name}.nii.gz", nib.Nifti1Image((data // 4).astype(dt), A, dtype=dt), "dtype",
                "ok")
    w.image("dtype_complex64.nii.gz", nib.Nifti1Image(data.astype(np.complex64), A), "dtype", "refuse",
            "real-valued")
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = data // 4
    w.image("dtype_rgb24.nii.gz", nib.Nifti1Image(rgb, A), "dtype", "refuse", "real-valued")
    w.bytes("slope_zero.nii.gz", _raw_with(base, scl_slope=0.0), "dtype", "ok", note="slope 0 means unscaled")
    w.bytes("slope_nan.nii.gz", _raw_with(base, scl_slope=np.nan), "dtype", "ok", note="NaN slope means unscaled")
    w.bytes("slope_inf.nii.gz", _raw_with(base, scl_slope=np.inf), "dtype", "any")
    w.bytes("slope_huge.nii.gz", _raw_with(base, scl_slope=1e38), "dtype", "refuse", "Inf")
    w.bytes("inter_nan.nii.gz", _raw_with(base, scl_slope=1.0, scl_inter=np.nan), "dtype", "any")

    # geometry: refused as "invalid affine/voxel size" at loading, or mapped correctly
    bad = "invalid affine/voxel size"
    w.bytes("sform_zero.nii.gz", _raw_with(base, srow_x=0, srow_y=0, srow_z=0), "geometry", "refuse", bad)
    w.bytes("sform_nan.nii.gz", _raw_with(base, srow_x=[np.nan, 0, 0, 0]), "geometry", "refuse", bad)
    w.bytes("sform_singular.nii.gz", _raw_with(base, srow_z=[-1.0, 0, 0, 0]), "geometry", "refuse", bad,
            note="third axis parallel to the first")
    w.bytes("sform_nearly_singular.nii.gz", _raw_with(base, srow_x=[-1.0, 0, -1, 48], srow_z=[0, 0, 0.05, -15]),
            "geometry", "refuse", bad, note="third axis 3 degrees from the first")
    w.bytes("qform_bad_quaternion.nii.gz", _raw_with(base, sform_code=0, quatern_b=2.0), "geometry", "refuse", bad)
    w.bytes("qform_bad_with_sform.nii.gz", _raw_with(base, quatern_b=2.0), "geometry", "refuse", bad,
            note="sform valid, qform (code 1) impossible: viewers would disagree")
    w.bytes("pixdim_1e24.nii.gz", _raw_with(base, sform_code=0, pixdim=[1, 1e24, 1, 1, 0, 0, 0, 0]), "geometry",
            "refuse", bad)
    w.bytes("pixdim_zero_no_codes.nii.gz", _raw_with(base, sform_code=0, qform_code=0,
                                                      pixdim=[1, 0, 0, 0, 0, 0, 0, 0]), "geometry", "refuse", bad)
    w.bytes("pixdim_tiny.nii.gz", _raw_with(base, sform_code=0, pixdim=[1, 1e-6, 1, 1, 0, 0, 0, 0]), "geometry",
            "refuse", bad)
    w.bytes("pixdim_negative.nii.gz", _raw_with(base, sform_code=0, pixdim=[1, -1, 1, 1, 0, 0, 0, 0]), "geometry",
            "warn", "pixdim", note="nibabel takes |pixdim| and says so")
    w.bytes("voxels_40mm.nii.gz", _raw_with(base, sform_code=0, pixdim=[1, 40, 40, 40, 0, 0, 0, 0]), "geometry",
            "refuse", bad, note="plausible per voxel, but resampling to 1 mm would need billions of voxels")
    w.bytes("no_codes.nii.gz", _raw_with(base, sform_code=0, qform_code=0), "geometry", "ok")
    theta = np.deg2rad(25)
    rot = np.array([[1, 0, 0, 0], [0, np.cos(theta), -np.sin(theta), 0], [0, np.sin(theta), np.cos(theta), 0],
                    [0, 0, 0, 1]])
    for name, aff in (("oblique_25deg", rot @ A), ("lps", np.diag([-1.0, -1, 1, 1]) @ A),
                      ("pir", A[:, [1, 2, 0, 3]]), ("voxels_2mm", A @ np.diag([2.0, 2, 2, 1])),
                      ("voxels_anisotropic", A @ np.diag([0.8, 0.8, 3.0, 1]))):
        img = nib.Nifti1Image(data if name != "pir" else np.ascontiguousarray(np.transpose(data, (1, 2, 0))), aff)
        img.set_qform(aff, code=1)
        w.image(f"{name}.nii.gz", img, "geometry", "ok")
    w.image("nifti2.nii.gz", nib.Nifti2Image(data, A), "edge", "ok")
    w.image("big_endian.nii.gz", nib.Nifti1Image(data.astype(">i2"), A, nib.Nifti1Header(endianness=">")),
            "edge", "ok")

    # names and links
    for name in ("name with spaces.nii.gz", "ünïcødé_脑.nii.gz", "-leading-dash.nii.gz", "UPPER_CASE.NII.GZ",
                 "x" * 200 + ".nii.gz"):
        w.bytes(name, raw, "name", "ok")
    w.link("link_to_valid.nii.gz", "no_codes.nii.gz", "ok")
    w.link("dangling_link.nii.gz", "does_not_exist.nii.gz", "refuse", "broken symbolic link")
    w.link("loop_a.nii.gz", "loop_b.nii.gz", "refuse", "symbolic link loop")
    w.link("loop_b.nii.gz", "loop_a.nii.gz", "refuse", "symbolic link loop")
    (w.folder / "folder_named_scan.nii.gz").mkdir()
    w.inputs.append(FuzzInput("folder_named_scan.nii.gz", "edge", "refuse", "is a folder"))

    # not skull-stripped: mapped as if the head were brain unless the skull check speaks
    w.image("whole_head.nii.gz", synthetic_scan(data.shape, seed=1, head=True), "head", "warn", "skull-stripped")


def collision_inputs(w: _Writer, base: nib.Nifti1Image) -> None:
    """Inputs whose output names collide unless naming is extension-, folder- and case-aware."""
    raw = base.to_bytes()
    lps = nib.Nifti1Image(np.asarray(base.dataobj)[::-1].copy(), base.affine).to_bytes()   # a different scan
    w.bytes("collide/a.nii", raw, "collision", "ok")
    w.bytes("collide/a.nii.gz", lps, "collision", "ok")
    w.bytes("collide/sub/b.nii.gz", raw, "collision", "ok")
    w.bytes("collide/other/b.nii.gz", lps, "collision", "ok")
    w.bytes("collide/sub__b.nii.gz", raw, "collision", "ok", note="the name folder prefixing gives sub/b")
    w.bytes("collide/Case.nii.gz", raw, "collision", "ok")
    w.bytes("collide/case.nii.gz", lps, "collision", "ok", note="same name on a case-insensitive disk")


def mutations(w: _Writer, base: nib.Nifti1Image, n: int, rng: np.random.Generator) -> None:
    """`n` seeded mutations of `base`: header fields set to special values (60%), random header bytes (15%),
    random data bytes (10%), random compressed bytes (10%), a cut at a random offset (5%)."""
    raw = base.to_bytes()
    template = base.header.template_dtype
    for i in range(n):
        op = rng.choice(["field", "header_bytes", "data_bytes", "gzip_bytes", "cut"], p=[.6, .15, .1, .1, .05])
        b = bytearray(raw)
        gz = bool(rng.integers(2)) or op == "gzip_bytes"
        if op == "field":
            notes = []
            header = np.frombuffer(b, dtype=template, count=1).copy()
            for _ in range(int(rng.integers(1, 3))):
                name = str(rng.choice(FIELDS))
                value = SPECIAL[int(rng.integers(len(SPECIAL)))]
                shape = template.fields[name][0].shape
                index = int(rng.integers(shape[0])) if shape else None
                target = header[name] if index is None else header[name][0, index:index + 1]
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        target[...] = value
                    except (OverflowError, ValueError, TypeError):   # NaN or too big for an integer field
                        target[...] = np.array([value], dtype=np.float64).astype(target.dtype)[0]
                notes.append(f"{name}{'' if index is None else f'[{index}]'}={value}")
            b[:348] = header.tobytes()
            note = ", ".join(notes)
        elif op == "header_bytes":
            at = rng.integers(0, 352, int(rng.integers(1, 9)))
            for k in at:
                b[k] = int(rng.integers(256))
            note = f"bytes {sorted(int(k) for k in at)} randomised"
        elif op == "data_bytes":
            at = rng.integers(352, len(b), int(rng.integers(1, 200)))
            for k in at:
                b[k] = int(rng.integers(256))
            note = f"{len(at)} data bytes randomised"
        elif op == "cut":
            cut = int(rng.integers(1, len(b)))
            del b[cut:]
            note = f"cut at byte {cut} of {len(raw)}"
        if op == "gzip_bytes":
            z = bytearray(gzip.compress(raw, compresslevel=1, mtime=0))
            at = rng.integers(0, len(z), int(rng.integers(1, 4)))
            for k in at:
                z[k] ^= int(rng.integers(1, 256))
            w.bytes(f"mutation_{i:03d}.nii.gz", bytes(z), "mutation", "any", compress=False,
                    note=f"compressed bytes {sorted(int(k) for k in at)} flipped")
            continue
        w.bytes(f"mutation_{i:03d}.nii" + (".gz" if gz else ""), bytes(b), "mutation", "any", note=f"{op}: {note}")


def make_inputs(folder: str | Path, base: nib.Nifti1Image | None = None, seed: int = 0, n_mutations: int = 100,
                bomb_bytes: int = 4 << 30, collisions: bool = True) -> list[FuzzInput]:
    """Write the whole set under `folder` (created; must be empty) and return what each input expects."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty")
    base = synthetic_scan() if base is None else base
    rng = np.random.default_rng(seed)
    w = _Writer(folder)
    edge_inputs(w, base, rng, bomb_bytes)
    if collisions:
        collision_inputs(w, base)
    mutations(w, base, n_mutations, rng)
    return w.inputs


# ---------------------------------------------------------------- what happened to one input


@dataclass
class Outcome:
    status: str                    # "ok", "refused" (InputError) or "crash" (any other exception)
    message: str = ""              # the error; "Type: message" for a crash
    warnings: list[str] = field(default_factory=list)   # InputWarning messages
    seconds: float = 0.0


def load_outcome(path: str | Path, cfg=None, skull: str = "warn") -> Outcome:
    """Load, skull-check and preprocess `path` as inference does (`mimood.runtime.safety.read_scan`), and say
    what happened."""
    from mimood.config import DataConfig
    from mimood.runtime.safety import read_scan

    t0 = time.perf_counter()
    found: list[str] = []
    try:
        _, found = read_scan(Path(path), cfg or DataConfig(), skull)
        status, message = "ok", ""
    except InputError as e:
        status, message = "refused", str(e)
    except Exception as e:  # the point of fuzzing: anything else is a bug
        status, message = "crash", f"{type(e).__name__}: {e}"
    return Outcome(status, message, found, time.perf_counter() - t0)


def problems(inp: FuzzInput, out: Outcome, path: str | Path | None = None) -> list[str]:
    """How `out` breaks what `inp` expects ([] when it does not)."""
    name = inp.name
    if out.status == "crash":
        return [f"{name}: crashed ({out.message})"]
    found = []
    if out.status == "refused":
        if path is not None and not out.message.startswith(f"{path}: "):
            found.append(f"{name}: the error does not start with the file name: {out.message}")
        if "\n" in out.message:
            found.append(f"{name}: the error is not one line")
        if inp.expect in ("ok", "warn"):
            found.append(f"{name}: a valid input was refused: {out.message}")
        elif inp.expect == "refuse" and inp.fragment not in out.message:
            found.append(f"{name}: refused for another reason than '{inp.fragment}': {out.message}")
    elif inp.expect == "refuse":
        found.append(f"{name}: accepted, expected a refusal ('{inp.fragment}')")
    elif inp.expect == "warn" and not any(inp.fragment in m for m in out.warnings):
        found.append(f"{name}: accepted without the warning '{inp.fragment}' (got {out.warnings})")
    return found
