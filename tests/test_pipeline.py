"""The main job (`mimood-demo`): the training path end to end with the tiny preset on a small demo set (every
stage leaves its output, the maps come back on the inputs' grids, a second call resumes instead of redoing the
work), then the default path, which trains nothing: a model maps the demo test scans and real scans."""
import json

import nibabel as nib
import numpy as np

from mimood.data.demo import make_demo
from mimood.pipeline import run_demo


def test_demo_pipeline_end_to_end_and_resumes(tmp_path):
    make_demo(tmp_path / "data", n_train=3, n_test_lesion=1, n_test_healthy=1, seed=3, progress=False)
    lines: list[str] = []
    result = run_demo(tmp_path, train=True, preset="tiny", say=lines.append, progress=False, backend="ort")

    assert [line[:5] for line in lines if line.startswith("[")] == [f"[{i}/6]" for i in range(1, 7)]
    run = tmp_path / "run"
    cal = json.loads((run / "calibration.json").read_text())
    assert np.isfinite(cal["threshold"]) and 0.0 <= cal["lam"] <= 1.0
    assert set(cal["methods"]) == {"mimood"}                  # the demo infers with MIM-OOD only
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["threshold"] == cal["threshold"]
    assert result["backend"].startswith("ort")

    images = sorted((tmp_path / "data" / "test" / "images").glob("*.nii.gz"))
    for image in images:
        name = image.name[:-len(".nii.gz")]
        src, out = nib.load(image), nib.load(tmp_path / "maps" / image.name)
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
        assert (tmp_path / "maps" / f"{name}_mask.nii.gz").exists() and (tmp_path / "maps" / f"{name}.png").exists()
    assert set(result["cases"]) == {i.name[:-len(".nii.gz")] for i in images}
    lesion = [c for c in result["cases"].values() if c["lesion_voxels"]]
    assert len(lesion) == 1 and 0.0 <= lesion[0]["dice"] <= 1.0

    stamp = (run / "vqvae" / "last.safetensors").stat().st_mtime_ns
    again = run_demo(tmp_path, train=True, preset="tiny", say=lambda s: None, progress=False, backend="ort")
    assert (run / "vqvae" / "last.safetensors").stat().st_mtime_ns == stamp      # training was not redone
    assert again["cases"] == result["cases"]

    # the default path: no training, the given model (the bundled one when none is given) on the same test scans
    # and on "real" scans (here a demo scan under another name, with its label, and one without a mask)
    images, labels = tmp_path / "data" / "test" / "images", tmp_path / "data" / "test" / "labels"
    lesion_name = next(n for n, c in result["cases"].items() if c["lesion_voxels"])
    healthy_name = next(n for n, c in result["cases"].items() if not c["lesion_voxels"])
    real = [(images / f"{lesion_name}.nii.gz", labels / f"{lesion_name}.nii.gz"), (images / f"{healthy_name}.nii.gz", None)]
    make_demo(tmp_path / "default" / "data", n_train=0, n_test_lesion=1, n_test_healthy=1, seed=3, progress=False)
    lines = []
    default = run_demo(tmp_path / "default", model=run / "export", say=lines.append, progress=False, backend="ort",
                       real=real)
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/3]", "[2/3]", "[3/3]"]
    assert not (tmp_path / "default" / "run").exists()                              # nothing trained
    assert default["cases"] == result["cases"]              # the same test scans (seeded), the same model
    assert default["real"][lesion_name]["labelled"] and default["real"][lesion_name]["dice"] == result["cases"][lesion_name]["dice"]
    assert default["real"][healthy_name] == {"dice": None, "lesion_voxels": 0, "labelled": False,
                                             "flagged_voxels": result["cases"][healthy_name]["flagged_voxels"]}
