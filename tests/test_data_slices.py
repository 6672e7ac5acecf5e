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


def test_mirrored_hemispheres_never_hold_a_lesion_voxel(tmp_path):
    """A one-sided 'lesion' with a unique, very dark intensity: the mirrored halves added by `hemispheres` are
    symmetric, come only from slices near the lesion, and none holds a lesion voxel or one within the margin."""
    vol = _volume(5, shape=(70, 80, 40))
    label = np.zeros(vol.shape, np.uint8)
    label[12:24, 35:50, 15:25] = 1                      # low x = the patient's right in this RAS volume
    brain = vol > 0
    vol[label > 0] = 0.5                                 # far below the brain's 50..150: ~0.003 after scaling
    # near the lesion (within the margin, 3-D) the tissue is dark too, so any voxel of it would show
    near = (ndimage.distance_transform_edt(label == 0) < 5) & brain & (label == 0)
    vol[near] = 1.0
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "images" / "t.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "labels" / "t.nii.gz")
    cases = discover(tmp_path)
    plain, _ = build_slice_set(cases, DataConfig(lesion_margin=1), progress=False)
    s, _ = build_slice_set(cases, DataConfig(lesion_margin=1, hemispheres=True, hemisphere_margin=5),
                           progress=False)
    m = s.mirrored
    assert m.sum() > 0 and (~m).sum() == len(plain) and set(s.index[m]) <= set(range(15 - 1, 25 + 1))
    img = s.images[m].astype(np.float32)
    assert np.array_equal(img, img[:, :, ::-1])                              # a half and its mirror image
    assert not ((img > 0) & (img < 0.05)).any()                              # no lesion or near-lesion voxel
    lesion_level = 0.5 / np.percentile(vol[brain], 98)                       # where the lesion's voxels land
    assert not ((s.images[~m] > 0) & (s.images[~m] < 1.5 * lesion_level)).any()   # margin 1: no lesion voxel
    back = load_slice_set(_saved(s, tmp_path / "s.npz"))
    assert np.array_equal(back.mirrored, s.mirrored) and np.allclose(back.weight, s.weight)


def _saved(s, path):
    save_slice_set(s, path)
    return path


def test_source_weights_and_per_source_validation(folder):
    cases = [c for c in discover(folder) if c.name != "broken"]             # v0, v1, v2
    s, _ = build_slice_set(cases, DataConfig(), progress=False, sources=[0, 0, 1])
    p = s.probabilities()
    src = s.source[s.case]
    assert np.isclose(p[src == 0].sum(), 0.5) and np.isclose(p[src == 1].sum(), 0.5)   # equal shares
    s3, _ = build_slice_set(cases, DataConfig(), progress=False, sources=[0, 0, 1], source_weights=[3, 1])
    assert np.isclose(s3.probabilities()[src == 0].sum(), 0.75)
    one, _ = build_slice_set(cases, DataConfig(), progress=False)
    assert one.probabilities() is None                                      # one source: uniform, rng.integers
    train, val = split_by_case(s, 0.3, seed=0)
    assert len(val.names) == 1 and val.names[0] in ("v0", "v1")             # source 1 has one volume: kept
    assert train.source.tolist() == sorted(train.source.tolist()) and 1 in train.source.tolist()
    assert np.allclose(train.weight, s.weight[np.isin(s.case, [s.names.index(n) for n in train.names])])


def test_weighted_draws_follow_the_probabilities():
    from mimood.train.objectives import Draw

    p = np.array([0.7, 0.1, 0.2, 0.0])
    idx = Draw(4, p)(np.random.default_rng(0), 20000)
    assert np.allclose(np.bincount(idx, minlength=4) / 20000, p, atol=0.01)
    uniform = Draw(4)(np.random.default_rng(1), 5)
    assert np.array_equal(uniform, np.random.default_rng(1).integers(0, 4, 5))   # unweighted: as before
