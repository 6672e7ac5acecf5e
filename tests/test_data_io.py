"""mimood.data.io: NIfTI files written and read back, and every kind of bad file named in one line."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from mimood.data.io import atomic_write, load_volume, save_nifti
from mimood.errors import InputError

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
