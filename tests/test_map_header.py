"""The map's and the mask's NIfTI headers tell the truth: descrip (mimood version, score name), the display window
cal_min/cal_max, and the map's values in [0, 1]; every report column is described with its unit."""
import nibabel as nib
import numpy as np

import mimood
from mimood.config import DataConfig
from mimood.data.preprocess import preprocess
from mimood.runtime.outputs import output_paths, write_scan

AFFINE = np.array([[-1.0, 0, 0, 30], [0, 1.0, 0, -20], [0, 0, 1.5, -10], [0, 0, 0, 1]])


def scan(path):
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 48, 20)], indexing="ij")
    brain = x ** 2 + y ** 2 + z ** 2 <= 0.8
    img = nib.Nifti1Image(np.where(brain, rng.uniform(50, 150, brain.shape), 0).astype(np.float32), AFFINE)
    img.header["descrip"] = b"TE=90;Time=1234"                               # the scanner's, not ours
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    nib.save(img, str(path))


def test_descrip_and_window(tmp_path):
    scan(tmp_path / "a.nii.gz")
    slices = preprocess(tmp_path / "a.nii.gz", DataConfig())
    maps = np.where(slices.brain, np.random.default_rng(1).uniform(0, 1, slices.images.shape), 0)
    paths = output_paths(tmp_path / "out", "a", tmp_path / "a.nii.gz")
    write_scan(paths, slices, maps.astype(np.float32), 0.08, score_name="ood.mirror")
    m, k = nib.load(paths["map"]), nib.load(paths["mask"])
    v = mimood.__version__
    assert m.header["descrip"].item().decode() == f"mimood {v} anomaly map [0,1]; scan score ood.mirror"
    assert (float(m.header["cal_min"]), float(m.header["cal_max"])) == (np.float32(0.08), np.float32(0.16))
    data = m.get_fdata()
    assert 0 <= data.min() and data.max() <= 1
    assert k.header["descrip"].item().decode() == f"mimood {v} anomaly mask: map > 0.08"
    assert (float(k.header["cal_min"]), float(k.header["cal_max"])) == (0, 1)
    assert np.allclose(m.affine, AFFINE) and np.allclose(k.affine, AFFINE)

    paths["mask"].unlink()
    write_scan(paths, slices, maps.astype(np.float32), None)                # no threshold: [0, 1], no mask
    m = nib.load(paths["map"])
    assert (float(m.header["cal_min"]), float(m.header["cal_max"])) == (0, 1)
    assert m.header["descrip"].item().decode().endswith("scan score map") and not paths["mask"].exists()


def test_every_report_column_is_described_with_its_unit():
    import pytest
    from mimood.runtime.outputs import COLUMNS, columns_sidecar, describe_columns

    side = columns_sidecar()
    assert [c["name"] for c in side["columns"]] == COLUMNS
    units = {c["name"]: c["unit"] for c in side["columns"]}
    assert units["largest_ml"] == units["flagged_ml"] == "ml" and units["largest_r_mm"] == "mm"
    assert units["scan_score"].endswith("[0, 1]") and units["seconds"] == "s"
    assert all(c["description"] for c in side["columns"])
    with pytest.raises(KeyError, match="largest_ml"):
        describe_columns(["file", "largest_ml"])                          # no description given: refused
