"""mimood.data.io: NIfTI files written and read back, and every kind of bad file named in one line."""
import gzip
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mimood.data.io import atomic_write, load_volume, save_nifti
from mimood.errors import InputError, InputWarning
from mimood.testing.fuzz import gzip_zeros

OBLIQUE = np.array([[0.0, -0.9848, 0.1736 * 2.5, 10.0],
                    [1.2, 0.0, 0.0, -20.0],
                    [0.0, 0.1736, 0.9848 * 2.5, 5.0],
                    [0.0, 0.0, 0.0, 1.0]])


def _write(path, data):
    img = nib.Nifti1Image(np.asarray(data), np.eye(4))
    nib.save(img, path)
    return path


def test_save_and_load_round_trip_keeps_values_affine_and_codes(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((7, 8, 9)).astype(np.float32) + 0.5
    like = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), OBLIQUE)
    like.set_qform(OBLIQUE, code=1)
    like.set_sform(OBLIQUE, code=4)
    save_nifti(data, OBLIQUE, like, tmp_path / "a.nii.gz")

    back = load_volume(tmp_path / "a.nii.gz")
    assert back.get_fdata(dtype=np.float32).tolist() == data.tolist()
    assert np.allclose(back.affine, OBLIQUE, atol=1e-5)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 4
    assert back.get_data_dtype() == np.float32
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]   # no temp file left


def test_save_integer_dtype_is_exact_and_unscaled(tmp_path):
    labels = np.zeros((5, 6, 7), np.float32)
    labels[1:3, 2:4, 3] = 2
    save_nifti(labels, np.eye(4), None, tmp_path / "l.nii", dtype=np.uint8)
    img = nib.load(tmp_path / "l.nii")
    assert img.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(img.dataobj), labels.astype(np.uint8))
    assert int(img.header["sform_code"]) > 0 and np.array_equal(img.affine, np.eye(4))


def test_load_applies_scaling_and_squeezes_trailing_singletons(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4, 1, 1) + 1
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "s.nii.gz")
    back = load_volume(tmp_path / "s.nii.gz")
    assert back.shape == (2, 3, 4)
    assert np.array_equal(back.get_fdata(), data[..., 0, 0] * 2.0 + 1.0)


def test_nifti2_is_read(tmp_path):
    nib.save(nib.Nifti2Image(np.ones((3, 4, 5), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "n2.nii")
    back = load_volume(tmp_path / "n2.nii")
    assert isinstance(back, nib.Nifti1Image) and back.header.get_zooms() == (2.0, 2.0, 2.0)


def test_atomic_write_keeps_suffix_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "sub" / "map.nii.gz"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".map.tmp-")
        tmp.write_text("x")
    assert target.read_text() == "x"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "x"
    assert sorted(p.name for p in target.parent.iterdir()) == ["map.nii.gz"]


def _bad_files(tmp_path):
    """(path, expected fragment of the problem) for every kind of bad input."""
    ok = _write(tmp_path / "ok.nii.gz", np.ones((6, 6, 6), np.float32))
    raw = ok.read_bytes()
    cases = {}
    p = tmp_path / "text.nii"
    p.write_text("this is not an image\n" * 40)
    cases[p] = "not a NIfTI"
    p = tmp_path / "text_gz.nii.gz"
    p.write_bytes(gzip.compress(b"hello world" * 100))
    cases[p] = "not a NIfTI"
    p = tmp_path / "plain_named_gz.nii.gz"
    p.write_text("hello")
    cases[p] = "not gzip"
    p = tmp_path / "truncated.nii.gz"
    p.write_bytes(raw[: len(raw) // 2])
    cases[p] = "truncated gzip"
    p = tmp_path / "corrupt.nii.gz"
    p.write_bytes(raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:-4]) + raw[-4:])   # wrong CRC32
    cases[p] = "corrupt gzip"
    p = _write(tmp_path / "short.nii", np.ones((10, 10, 10), np.float32))
    p.write_bytes(p.read_bytes()[:1000])
    cases[p] = "truncated file"
    cases[_write(tmp_path / "flat.nii.gz", np.ones((6, 6), np.float32))] = "2-D"
    cases[_write(tmp_path / "slab.nii.gz", np.ones((6, 6, 1), np.float32))] = "2-D"
    cases[_write(tmp_path / "series.nii.gz", np.ones((6, 6, 6, 3), np.float32))] = "3 volumes"
    nan = np.ones((6, 6, 6), np.float32)
    nan[1, 2, 3] = np.nan
    cases[_write(tmp_path / "nan.nii.gz", nan)] = "1 NaN"
    inf = np.ones((6, 6, 6), np.float32)
    inf[0, 0, 0] = np.inf
    cases[_write(tmp_path / "inf.nii.gz", inf)] = "1 Inf"
    cases[_write(tmp_path / "zero.nii.gz", np.zeros((6, 6, 6), np.int16))] = "all voxels are zero"
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    cases[p] = "empty file"
    cases[tmp_path / "missing.nii.gz"] = "not found"
    return cases


def test_every_bad_file_gives_one_line_input_error_naming_it(tmp_path):
    for path, fragment in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as err:
            load_volume(path)
        message = str(err.value)
        assert message.startswith(str(path) + ": "), message
        assert fragment in message, message
        assert "\n" not in message


def test_all_zero_allowed_for_labels(tmp_path):
    p = _write(tmp_path / "seg.nii.gz", np.zeros((4, 5, 6), np.uint8))
    assert load_volume(p, allow_zero=True).shape == (4, 5, 6)


# ------------------------------------------------- what the header declares: bombs, trailing data, geometry

def _scan(shape=(20, 22, 12)):
    """A small int16 scan whose top slice is empty."""
    data = np.zeros(shape, np.int16)
    data[2:-2, 2:-2, :-1] = np.arange(int(np.prod(shape[:2]) * (shape[2] - 1)), dtype=np.int16).reshape(
        shape[0], shape[1], -1)[2:-2, 2:-2] % 300 + 1
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    img.set_qform(img.affine, code=1)
    return img


def _load_warned(path):
    """(image, InputWarning messages) of load_volume(path)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = load_volume(path)
    return img, [str(w.message) for w in caught if issubclass(w.category, InputWarning)]


def _memory_of_loading(path) -> tuple[str, int]:
    """(outcome line, peak resident MiB) of load_volume(path) in a fresh Python process."""
    code = ("import sys\n"           # VmHWM: ru_maxrss would carry pytest's own peak over fork + exec
            "from mimood.data.io import load_volume\n"
            "from mimood.errors import InputError\n"
            "try:\n    load_volume(sys.argv[1]); print('loaded')\n"
            "except InputError as e:\n    print(e)\n"
            "print(int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1]) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    line, mib = out.stdout.strip().splitlines()
    return line, int(mib)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak memory")
def test_gzip_bombs_are_refused_or_cut_short_without_inflating(tmp_path):
    """1 GiB of zeros in 1 MB of gzip: a header declaring 1024^3 floats is refused from its header; a valid scan
    followed by the zeros is read up to its declared size. Peak memory stays that of a small scan either way
    (inflating the bomb, as gzip.decompress did, needs > 1 GiB)."""
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.float32)
    (tmp_path / "declared.nii.gz").write_bytes(gzip_zeros(header.binaryblock + bytes(4), 1 << 30))
    (tmp_path / "trailing.nii.gz").write_bytes(gzip_zeros(_scan().to_bytes(), 1 << 30))
    assert (tmp_path / "declared.nii.gz").stat().st_size < 2 << 20

    line, mib = _memory_of_loading(tmp_path / "declared.nii.gz")
    assert "1024 x 1024 x 1024 = 1073741824 voxels, more than the 134217728" in line and mib < 300
    line, mib = _memory_of_loading(tmp_path / "trailing.nii.gz")
    assert line == "loaded" and mib < 300
    _, found = _load_warned(tmp_path / "trailing.nii.gz")
    assert len(found) == 1 and "zero bytes after the declared 20 x 22 x 12 volume ignored" in found[0]


def test_data_beyond_the_declared_volume(tmp_path):
    img = _scan()
    raw = img.to_bytes()
    (tmp_path / "zeros.nii").write_bytes(raw + bytes(1000))
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(raw + b"junk"))
    hdr = img.header.copy()
    hdr.set_data_offset(352)
    hdr.set_data_shape((20, 22, 11))                                   # drops only the empty top slice
    (tmp_path / "empty_top.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    hdr.set_data_shape((20, 22, 5))                                    # drops slices with data
    (tmp_path / "shrunk.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    (tmp_path / "shrunk.nii").write_bytes(hdr.binaryblock + raw[348:])

    back, found = _load_warned(tmp_path / "zeros.nii")
    assert np.array_equal(back.get_fdata(), img.get_fdata())
    assert found == [f"{tmp_path / 'zeros.nii'}: 1000 zero bytes after the declared 20 x 22 x 12 volume ignored"]
    _, found = _load_warned(tmp_path / "junk.nii.gz")
    assert found == [f"{tmp_path / 'junk.nii.gz'}: 4 bytes after the declared 20 x 22 x 12 volume ignored"]
    back, found = _load_warned(tmp_path / "empty_top.nii.gz")
    assert back.shape == (20, 22, 11) and "zero bytes after" in found[0]
    for name in ("shrunk.nii.gz", "shrunk.nii"):
        with pytest.raises(InputError) as err:
            load_volume(tmp_path / name)
        assert str(err.value) == (f"{tmp_path / name}: non-zero data beyond the 20 x 22 x 5 volume its header "
                                  "declares (6160 bytes, 7 slices of 20 x 22): a damaged header (dim[3] smaller "
                                  "than the data?); not reading part of a scan")


def _header_variants():
    """(name, header fields) of headers whose geometry no reader can use."""
    zero_pix = {"sform_code": 0, "qform_code": 0, "pixdim": [1, 0, 1, 1, 0, 0, 0, 0]}
    return [("sform_zero", {"sform_code": 1, "srow_x": 0, "srow_y": 0, "srow_z": 0}),
            ("sform_nan", {"sform_code": 1, "srow_x": [np.nan, 0, 0, 0]}),
            ("sform_singular", {"sform_code": 1, "srow_x": [1, 0, 0, 0], "srow_y": [0, 1, 0, 0],
                                "srow_z": [1, 0, 0, 0]}),
            ("sform_coplanar", {"sform_code": 1, "srow_x": [1, 0, 1, 0], "srow_y": [0, 1, 0, 0],
                                "srow_z": [0, 0, 0.05, 0]}),
            ("bad_quaternion", {"quatern_b": 2.0}),
            ("voxel_1e24", {"pixdim": [1, 1e24, 1, 1, 0, 0, 0, 0]}),
            ("voxel_nan", {"pixdim": [1, np.nan, 1, 1, 0, 0, 0, 0]}),
            ("voxel_zero_no_codes", zero_pix)]


@pytest.mark.parametrize("name,fields", _header_variants(), ids=[n for n, _ in _header_variants()])
def test_unusable_geometry_is_invalid_affine_voxel_size(tmp_path, name, fields):
    raw = bytearray(_scan().to_bytes())
    header = np.frombuffer(raw, dtype=nib.Nifti1Header.template_dtype, count=1).copy()
    for k, v in fields.items():
        header[k] = v
    raw[:348] = header.tobytes()
    path = tmp_path / f"{name}.nii"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)
            load_volume(path)
    assert str(err.value).startswith(f"{path}: invalid affine/voxel size (") and "\n" not in str(err.value)


def test_nibabel_header_repairs_are_warnings_not_stderr(tmp_path, capfd):
    raw = bytearray(_scan().to_bytes())
    header = np.frombuffer(raw, dtype=nib.Nifti1Header.template_dtype, count=1).copy()
    header["pixdim"][0, 1] = -1.0                                      # nibabel: "should be positive"
    raw[:348] = header.tobytes()
    (tmp_path / "neg.nii").write_bytes(bytes(raw))
    nib.save(nib.Nifti2Image(np.ones((4, 5, 6), np.float32), np.eye(4)), tmp_path / "n2.nii")
    capfd.readouterr()
    img, found = _load_warned(tmp_path / "neg.nii")
    assert found == [f"{tmp_path / 'neg.nii'}: header: pixdim[1,2,3] should be positive; setting to abs of "
                     "pixdim values"]
    assert img.header.get_zooms() == (1.0, 1.0, 2.0)
    assert _load_warned(tmp_path / "n2.nii")[1] == []                 # NIfTI-2 -> NIfTI-1 says nothing
    assert capfd.readouterr().err == ""


def test_links_folders_and_odd_data_types(tmp_path):
    nib.save(_scan(), tmp_path / "ok.nii.gz")
    os.symlink("ok.nii.gz", tmp_path / "link.nii.gz")
    os.symlink("gone.nii.gz", tmp_path / "dangling.nii.gz")
    os.symlink("loop2.nii.gz", tmp_path / "loop1.nii.gz")
    os.symlink("loop1.nii.gz", tmp_path / "loop2.nii.gz")
    (tmp_path / "dir.nii").mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.complex64), np.eye(4)), tmp_path / "complex.nii")
    assert load_volume(tmp_path / "link.nii.gz").shape == (20, 22, 12)
    for name, problem in (("dangling.nii.gz", "broken symbolic link (its target gone.nii.gz does not exist)"),
                          ("loop1.nii.gz", "symbolic link loop"), ("dir.nii", "is a folder"),
                          ("complex.nii", "complex data (NIfTI datatype 32); expected a real-valued scalar")):
        with pytest.raises(InputError) as err:
            load_volume(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: {problem}")
