"""The synthetic healthy-scan generator (mimood.data.synth) on a hand-made label map: seeded, T2 ordering of the
structures, skull-stripped, the input grid and affine kept, and the `mimood-data synth` command."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mimood.cli.data import main as data_cli
from scipy import ndimage

from mimood.data.synth import SynthConfig, canonical_rotation, make_synth, synthesize

WM, GM, CSF, VENTRICLE, SKULL = 2, 3, 24, 4, 507


def label_map(n: int = 72) -> np.ndarray:
    """Nested spheres: ventricle core, white matter, cortex, CSF, then skull; background outside."""
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    lab = np.zeros((n, n, n), np.int16)
    for radius, value in ((33, SKULL), (28, CSF), (25, GM), (19, WM), (9, VENTRICLE)):
        lab[r <= radius] = value
    return lab


AFFINE = np.array([[-1.0, 0, 0, 40], [0, 0, 1, -30], [0, -1, 0, 35], [0, 0, 0, 1]])   # LIA, like the SynthSeg maps


def test_seeded_and_different_across_seeds():
    lab = label_map()
    a, la, pa = synthesize(lab, AFFINE, np.random.default_rng(3))
    b, lb, pb = synthesize(lab, AFFINE, np.random.default_rng(3))
    c, _, _ = synthesize(lab, AFFINE, np.random.default_rng(4))
    assert np.array_equal(a, b) and np.array_equal(la, lb) and pa == pb
    assert not np.array_equal(a, c)
    assert a.shape == lab.shape and a.dtype == np.float32


def test_structure_means_follow_t2_contrast():
    """Without acquisition effects each structure is exactly its drawn mean, and the means are in T2 order:
    white matter < grey matter < CSF, ventricles above grey matter, deep grey nuclei between white and grey."""
    clean = SynthConfig(texture=(0, 0), blur_mm=(0, 0), thick_slice_p=0, bias=0, noise=(0, 0), gamma=(1, 1))
    lab = label_map()
    lab[np.linalg.norm(np.indices(lab.shape) - 35.5, axis=0) <= 3] = 12       # a putamen inside the ventricle
    for seed in range(20):
        img, warped, p = synthesize(lab, AFFINE, np.random.default_rng(seed), clean)
        m = p["means"]
        assert m["wm"] < m["gm"] < m["csf"] and m["ventricles"] > m["gm"] and m["wm"] < m["putamen"] < m["gm"]
        scale = img[warped == WM][0] / m["wm"]                     # the image is stored up to a global scale
        for value, name in ((WM, "wm"), (GM, "gm"), (CSF, "csf"), (VENTRICLE, "ventricles"), (12, "putamen")):
            assert np.allclose(img[warped == value], m[name] * scale, rtol=2e-3), name   # means rounded


@pytest.mark.parametrize("seed", range(6))
def test_ordering_survives_acquisition_and_skull_stripping(seed):
    lab = label_map()
    img, warped, params = synthesize(lab, AFFINE, np.random.default_rng(seed))
    core = lambda v: np.median(img[ndimage.binary_erosion(warped == v, iterations=2)])   # noqa: E731
    assert core(WM) < core(GM) < core(VENTRICLE)             # bias, blur, noise and gamma keep the order
    # skull-stripped: nothing outside the kept labels, every kept voxel positive; no skull label survives
    assert not (warped >= 500).any()
    assert np.all(img[warped == 0] == 0) and np.all(img[warped > 0] > 0)
    assert (warped == GM).sum() > 0.5 * (lab == GM).sum()                    # the deformation is small


def test_far_csf_is_dropped():
    lab = label_map()
    lab[lab == SKULL] = CSF                          # a thick CSF shell: only a few mm of it may stay brain
    img, warped, params = synthesize(lab, AFFINE, np.random.default_rng(0))
    r = np.linalg.norm(np.indices(lab.shape) - (lab.shape[0] - 1) / 2, axis=0)
    assert not (img[r > 25 + params["csf_shell_mm"] + 4] > 0).any()           # beyond the shell (+ deformation)


def test_canonical_rotation_needs_landmarks():
    assert np.allclose(canonical_rotation(label_map(), AFFINE), np.eye(3))   # no hemispheres/cerebellum labels
    lab = np.zeros((40, 40, 40), np.int16)                                  # left/right and thalamus/cerebellum
    lab[5:15, 10:30, 10:30], lab[25:35, 10:30, 10:30] = 2, 41               # left: low x in RAS
    lab[18:22, 18:22, 20:24], lab[18:22, 18:22, 8:12] = 10, 8               # cerebellum below the thalamus
    R = canonical_rotation(lab, np.eye(4))
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(R), 1)
    down = R @ np.array([0.0, 0, -1])                                        # thalamus -> cerebellum, rotated
    assert np.isclose(np.degrees(np.arctan2(-down[2], -down[1])), 40, atol=1e-6)


def test_make_synth_and_cli_keep_the_grid(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    for k in range(2):
        nib.save(nib.Nifti1Image(label_map(64 + 4 * k).astype(np.float32), AFFINE), maps / f"seg_{k}.nii.gz")
    out = tmp_path / "synth"
    info = make_synth(maps, out, n=3, seed=1, progress=False)
    files = sorted(out.glob("synth_*.nii.gz"))
    assert [v["file"] for v in info["volumes"]] == ["synth_seg_0_00.nii.gz", "synth_seg_1_00.nii.gz",
                                                    "synth_seg_0_01.nii.gz"]
    assert len(files) == 3 and (out / "NOTICE.txt").is_file()
    for v in info["volumes"]:
        img = nib.load(out / v["file"])
        src = nib.load(maps / v["source"])
        assert img.shape == src.shape and np.allclose(img.affine, src.affine)
        assert img.get_data_dtype() == np.int16 and np.asarray(img.dataobj).max() > 0
    meta = json.loads((out / "synth.json").read_text())
    assert meta["seed"] == 1 and len(meta["volumes"]) == 3
    first = (out / files[0].name).read_bytes()
    r = CliRunner().invoke(data_cli, ["synth", "-i", str(maps), "--n", "4", "-o", str(out),
                                      "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "wrote 4 volumes from 2 label maps" in r.output
    assert (out / files[0].name).read_bytes() == first                        # kept, not redrawn
    r = CliRunner().invoke(data_cli, ["synth", "-i", str(maps), "--n", "1", "-o", str(tmp_path / "x"),
                                      "--select", "5:9"])
    assert r.exit_code == 2 and "leaves no label map" in r.output
