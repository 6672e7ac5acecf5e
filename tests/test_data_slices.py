"""mimood.data.slices: the training-slice cache built from files on disk, saved, loaded and split."""
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mimood.config import DataConfig
from mimood.data.discover import discover
from mimood.data.slices import SliceSet, build_slice_set, load_slice_set, save_slice_set, split_by_case
from mimood.errors import InputError


def _volume(seed, shape=(60, 70, 30)):
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    brain = sum(((g - n / 2) / (n * 0.4)) ** 2 for g, n in zip(grid, shape)) < 1
    return np.where(brain, 50 + 100 * ndimage.gaussian_filter(rng.random(shape), 2), 0).astype(np.float32)


@pytest.fixture()
def folder(tmp_path):
    """images/ + labels/: three good volumes (one with a lesion on slices 14-15), one corrupt file."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(_volume(i), np.eye(4)), tmp_path / "images" / f"v{i}.nii.gz")
    label = np.zeros((60, 70, 30), np.uint8)
    label[28:32, 33:37, 14:16] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "labels" / "v1.nii.gz")
    (tmp_path / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    return tmp_path


def test_build_skips_bad_files_and_filters_slices_near_lesions(folder):
    cases = discover(folder)
    s, skipped = build_slice_set(cases, DataConfig(), progress=False)
    assert s.names == ["v0", "v1", "v2"] and s.images.dtype == np.float16 and s.images.shape[1:] == (160, 160)
    assert len(skipped) == 1 and skipped[0].startswith(str(folder / "images" / "broken.nii.gz") + ": ")
    assert 0 <= s.images.min() and s.images.max() == 1
    per_case = np.bincount(s.case)
    assert per_case.tolist() == [per_case[0]] * 3                      # same shape, same kept slices

    far, _ = build_slice_set(cases, DataConfig(lesion_margin=5), progress=False)
    v1 = far.index[far.case == far.names.index("v1")]
    all_v1 = s.index[s.case == 1]
    assert v1.tolist() == [z for z in all_v1 if z <= 14 - 5 or z >= 15 + 5]   # >= 5 mm from slices 14..15
    assert 0 < len(v1) < len(all_v1)
    assert np.array_equal(far.index[far.case == 0], s.index[s.case == 0])  # unlabelled: all kept


def test_save_load_round_trip_and_split(tmp_path, folder):
    s, _ = build_slice_set(discover(folder), DataConfig(), progress=False)
    save_slice_set(s, tmp_path / "cache.npz")
    back = load_slice_set(tmp_path / "cache.npz")
    assert back.names == s.names and np.array_equal(back.images, s.images)
    assert np.array_equal(back.case, s.case) and np.array_equal(back.index, s.index)

    train, val = split_by_case(back, 0.3, seed=0)
    assert len(val.names) == 1 and len(train.names) == 2
    assert set(train.names) | set(val.names) == set(s.names) and not set(train.names) & set(val.names)
    assert len(train) + len(val) == len(s)
    for part in (train, val):                                            # case ids index the part's own names
        for k, name in enumerate(part.names):
            orig = s.names.index(name)
            assert np.array_equal(part.images[part.case == k], s.images[s.case == orig])
    again, _ = split_by_case(back, 0.3, seed=0)
    assert again.names == train.names


def test_split_needs_two_volumes_and_bad_cache():
    one = SliceSet(np.zeros((3, 160, 160), np.float16), np.zeros(3, np.int64), np.arange(3), ["only"])
    with pytest.raises(ValueError, match="at least 2 volumes"):
        split_by_case(one, 0.2, seed=0)


def test_load_bad_cache(tmp_path):
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(InputError, match="not a slice cache"):
        load_slice_set(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="not found"):
        load_slice_set(tmp_path / "absent.npz")
