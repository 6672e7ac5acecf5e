"""mimood.data.discover: the three folder layouts, labels, and what is never an image."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mimood.config import DataConfig
from mimood.data.discover import check_case, discover
from mimood.errors import InputError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _touch(path: Path, data=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32) if data is None else data, np.eye(4)), path)
    return path


def test_brats_layout_picks_modality_and_pairs_seg(tmp_path):
    for case in ("Brats18_A_1", "Brats18_B_1"):
        for m in ("t1", "t2", "flair", "seg"):
            _touch(tmp_path / case / f"{case}_{m}.nii.gz")
    _touch(tmp_path / "Brats18_C_1" / "Brats18_C_1_t2.nii.gz")          # unlabelled case
    _touch(tmp_path / "Brats18_C_1" / "Brats18_C_1_flair.nii.gz")
    cases = discover(tmp_path)
    assert [c.name for c in cases] == ["Brats18_A_1_t2", "Brats18_B_1_t2", "Brats18_C_1_t2"]
    assert cases[0].label == tmp_path / "Brats18_A_1" / "Brats18_A_1_seg.nii.gz"
    assert cases[2].label is None
    assert [c.name for c in discover(tmp_path, modality="flair")][0] == "Brats18_A_1_flair"
    with pytest.raises(InputError) as err:
        discover(tmp_path, require_labels=True)
    assert "Brats18_C_1_t2.nii.gz" in str(err.value) and "no label found (expected" in str(err.value)
    assert "Brats18_C_1_seg.nii.gz" in str(err.value)
    with pytest.raises(InputError) as err:
        discover(tmp_path, modality="t1ce")
    assert "--modality" in str(err.value) and "flair, t1, t2" in str(err.value)


def test_images_labels_layout(tmp_path):
    for name in ("sub02", "sub01"):
        _touch(tmp_path / "images" / f"{name}.nii.gz")
    _touch(tmp_path / "labels" / "sub01.nii")                            # .nii vs .nii.gz is fine
    cases = discover(tmp_path)
    assert [(c.name, c.label) for c in cases] == [("sub01", tmp_path / "labels" / "sub01.nii"), ("sub02", None)]
    assert [c.name for c in discover(tmp_path / "images")] == ["sub01", "sub02"]
    with pytest.raises(InputError) as err:
        discover(tmp_path, require_labels=True)
    assert str(err.value).startswith(str(tmp_path / "images" / "sub02.nii.gz"))
    assert str(tmp_path / "labels" / "sub02.nii.gz") in str(err.value)
    # a single file finds its label the same way
    single = discover(tmp_path / "images" / "sub01.nii.gz", require_labels=True)
    assert single[0].label == tmp_path / "labels" / "sub01.nii"


def test_plain_folder_is_recursive_and_skips_labels_masks_hidden(tmp_path):
    _touch(tmp_path / "a.nii.gz")
    _touch(tmp_path / "a_seg.nii.gz")
    _touch(tmp_path / "deep" / "er" / "b.nii")
    _touch(tmp_path / "deep" / "b_mask.nii.gz")
    _touch(tmp_path / "deep" / "er" / "x" / "a.nii.gz")                 # same file name as the top-level one
    _touch(tmp_path / ".c.tmp-123.nii.gz")
    (tmp_path / "notes.txt").write_text("not a volume")
    cases = discover(tmp_path)
    assert [c.name for c in cases] == ["a", "b", "deep__er__x__a"]   # sorted by path
    assert cases[0].label == tmp_path / "a_seg.nii.gz" and cases[1].label is None
    with pytest.raises(InputError) as err:
        discover(tmp_path, require_labels=True)
    assert "b.nii: no label found" in str(err.value) and "(1 more cases lack labels)" in str(err.value)


def test_nothing_found(tmp_path):
    with pytest.raises(InputError) as err:
        discover(tmp_path)
    assert str(err.value) == f"{tmp_path}: no .nii or .nii.gz volumes found"
    with pytest.raises(InputError, match="no such file"):
        discover(tmp_path / "absent")
    _touch(tmp_path / "x_seg.nii.gz")
    with pytest.raises(InputError, match="only label/mask volumes"):
        discover(tmp_path)


def test_check_case_reports_problems(tmp_path):
    _touch(tmp_path / "images" / "ok.nii.gz", np.pad(np.random.default_rng(0).random((30, 30, 30)) + 1, 5))
    _touch(tmp_path / "images" / "zero.nii.gz", np.zeros((10, 10, 10), np.float32))
    ok, zero = discover(tmp_path)
    cfg = DataConfig()
    assert check_case(ok, cfg) == []
    assert check_case(zero, cfg) == [f"{zero.image}: all voxels are zero (empty volume)"]
    problems = check_case(ok, cfg, require_label=True)
    assert len(problems) == 1 and "no label found" in problems[0]


@pytest.mark.skipif(not (REAL / "lesion").is_dir(), reason="shared/data/real not present")
def test_real_brats_folder():
    cases = discover(REAL / "lesion")
    brats = [c for c in cases if c.name.startswith("brats18_")]
    assert len(brats) == 6 and all(c.label is not None and c.label.name.endswith("_seg.nii.gz") for c in brats)
    assert [c.name for c in cases if c.label is None] == ["cstar_stroke_t2"]
    assert len(discover(REAL / "lesion", modality="flair")) == 7


def test_output_names_never_clash(tmp_path):
    """a.nii beside a.nii.gz, Case beside case, sub/b beside a file named sub__b, x_mask beside x's mask: every
    case gets its own output names, compared ignoring case."""
    for rel in ("a.nii", "a.nii.gz", "sub/b.nii.gz", "other/b.nii.gz", "sub__b.nii.gz", "Case.nii.gz",
                "case.nii.gz", "x.nii.gz"):
        _touch(tmp_path / rel)
    _touch(tmp_path / "images_like" / "x_mask.nii.gz")          # an image named like x's mask (images/ layout)
    cases = discover(tmp_path)
    names = {c.image.relative_to(tmp_path).as_posix(): c.name for c in cases}
    assert names == {"a.nii": "a_nii", "a.nii.gz": "a_nii_gz", "Case.nii.gz": "Case", "case.nii.gz": "case__2",
                     "other/b.nii.gz": "other__b", "sub/b.nii.gz": "sub__b", "sub__b.nii.gz": "sub__b__2",
                     "x.nii.gz": "x"}                               # *_mask files are never images here
    images = tmp_path / "il"
    _touch(images / "images" / "x.nii.gz")
    _touch(images / "images" / "x_mask.nii.gz")
    assert [c.name for c in discover(images)] == ["x", "x_mask__2"]


def test_broken_links_loops_and_folders_are_cases(tmp_path):
    _touch(tmp_path / "ok.nii.gz")
    (tmp_path / "dangling.nii.gz").symlink_to("gone.nii.gz")
    (tmp_path / "loop.nii.gz").symlink_to("loop.nii.gz")
    (tmp_path / "dir.nii").mkdir()
    (tmp_path / "dirlink").symlink_to(tmp_path)                   # a link to a folder is not followed
    cases = discover(tmp_path)
    assert [c.name for c in cases] == ["dangling", "dir", "loop", "ok"]
    problems = [check_case(c, DataConfig(), skull=False) for c in cases]
    assert "broken symbolic link" in problems[0][0] and "is a folder" in problems[1][0]
    assert "symbolic link loop" in problems[2][0]


def test_check_case_reports_a_whole_head(tmp_path):
    from mimood.testing.fuzz import synthetic_scan

    nib.save(synthetic_scan(head=True), tmp_path / "head.nii.gz")
    case, = discover(tmp_path)
    problems = check_case(case, DataConfig())
    assert len(problems) == 1 and problems[0].startswith(f"{case.image}: not skull-stripped? (")
    assert check_case(case, DataConfig(), skull=False) == []
