"""--format mood: for each input `<name>` exactly `<name>` (a [0, 1] map on the input's grid and affine) and
`<name>.txt` (the [0, 1] scan score), nothing else, read back as the MOOD evaluator reads them."""
import nibabel as nib
import numpy as np
import pytest

from mimood.runtime.mood import check_mood_folder, mood_paths, write_mood_scan

AFFINE = np.array([[0.0, -1.2, 0, 50], [0.9, 0, 0, -30], [0, 0, 2.5, -12], [0, 0, 0, 1]])   # non-RAS, anisotropic


def inputs(folder):
    folder.mkdir()
    paths = []
    for name, shape in (("00017.nii.gz", (20, 24, 10)), ("case_b.nii", (18, 16, 12))):
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), AFFINE), str(folder / name))
        paths.append(folder / name)
    return paths


def test_folder_holds_exactly_the_expected_files(tmp_path):
    images, out = inputs(tmp_path / "in"), tmp_path / "pred"
    for k, image in enumerate(images):
        ref = nib.load(image)
        amap = np.linspace(-0.2, 1.3, ref.get_fdata().size, dtype=np.float32).reshape(ref.shape)   # over the range
        write_mood_scan(out, image, nib.Nifti1Image(amap, ref.affine, ref.header), score=[0.25, 0.999][k])
    assert sorted(p.name for p in out.iterdir()) == ["00017.nii.gz", "00017.nii.gz.txt", "case_b.nii",
                                                      "case_b.nii.txt"]
    assert check_mood_folder(out, images) == []
    for image in images:                                                     # as the evaluator reads them
        pred_path, score_path = mood_paths(out, image)
        pred, ref = nib.load(pred_path), nib.load(image)
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
        values = pred.get_fdata(dtype=np.float16)
        assert values.min() == 0 and values.max() == 1                       # clipped to [0, 1] here, not there
        with open(score_path) as f:
            assert 0 <= float(f.readline()) <= 1
    assert float((out / "case_b.nii.txt").read_text()) == 0.999


def test_problems_are_named(tmp_path):
    images, out = inputs(tmp_path / "in"), tmp_path / "pred"
    ref = nib.load(images[0])
    write_mood_scan(out, images[0], nib.Nifti1Image(np.zeros(ref.shape, np.float32), ref.affine), 0.5)
    (out / "report.csv").write_text("x\n")
    (out / "00017.nii.gz.txt").write_text("high\n")
    problems = check_mood_folder(out, images)
    assert any("case_b.nii: missing" in p for p in problems)
    assert any("case_b.nii.txt: missing" in p for p in problems)
    assert any("report.csv: not part of the MOOD convention" in p for p in problems)
    assert any("00017.nii.gz.txt: the first line is not a number" in p for p in problems)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_mood_scan(out, images[1], nib.Nifti1Image(np.zeros((18, 16, 12), np.float32), AFFINE), 8.7)
    assert not (out / "case_b.nii").exists()                                 # refused before writing anything
