"""`mimood-infer` / `infer_folder` on small synthetic volumes: outputs on the input grid, bad scans reported and
skipped, exit codes, `--continue`, `--part`, and an export without a calibrated threshold."""
import csv
import gzip
import hashlib
import json
import shutil

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mimood.cli.infer import main
from mimood.contract import Manifest
from mimood.runtime import infer_folder
from test_runtime import THRESHOLD, tiny_export_folder

# LAS axes, 1.5 mm between axial slices (so preprocessing resamples), an offset origin
AFFINE = np.array([[-1.0, 0, 0, 30], [0, 1.0, 0, -20], [0, 0, 1.5, -10], [0, 0, 0, 1]])
VOXEL_ML = 1.5 / 1000


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export_folder(tmp_path_factory)


def write_scan(path, seed=0, shape=(40, 48, 10)):
    """A small textured ellipsoid 'brain' (background 0), saved as NIfTI with AFFINE."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = x ** 2 + y ** 2 + (z / 1.2) ** 2 <= 0.8
    data = np.where(brain, rng.uniform(50, 150, shape), 0).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return data


def read_report(path):
    with open(path, newline="") as f:
        return {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}


def test_folder_with_a_good_a_corrupt_and_a_4d_scan(export, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    data = write_scan(inp / "good.nii")                                     # uncompressed: map keeps .nii
    write_scan(inp / "whole.nii.gz", seed=1)
    raw = (inp / "whole.nii.gz").read_bytes()
    (inp / "corrupt.nii.gz").write_bytes(raw[: len(raw) // 2])            # a cut-off download
    (inp / "whole.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), str(inp / "fourd.nii.gz"))

    res = CliRunner().invoke(main, [str(inp), "-o", str(out), "--export", str(export), "--backend", "ort"])
    assert res.exit_code == 1, res.output

    rows = read_report(out / "report.csv")
    assert set(rows) == {"good.nii", "corrupt.nii.gz", "fourd.nii.gz"}
    assert rows["good.nii"]["status"] == "ok" and rows["good.nii"]["error"] == ""
    assert rows["corrupt.nii.gz"]["status"] == "failed" and "truncated gzip" in rows["corrupt.nii.gz"]["error"]
    assert rows["fourd.nii.gz"]["status"] == "failed" and "4-D" in rows["fourd.nii.gz"]["error"]
    assert "ort fp32 CPUExecutionProvider" in rows["good.nii"]["backend"]
    assert int(rows["good.nii"]["slices"]) > 0

    img = nib.load(str(out / "good.nii"))                                   # the map, on the input's grid
    amap = np.asarray(img.dataobj)
    assert amap.shape == data.shape and amap.dtype == np.float32
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    assert (amap[data == 0] == 0).all() and amap.max() > THRESHOLD
    mask = nib.load(str(out / "good_mask.nii.gz"))
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), amap > THRESHOLD)
    assert float(rows["good.nii"]["anomalous_ml"]) == pytest.approx((amap > THRESHOLD).sum() * VOXEL_ML,
                                                                    rel=1e-5)
    assert 0 < float(rows["good.nii"]["scan_score"]) <= amap.max() + 1e-6

    png = out / "good.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, channels = matplotlib.image.imread(str(png)).shape
    assert w > h > 100 and channels in (3, 4)
    assert not list(out.glob("corrupt*")) and not list(out.glob("fourd*"))  # nothing for the bad scans
    assert not [p for p in out.iterdir() if p.name.startswith(".")]        # no temporary files left

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["backend_used"].startswith("ort fp32 CPUExecutionProvider") and prov["finished"]
    assert prov["manifest_sha256"] == hashlib.sha256((export / "manifest.json").read_bytes()).hexdigest()
    assert prov["scans"][str(inp / "good.nii")]["shape"] == list(data.shape)


def test_continue_skips_finished_scans_and_redoes_unfinished_ones(export, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_scan(inp / "a.nii.gz", seed=2)
    write_scan(inp / "b.nii.gz", seed=3)
    first = infer_folder(inp, out, export, backend="ort", progress=False)
    assert [r.status for r in first.rows] == ["ok", "ok"] and not first.failures
    a_map, b_map = out / "a.nii.gz", out / "b.nii.gz"
    a_time, b_time = a_map.stat().st_mtime_ns, b_map.stat().st_mtime_ns
    (out / "b.png").unlink()                                                 # b is no longer finished

    again = infer_folder(inp, out, export, backend="ort", resume=True, progress=False)
    assert a_map.stat().st_mtime_ns == a_time                                # a skipped
    assert b_map.stat().st_mtime_ns != b_time and (out / "b.png").is_file()  # b redone
    assert [r.status for r in again.rows] == ["ok", "ok"]
    assert again.rows[0] == first.rows[0]                                    # a's row carried over
    assert any("1 finished scans skipped" in n for n in again.notes)
    assert len(read_report(out / "report.csv")) == 2


def test_parts_are_disjoint_and_cover_the_folder(export, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i in range(5):                           # unreadable files: every case is still listed, quickly
        (inp / f"case{i}.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    seen = []
    for part in (1, 2, 3):
        report = infer_folder(inp, out, export, backend="ort", part=(part, 3), progress=False)
        assert report.path == out / f"report.part{part}of3.csv"
        assert (out / f"provenance.part{part}of3.json").is_file()
        seen.append(set(read_report(report.path)))
    assert [len(s) for s in seen] == [2, 2, 1]
    assert set.union(*seen) == {f"case{i}.nii.gz" for i in range(5)}
    assert not (out / "report.csv").exists()


def test_bad_arguments_exit_2(export, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_scan(inp / "a.nii.gz")
    runner = CliRunner()
    cases = [
        ([str(inp), "-o", str(tmp_path / "o"), "--export", str(export), "--part", "3/2"], "--part"),
        ([str(inp), "-o", str(tmp_path / "o")], "--export"),
        ([str(inp), "-o", str(inp / "maps"), "--export", str(export)], "outside the input folder"),
        ([str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--export", str(export)], "no such file"),
        ([str(inp), "-o", str(tmp_path / "o"), "--export", str(tmp_path)], "manifest not found"),
        ([str(inp), "-o", str(tmp_path / "o"), "--export", str(export), "--backend", "onnx"], "Invalid value"),
    ]
    for args, message in cases:
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    assert not (tmp_path / "o").exists()


def test_without_a_threshold_no_mask_is_written_and_it_is_said_once(export, tmp_path):
    no_thr = tmp_path / "export"
    shutil.copytree(export, no_thr)
    m = Manifest.load(no_thr)
    m.threshold = None
    m.save(no_thr / "manifest.json")
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_scan(inp / "a.nii.gz", seed=4)
    write_scan(inp / "b.nii.gz", seed=5)
    res = CliRunner().invoke(main, ["-i", str(inp), "-o", str(out), "--export", str(no_thr), "--backend", "ort"])
    assert res.exit_code == 0, res.output
    assert res.output.count("no calibrated threshold") == 1
    assert (out / "a.nii.gz").is_file() and (out / "b.png").is_file() and not list(out.glob("*_mask*"))
    rows = read_report(out / "report.csv")
    assert [r["anomalous_ml"] for r in rows.values()] == ["", ""]


def test_run_option_uses_the_runs_export_folder(export, tmp_path):
    run, inp, out = tmp_path / "run", tmp_path / "in", tmp_path / "out"
    run.mkdir()
    (run / "export").symlink_to(export, target_is_directory=True)            # as `mimood-export` leaves it
    inp.mkdir()
    (inp / "bad.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    res = CliRunner().invoke(main, [str(inp), "-o", str(out), "--run", str(run), "--backend", "ort", "--quiet"])
    lines = res.output.splitlines()                                           # quiet: the failure, one summary
    assert res.exit_code == 1 and len(lines) == 2 and lines[0].startswith(f"failed: {inp / 'bad.nii.gz'}: not a NIfTI")
    assert lines[1].startswith("1 scans: 0 ok, 1 failed")
    assert json.loads((out / "provenance.json").read_text())["export"] == str(run / "export")
    assert read_report(out / "report.csv")["bad.nii.gz"]["status"] == "failed"


def test_overlay_shows_the_largest_flagged_area_not_a_partial_volume_peak():
    from mimood.runtime.outputs import overlay_slices
    brain = np.ones((6, 8, 8), bool)
    maps = np.zeros((6, 8, 8), np.float32)
    maps[0, 0, 0] = 0.9                      # an edge slice: one very bright pixel
    maps[3, 2:6, 2:6] = 0.5                  # a lesion: 16 pixels above the threshold
    maps[4, 2:4, 2:4] = 0.5                  # a smaller one
    maps[5, 0, 0] = 0.9
    maps[5, 7, 7] = 0.0
    assert overlay_slices(brain, maps, 0.3, n=2).tolist() == [3, 4]
    assert overlay_slices(brain, maps, None, n=1).tolist() == [3]        # map mass without a threshold
    brain[3] = False                                                     # outside the brain: not counted
    assert 3 not in overlay_slices(brain, maps, 0.3, n=2).tolist()
