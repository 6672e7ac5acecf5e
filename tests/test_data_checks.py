"""mimood.data.checks: the skull-stripping check on synthetic heads and brains, and on the real volumes it was
tuned on (skipped when /work/shared is absent)."""
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mimood.data.checks import check_skull_stripped, skull_check
from mimood.data.io import load_volume
from mimood.errors import InputError, InputWarning
from mimood.testing.fuzz import synthetic_scan

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
HEADS = ["healthy/mni152_t2_2mm_head_template.nii.gz", "healthy/niivue_volunteer_t2w.nii.gz"]
BRAINS = ([f"lesion/brats18_{c}_t2.nii.gz" for c in ("2013_20_1", "cbica_ame_1", "tcia01_425_1", "tcia02_606_1",
                                                     "tcia10_628_1", "tcia13_623_1")]
          + ["healthy/mni152_t2_1mm_brain_template.nii.gz", "lesion/stroke_nomask/cstar_stroke_t2.nii.gz",
             "lesion_algseg/tcga_du_7294_t2.nii.gz", "lesion_algseg/tcia_example_t2.nii.gz"])


def test_synthetic_head_fails_and_brain_passes(tmp_path):
    brain, head = skull_check(synthetic_scan()), skull_check(synthetic_scan(head=True))
    assert brain.stripped and brain.reasons == [] and brain.background_share > 0.5 and brain.edge_share == 0
    assert not head.stripped and head.background_share < 0.2 and head.edge_share > 0.8
    assert "not skull-stripped?" in head.message() and "outer shell" in head.message()
    # the same brain stored at 2 mm has the same volume in ml
    big = synthetic_scan(shape=(96, 112, 30))
    half = nib.Nifti1Image(np.asarray(big.dataobj)[::2, ::2, ::2], big.affine @ np.diag([2.0, 2, 2, 1]))
    assert skull_check(half).nonzero_ml == pytest.approx(skull_check(big).nonzero_ml, rel=0.05)


def test_check_modes():
    head = synthetic_scan(head=True)
    with pytest.raises(InputError, match=r"^h\.nii: not skull-stripped\? \("):
        check_skull_stripped(head, "h.nii", "refuse")
    with pytest.warns(InputWarning, match="not skull-stripped"):
        assert not check_skull_stripped(head, "h.nii", "warn").stripped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_skull_stripped(head, "h.nii", "ignore").stripped
        assert check_skull_stripped(synthetic_scan(), "b.nii", "refuse").stripped
    with pytest.raises(ValueError, match="on_fail"):
        check_skull_stripped(head, "h.nii", "maybe")


@pytest.mark.skipif(not (REAL / "healthy").is_dir(), reason="shared/data/real not present")
@pytest.mark.parametrize("name", HEADS + BRAINS)
def test_real_volumes(name):
    result = skull_check(load_volume(REAL / name))
    assert result.stripped == (name not in HEADS), (name, result)
    if name in HEADS:          # every measure alone catches both heads
        assert len(result.reasons) == 3
