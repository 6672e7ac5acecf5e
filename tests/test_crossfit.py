"""mimood.eval.crossfit: folds never share a subject, and a run that saw a case is refused as its scorer."""
import nibabel as nib
import numpy as np
import pytest

from mimood.config import DataConfig, RunConfig
from mimood.eval.crossfit import check_no_leak, seen_subjects, split_cases, subject_id
from mimood.train.recipes import prepare_slices

from test_data_slices import _volume


def test_split_is_disjoint_covering_and_keeps_a_subjects_files_together():
    names = [f"brats18_case{i}_{m}" for i in range(8) for m in ("t2", "flair")]
    folds = split_cases(names, k=2, seed=3)
    assert sorted(sum(folds, [])) == sorted(names)
    subjects = [{subject_id(n) for n in f} for f in folds]
    assert subjects[0].isdisjoint(subjects[1]) and len(subjects[0]) == len(subjects[1]) == 4
    assert folds == split_cases(names, k=2, seed=3) and folds != split_cases(names, k=2, seed=4)
    with pytest.raises(ValueError, match="3 subjects cannot fill 4 folds"):
        split_cases(["a_t2", "b_t2", "c_t2"], k=4)


def test_a_run_is_refused_on_the_cases_its_slices_came_from(tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    for i in range(4):
        nib.save(nib.Nifti1Image(_volume(i), np.eye(4)), data / f"case{i}_t2.nii.gz")
    cfg = RunConfig(data=DataConfig(lesion_margin=0))
    prepare_slices(tmp_path / "run", cfg, [data], progress=False)
    seen = seen_subjects(tmp_path / "run")
    assert seen == {"case0", "case1", "case2", "case3"}          # training and validation volumes both count
    check_no_leak(tmp_path / "run", ["other_t2", "case9_flair"])
    with pytest.raises(ValueError, match=r"run: trained or calibrated on 1 of the cases .*\(case2\)"):
        check_no_leak(tmp_path / "run", ["other_t2", "CASE2_flair"])
