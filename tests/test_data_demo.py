"""mimood.data.demo: seeded, bit-identical synthetic volumes with plausible lesions inside the brain."""
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mimood.config import DataConfig
from mimood.data.demo import load_template, make_demo
from mimood.data.discover import discover
from mimood.data.preprocess import preprocess


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    info = make_demo(out, n_train=1, n_test_lesion=1, n_test_healthy=1, seed=7, progress=False)
    return out, info


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_template_ships_with_the_package():
    t = load_template()
    assert t.shape == (182, 218, 182) and nib.aff2axcodes(t.affine) == ("L", "A", "S")
    assert (t.get_fdata() > 0).sum() == 2_075_298


def test_layout_description_and_determinism(demo, tmp_path):
    out, info = demo
    files = _files(out)
    assert sorted(files) == ["README.txt", "demo.json", "test/images/healthy_test_000.nii.gz",
                             "test/images/lesion_000.nii.gz", "test/labels/healthy_test_000.nii.gz",
                             "test/labels/lesion_000.nii.gz", "train/healthy_000.nii.gz"]
    assert json.loads(files["demo.json"]) == info
    assert info["seed"] == 7 and info["train"] == ["train/healthy_000.nii.gz"]
    assert b"seed 7" in files["README.txt"]
    # the same seed gives bit-identical files, whatever else is generated beside them
    again = make_demo(tmp_path / "again", n_train=0, n_test_lesion=1, n_test_healthy=0, seed=7, progress=False)
    assert again["test"] == info["test"][:1]
    again_files = _files(tmp_path / "again")
    for name in ("test/images/lesion_000.nii.gz", "test/labels/lesion_000.nii.gz"):
        assert again_files[name] == files[name]
    other = make_demo(tmp_path / "other", n_train=1, n_test_lesion=0, n_test_healthy=0, seed=8, progress=False)
    assert other["train"] == info["train"]
    assert (tmp_path / "other" / "train" / "healthy_000.nii.gz").read_bytes() != files["train/healthy_000.nii.gz"]


def test_volumes_are_skull_stripped_subjects_with_labels_inside_the_brain(demo):
    out, info = demo
    train = nib.load(out / "train" / "healthy_000.nii.gz")
    healthy = nib.load(out / "test" / "images" / "healthy_test_000.nii.gz")
    assert train.get_data_dtype() == np.int16 and list(train.shape) == info["shape"]
    assert int(train.header["sform_code"]) == 1 and np.array_equal(train.affine, healthy.affine)
    a, b = train.get_fdata(), healthy.get_fdata()
    assert a.min() == 0 and (a > 0).mean() > 0.3
    # different subjects: different brain masks and intensities, but the same kind of anatomy
    assert ((a > 0) != (b > 0)).mean() > 0.01 and ((a > 0) & (b > 0)).sum() / (a > 0).sum() > 0.8
    assert not np.any(nib.load(out / "test" / "labels" / "healthy_test_000.nii.gz").get_fdata())

    img = nib.load(out / "test" / "images" / "lesion_000.nii.gz").get_fdata()
    label = np.asarray(nib.load(out / "test" / "labels" / "lesion_000.nii.gz").dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2} and label.any()
    assert np.all(img[label > 0] > 0)                                        # lesions stay inside the brain
    lesions = info["test"][0]["lesions"]
    assert 2 <= len(lesions) <= 3
    components, n = ndimage.label(label > 0)
    assert n >= len(lesions) - 1                                             # separate, maybe touching
    for lesion in lesions:
        c = tuple(lesion["centre_voxel"])
        assert label[c] > 0 and img[c] > 0
        region = components == components[c]
        core = region & (label == 1)
        shell = ndimage.binary_dilation(region, iterations=4) & ~ndimage.binary_dilation(region) & (img > 0)
        ratio = img[core].mean() / img[shell].mean()
        if lesion["kind"] == "hyper":
            assert ratio > 1.2, lesion
        else:
            assert ratio < 0.85, lesion
        assert abs(region.sum() / 1000 - lesion["volume_ml"]) < 0.5 * lesion["volume_ml"] + 0.2


def test_demo_test_set_is_discoverable_and_preprocesses(demo):
    out, _ = demo
    cases = discover(out / "test", require_labels=True)
    assert [c.name for c in cases] == ["healthy_test_000", "lesion_000"]
    s = preprocess(cases[1].image, DataConfig(), label=cases[1].label)
    assert s.labels.any() and not s.geometry.resampled and s.images.shape[1:] == (160, 160)
    assert s.brain.sum() / (nib.load(cases[1].image).get_fdata() > 0).sum() > 0.97  # the brain fits the crop
