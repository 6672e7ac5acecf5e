"""mimood.data.preprocess: slices of real and synthetic volumes, and the way back onto the input grid."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mimood.config import DataConfig
from mimood.data.preprocess import BRAIN_FLOOR, Geometry, normalise, preprocess, to_volume
from mimood.errors import InputError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
BRATS = ["2013_20_1", "cbica_ame_1", "tcia01_425_1", "tcia02_606_1", "tcia10_628_1", "tcia13_623_1"]
needs_real = pytest.mark.skipif(not (REAL / "lesion").is_dir(), reason="shared/data/real not present")
CFG = DataConfig()


def brain_volume(shape=(90, 110, 70), seed=0, centre=None):
    """A smooth ellipsoidal 'brain' (values ~100-300) in a zero background."""
    rng = np.random.default_rng(seed)
    c = np.array(shape) / 2 if centre is None else np.array(centre)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    radii = np.array(shape) * 0.38
    brain = sum(((g - ci) / r) ** 2 for g, ci, r in zip(grid, c, radii)) < 1
    texture = ndimage.gaussian_filter(rng.random(shape), 3)
    texture = (texture - texture.min()) / np.ptp(texture)
    return np.where(brain, 100 + 200 * texture, 0).astype(np.float32)


def oblique_affine(zooms, degrees=20.0, origin=(-40.0, -50.0, -30.0)):
    a = np.deg2rad(degrees)
    rot_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rot_z = np.array([[np.cos(a / 2), -np.sin(a / 2), 0], [np.sin(a / 2), np.cos(a / 2), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot_z @ rot_x @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


def test_normalisation_background_and_layout():
    data = brain_volume()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    s = preprocess(nib.Nifti1Image(data, lps), CFG)
    assert s.images.shape[1:] == (160, 160) and s.images.dtype == np.float32
    assert s.images.min() == 0.0 and s.images.max() == 1.0
    assert np.all(s.images[~s.brain] == 0) and np.all(s.images[s.brain] > 0)
    brain_vox = data[data > 0]
    assert s.geometry.intensity == [0.0, pytest.approx(np.percentile(brain_vox, 98))]
    assert np.mean(s.images[s.brain] == 1.0) == pytest.approx(0.02, abs=0.005)   # the top 2% clipped
    # the kept slices are exactly those with >= 2% brain
    frac = (data > 0).sum(axis=(0, 1)) / 160.0 ** 2
    assert s.index.tolist() == np.flatnonzero(frac >= CFG.min_brain_fraction).tolist()

    # display layout: row 0 anterior, column 0 patient-left. Punch out the most anterior-left brain voxel.
    marked = data.copy()
    z = int(s.index[len(s.index) // 2])
    xs, ys = np.nonzero(marked[:, :, z])
    # LPS storage: x index grows to the patient's left, y index grows posterior
    i = np.argmax(xs * 1000 - ys)          # most left, then most anterior
    marked[xs[i], ys[i], z] = 0
    m = preprocess(nib.Nifti1Image(marked, lps), CFG)
    k = list(m.index).index(z)
    (r,), (c,) = np.nonzero(s.brain[k] & ~m.brain[k])
    brain_rows, brain_cols = np.nonzero(s.brain[k])
    assert c == brain_cols.min()                                        # leftmost column of the brain
    assert r < np.median(brain_rows)                                    # in the anterior half


def test_clip_low_floor():
    data = brain_volume()
    cfg = DataConfig(clip_low=2.0)
    s = preprocess(nib.Nifti1Image(data, np.eye(4)), cfg)
    lo, hi = np.percentile(data[data > 0], [2, 98])
    assert s.geometry.intensity == [pytest.approx(lo), pytest.approx(hi)]
    # the lowest 2% are clipped to the floor, and stay brain: no holes in the slice
    assert np.mean(s.images[s.brain] == np.float32(BRAIN_FLOOR)) == pytest.approx(0.02, abs=0.005)
    assert np.all(s.images[s.brain] > 0) and np.all(s.images[~s.brain] == 0)


def test_negative_brain_voxels_stay_brain():
    """Raw skull-stripped scans (e.g. TCGA data) can hold negative values inside the brain: they are brain voxels
    (non-zero) and must not become background holes."""
    data = brain_volume()
    inside = np.argwhere(data > 0)[::50]
    data[tuple(inside.T)] = -40.0
    s = preprocess(nib.Nifti1Image(data, np.eye(4)), CFG)
    assert np.all(s.images[s.brain] >= BRAIN_FLOOR) and np.all(s.images[~s.brain] == 0)
    assert s.brain.sum() == (s.images > 0).sum()


def test_crop_is_centred_on_brain_bounding_box_and_pads():
    data = np.zeros((200, 120, 30), np.float32)
    data[30:181, 10:61, 5:25] = 5.0 + np.arange(30, 181)[:, None, None]   # brain extent x 30..180, y 10..60
    s = preprocess(nib.Nifti1Image(data, np.eye(4)), CFG)
    x0, y0 = s.geometry.crop
    assert (x0, y0) == ((30 + 181 - 160) // 2, (10 + 61 - 160) // 2)       # 25, -45: padded in y
    assert s.brain.sum() == (data[x0:x0 + 160, :, s.index] > 0).sum()


def test_identity_round_trip_is_exact_without_resampling(tmp_path):
    data = brain_volume(shape=(180, 200, 40), centre=(70, 120, 20))
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[:3, 3] = [90, 100, -20]
    img = nib.Nifti1Image(data, aff)
    qform = aff.copy()
    qform[:3, 3] += 0.5                                   # a qform that differs from the sform is kept too
    img.set_qform(qform, code=1)
    img.set_sform(aff, code=2)
    nib.save(img, tmp_path / "in.nii.gz")
    s = preprocess(tmp_path / "in.nii.gz", CFG, keep_all_slices=True)
    assert not s.geometry.resampled and len(s.index) == 40
    out = to_volume(s.images, s.geometry)
    nib.save(out, tmp_path / "out.nii.gz")
    back = nib.load(tmp_path / "out.nii.gz")
    assert back.shape == data.shape and np.array_equal(back.affine, nib.load(tmp_path / "in.nii.gz").affine)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
    assert np.array_equal(back.header.get_qform(), nib.load(tmp_path / "in.nii.gz").header.get_qform())
    expected, _, _ = normalise(data, data > 0, CFG)
    assert np.array_equal(back.get_fdata(dtype=np.float32), expected)


def test_geometry_survives_json_and_order0_keeps_labels_binary():
    data = brain_volume(shape=(64, 72, 30))
    label = np.zeros(data.shape, np.uint8)
    label[30:36, 30:40, 12:16] = 2
    aff = oblique_affine((1.3, 0.8, 2.0))
    s = preprocess(nib.Nifti1Image(data, aff), CFG, label=nib.Nifti1Image(label, aff))
    g = Geometry.from_dict(json.loads(json.dumps(s.geometry.to_dict())))
    back = to_volume(s.labels.astype(np.float32), g, order=0).get_fdata()
    assert set(np.unique(back)) == {0.0, 1.0}
    dice = 2 * ((back > 0) & (label > 0)).sum() / ((back > 0).sum() + (label > 0).sum())
    assert dice > 0.85
    assert np.array_equal(to_volume(s.images, g).get_fdata(), to_volume(s.images, s.geometry).get_fdata())


def test_oblique_anisotropic_volume_round_trip_is_aligned():
    data = brain_volume(shape=(80, 110, 50), seed=1)
    aff = oblique_affine((1.25, 0.9, 2.5))
    s = preprocess(nib.Nifti1Image(data, aff), CFG, keep_all_slices=True)
    g = s.geometry
    assert g.resampled and np.allclose(np.linalg.norm(np.array(g.grid_affine)[:3, :3], axis=0), 1.0)
    # the resampled grid keeps the direction cosines and the field of view's centre
    cos_in = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    cos_grid = np.array(g.grid_affine)[:3, :3]
    assert np.allclose(np.abs(cos_in), np.abs(cos_grid), atol=1e-6)
    out = to_volume(s.images, g)
    assert out.shape == data.shape and np.array_equal(out.affine, aff)
    expected, _, _ = normalise(data, data > 0, CFG)
    got = out.get_fdata(dtype=np.float32)
    inner = ndimage.binary_erosion(data > 0, iterations=2)
    assert np.all(got[data == 0] == 0)
    assert np.abs(got - expected)[inner].mean() < 0.01
    assert np.corrcoef(got[inner], expected[inner])[0, 1] > 0.99


def test_lesion_distance_and_labels():
    data = brain_volume(shape=(64, 72, 40))
    label = np.zeros(data.shape, np.uint8)
    label[30:34, 30:34, 20:23] = 1                                   # lesion on slices 20..22
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    s = preprocess(nib.Nifti1Image(data, aff), CFG, label=nib.Nifti1Image(label, aff), keep_all_slices=True)
    expected = np.array([max(0, 20 - z, z - 22) for z in range(40)], float)
    assert np.array_equal(s.lesion_distance, expected)
    assert s.labels.sum() == (label > 0).sum() and s.labels.dtype == bool
    healthy = preprocess(nib.Nifti1Image(data, aff), CFG, label=nib.Nifti1Image(np.zeros_like(label), aff))
    assert np.all(np.isinf(healthy.lesion_distance))


def test_bad_inputs_raise_input_error_with_names(tmp_path):
    data = brain_volume(shape=(40, 40, 20))
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 21), np.uint8), np.eye(4)), tmp_path / "wrong_seg.nii.gz")
    shifted = np.eye(4)
    shifted[0, 3] = 5
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 20), np.uint8), shifted), tmp_path / "shifted_seg.nii.gz")
    mask = (data > 0).astype(np.float32)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask_only.nii.gz")
    tiny = np.zeros((200, 200, 10), np.float32)
    tiny[100:103, 100:103, 5] = np.arange(9).reshape(3, 3) + 1
    nib.save(nib.Nifti1Image(tiny, np.eye(4)), tmp_path / "tiny.nii.gz")
    for kwargs, name, fragment in [
        (dict(image=tmp_path / "img.nii.gz", label=tmp_path / "wrong_seg.nii.gz"), "wrong_seg", "does not match"),
        (dict(image=tmp_path / "img.nii.gz", label=tmp_path / "shifted_seg.nii.gz"), "shifted_seg", "affine"),
        (dict(image=tmp_path / "mask_only.nii.gz"), "mask_only", "no range"),
        (dict(image=tmp_path / "tiny.nii.gz"), "tiny", "no axial slice"),
        (dict(image=tmp_path / "absent.nii.gz"), "absent", "not found"),
    ]:
        with pytest.raises(InputError) as err:
            preprocess(cfg=CFG, **kwargs)
        assert name in str(err.value) and fragment in str(err.value)


@needs_real
@pytest.mark.parametrize("case", BRATS)
def test_brats_round_trip_is_exact_inside_the_crop(case):
    t2, seg = REAL / "lesion" / f"brats18_{case}_t2.nii.gz", REAL / "lesion" / f"brats18_{case}_seg.nii.gz"
    src = nib.load(t2)
    s = preprocess(t2, CFG, label=seg)
    g = s.geometry
    assert g.shape == [240, 240, 155] and not g.resampled and nib.aff2axcodes(src.affine) == ("L", "P", "S")
    assert 100 < len(s.index) <= 155 and s.labels.any()
    out = to_volume(s.images, g)
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert int(out.header["qform_code"]) == int(src.header["qform_code"])
    assert int(out.header["sform_code"]) == int(src.header["sform_code"])
    data = src.get_fdata(dtype=np.float32)
    expected, _, _ = normalise(data, data != 0, CFG)
    got = out.get_fdata(dtype=np.float32)
    # inside the crop window and on kept slices: identical; elsewhere 0. Map the window back to input voxels.
    window = to_volume(np.ones_like(s.images), g, order=0).get_fdata() > 0
    assert np.array_equal(got[window], expected[window])
    assert np.all(got[~window] == 0)
    assert window.sum() / (data != 0).sum() > 0.97                      # the 160 x 160 crop keeps the brain
    # labels come back exactly inside the window
    lab = to_volume(s.labels.astype(np.float32), g, order=0).get_fdata() > 0
    seg_mask = nib.load(seg).get_fdata() > 0
    assert np.array_equal(lab, seg_mask & window)
    # LPS -> RAS keeps the axial order, so the kept slices at distance 0 are the labelled input slices
    assert set(s.index[s.lesion_distance == 0]) == set(np.nonzero(seg_mask)[2]) & set(s.index)


@needs_real
def test_volunteer_scan_1x1x2mm_round_trip():
    path = REAL / "healthy" / "niivue_volunteer_t2w.nii.gz"
    src = nib.load(path)
    s = preprocess(path, CFG)
    g = s.geometry
    assert g.resampled and g.grid_shape[2] == 2 * src.shape[2]
    out = to_volume(s.images, g)
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    data = src.get_fdata(dtype=np.float32)
    expected, _, _ = normalise(data, data != 0, CFG)
    got = out.get_fdata(dtype=np.float32)
    window = to_volume(np.ones_like(s.images), g, order=0).get_fdata() > 0
    inner = ndimage.binary_erosion(window & (data != 0), iterations=2)
    assert np.abs(got - expected)[inner].mean() < 0.03
    assert np.corrcoef(got[inner], expected[inner])[0, 1] > 0.99
    assert np.all(got[data == 0] == 0)
