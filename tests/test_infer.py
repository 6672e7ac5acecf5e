"""`mimood-infer` / `infer_folder` on small synthetic volumes: outputs on the input grid (the mask after the component
filter), the report with its lesion statistics and column sidecar, index.html, bad scans reported and skipped, exit
codes, `--continue`, `--part`, an export without a calibrated threshold, and the [0, 1] scan score from the
export's healthy reference."""
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
from mimood.runtime.components import lesion_stats
from mimood.runtime.outputs import COLUMNS
from mimood.runtime.reference import format_score
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

    res = CliRunner().invoke(main, [str(inp), "-o", str(out), "-m", str(export), "--backend", "ort"])
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
    kept, stats = lesion_stats(amap > THRESHOLD, AFFINE, 0.5)              # the component filter, 0.5 ml
    np.testing.assert_array_equal(np.asarray(mask.dataobj), kept)
    row = rows["good.nii"]
    assert float(row["flagged_ml"]) == pytest.approx(kept.sum() * VOXEL_ML, abs=1e-3)
    assert int(row["components"]) == stats.components >= 1 and float(row["min_component_ml"]) == 0.5
    assert float(row["largest_s_mm"]) == pytest.approx(stats.largest_s_mm, abs=1e-3)
    assert row["scan_score"] == "" and row["score_name"] == "map"         # no healthy reference in this export
    assert 0 < float(row["raw_score"]) == float(row["map_score"]) <= amap.max() + 1e-6
    with open(out / "report.csv") as f:
        assert f.readline().strip().split(",") == COLUMNS
    side = json.loads((out / "report.columns.json").read_text())
    assert [c["name"] for c in side["columns"]] == COLUMNS
    assert {c["name"]: c["unit"] for c in side["columns"]}["largest_ml"] == "ml"

    page = (out / "index.html").read_text()                                  # every scan, failed ones with errors
    assert all(f'data-name="{n}"' in page for n in ("good", "corrupt", "fourd")) and "truncated gzip" in page
    assert 'src="good.png"' in page and (out / "viewer" / "good.js").is_file()

    png = out / "good.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, channels = matplotlib.image.imread(str(png)).shape
    assert w > h > 100 and channels in (3, 4)
    assert not list(out.glob("corrupt*")) and not list(out.glob("fourd*"))  # nothing for the bad scans
    assert not [p for p in out.rglob(".*")]                                 # no temporary files left

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
    (out / "viewer" / "b.js").unlink()                                       # b is no longer finished

    again = infer_folder(inp, out, export, backend="ort", resume=True, progress=False)
    assert a_map.stat().st_mtime_ns == a_time                                # a skipped
    assert b_map.stat().st_mtime_ns != b_time and (out / "viewer" / "b.js").is_file()  # b redone
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
    page = (out / "index.html").read_text()                                  # the last part lists every part
    assert all(f'data-name="case{i}"' in page for i in range(5)) and page.count("<tr data-name=") == 5


def test_bad_arguments_exit_2(export, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_scan(inp / "a.nii.gz")
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    (tmp_path / "export_only").mkdir()
    (tmp_path / "export_only" / "manifest.json").write_text("{}")
    cases = [
        ([str(inp), "-o", str(tmp_path / "o"), "-m", str(export), "--part", "3/2"], "--part"),
        ([str(inp), "-o", str(inp / "maps"), "-m", str(export)], "outside the input folder"),
        ([str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "-m", str(export)], "no such file"),
        ([str(inp), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "empty")], "neither an export folder"),
        ([str(inp), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "nowhere")], "model folder not found"),
        ([str(inp), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "export_only")], "manifest format"),
        ([str(inp), "-o", str(tmp_path / "o"), "-m", str(export), "--backend", "onnx"], "Invalid value"),
        ([str(inp), "-m", str(export)], "missing option -o/--output"),
        ([str(inp), "-o", str(tmp_path / "o"), "-m", str(export), "--min-component-ml", "-1"], "--min-component-ml"),
        ([str(inp), "-o", str(tmp_path / "o"), "-m", str(export), "--report", str(tmp_path / "r")], "--format mood"),
        ([str(inp), "-o", str(tmp_path / "o"), "-m", str(export), "--device", "gpu"], "--device"),
    ]
    for args, message in cases:
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert res.output.count("error: ") == 1 and "Traceback" not in res.output, res.output
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
    res = CliRunner().invoke(main, ["-i", str(inp), "-o", str(out), "-m", str(no_thr), "--backend", "ort"])
    assert res.exit_code == 0, res.output
    assert res.output.count("no calibrated threshold") == 1
    assert (out / "a.nii.gz").is_file() and (out / "b.png").is_file() and not list(out.glob("*_mask*"))
    rows = read_report(out / "report.csv")
    assert [(r["flagged_ml"], r["components"]) for r in rows.values()] == [("", ""), ("", "")]


def test_model_option_takes_a_run_folder_and_uses_its_export(export, tmp_path):
    run, inp, out = tmp_path / "run", tmp_path / "in", tmp_path / "out"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "export").symlink_to(export, target_is_directory=True)            # as `mimood-export` leaves it
    inp.mkdir()
    (inp / "bad.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    res = CliRunner().invoke(main, [str(inp), "-o", str(out), "-m", str(run), "--backend", "ort", "--quiet"])
    lines = res.output.splitlines()                                           # quiet: the failure, one summary
    assert res.exit_code == 1 and len(lines) == 2 and lines[0].startswith(f"failed: {inp / 'bad.nii.gz'}: not a NIfTI")
    assert lines[1].startswith("1 scans: 0 ok, 1 failed")
    assert json.loads((out / "provenance.json").read_text())["export"] == str(run / "export")
    assert read_report(out / "report.csv")["bad.nii.gz"]["status"] == "failed"


def test_no_model_uses_the_bundled_one_and_says_so(export, tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_scan(inp / "a.nii.gz", seed=6)
    monkeypatch.setenv("MIMOOD_BUNDLED_MODEL", str(tmp_path / "not_installed"))
    res = CliRunner().invoke(main, [str(inp), "-o", str(out)])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "not_installed: no bundled model here (no manifest.json)" in res.output and "-m/--model" in res.output
    monkeypatch.setenv("MIMOOD_BUNDLED_MODEL", str(export))
    res = CliRunner().invoke(main, [str(inp), "-o", str(out), "--backend", "ort"])
    assert res.exit_code == 0, res.output
    assert f"no --model given: using the bundled model tiny preset, mimood " in res.output
    assert f"({export})" in res.output and (out / "a.nii.gz").is_file()


def test_reference_gives_a_calibrated_score_in_0_1(export, tmp_path):
    """An export with healthy reference scores for its (map) score: scan_score is their calibrated share, z and
    percentile only with >= 20 of them."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        write_scan(inp / f"s{i}.nii.gz", seed=10 + i)
    first = infer_folder(inp, tmp_path / "raw", export, backend="ort", progress=False)
    raws = sorted(r.raw_score for r in first.rows)
    for n in (5, 25):
        ref = tmp_path / f"export{n}"
        shutil.copytree(export, ref)
        m = Manifest.load(ref)
        m.extra.reference = {"map": list(np.linspace(raws[0] - 0.01, raws[-1] + 0.01, n))}
        m.save(ref / "manifest.json")
        out = tmp_path / f"out{n}"
        report = infer_folder(inp, out, ref, backend="ort", progress=False)
        rows = sorted(report.rows, key=lambda r: r.raw_score)
        assert [r.raw_score for r in rows] == raws                          # the same raw scores
        scores = [r.scan_score for r in rows]
        assert all(0 < s < 1 for s in scores) and scores == sorted(scores) and len(set(scores)) == 3
        assert all(r.reference_scans == n for r in rows)
        prov = json.loads((out / "provenance.json").read_text())
        s = prov["scans"][rows[0].file]["score"]
        assert s["score"] == pytest.approx(scores[0]) and s["reference_scans"] == n
        assert (s["z"] is None) == (n < 20) and ("at least 20" in s["omitted"]) == (n < 20)
        assert any("rests on 5 healthy reference scans" in x for x in report.notes) == (n == 5)
        assert format_score(scores[-1]) in (out / "index.html").read_text()


def _with_reference(export, folder, n=25):
    """A copy of the export whose map score has n healthy reference scores (what calibration will record)."""
    shutil.copytree(export, folder)
    m = Manifest.load(folder)
    m.extra.reference = {"map": list(np.linspace(0.05, 0.35, n))}
    m.save(folder / "manifest.json")
    return folder


def test_mood_format_holds_exactly_the_evaluators_files(export, tmp_path):
    ref = _with_reference(export, tmp_path / "export")
    inp, pred, rep = tmp_path / "in", tmp_path / "pred", tmp_path / "rep"
    inp.mkdir()
    data = {"00017.nii.gz": write_scan(inp / "00017.nii.gz", seed=20), "case_b.nii": write_scan(inp / "case_b.nii", 21)}
    res = CliRunner().invoke(main, [str(inp), "-o", str(pred), "-m", str(ref), "--format", "mood", "--backend", "ort",
                                    "--report", str(rep)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in pred.iterdir()) == ["00017.nii.gz", "00017.nii.gz.txt", "case_b.nii",
                                                      "case_b.nii.txt"]
    for name, vol in data.items():                          # read as MIC-DKFZ/mood scripts/evalresults.py reads them
        img = nib.load(str(pred / name))
        values = img.get_fdata(dtype=np.float16)
        assert values.shape == vol.shape and np.allclose(img.affine, AFFINE)
        assert 0 <= values.min() and values.max() <= 1 and values.max() > THRESHOLD
        with open(pred / f"{name}.txt") as f:
            score = float(f.readline())
        assert 0 < score < 1
    rows = read_report(rep / "report.csv")                  # the report, overlays and index go to --report
    assert float(rows["case_b.nii"]["scan_score"]) == pytest.approx(float((pred / "case_b.nii.txt").read_text()))
    assert (rep / "index.html").is_file() and (rep / "case_b.png").is_file() and (rep / "provenance.json").is_file()

    stamp = (pred / "case_b.nii").stat().st_mtime_ns             # --continue: both files there = finished
    again = infer_folder(inp, pred, ref, backend="ort", fmt="mood", resume=True, progress=False)
    assert (pred / "case_b.nii").stat().st_mtime_ns == stamp and not again.problems and not again.failures
    assert again.path is None                                    # no --report: no report anywhere
    assert sorted(p.name for p in pred.iterdir()) == ["00017.nii.gz", "00017.nii.gz.txt", "case_b.nii",
                                                      "case_b.nii.txt"]


def test_mood_format_refuses_what_would_break_the_convention(export, tmp_path):
    ref = _with_reference(export, tmp_path / "export")
    inp, pred = tmp_path / "in", tmp_path / "pred"
    (inp / "x").mkdir(parents=True)
    write_scan(inp / "a.nii.gz", seed=22)
    runner = CliRunner()
    args = ["-i", str(inp), "-o", str(pred), "--format", "mood", "--backend", "ort"]
    res = runner.invoke(main, args + ["-m", str(export)])                  # no healthy reference: no [0, 1] score
    assert res.exit_code == 2 and "needs a [0, 1] scan score" in res.output
    pred.mkdir()
    (pred / "report.csv").write_text("x\n")
    res = runner.invoke(main, args + ["-m", str(ref)])                     # a foreign file in the folder
    assert res.exit_code == 2 and "holds files outside the MOOD convention (report.csv)" in res.output
    (pred / "report.csv").unlink()
    write_scan(inp / "x" / "a.nii.gz", seed=23)                            # two inputs named a.nii.gz
    res = runner.invoke(main, args + ["-m", str(ref)])
    assert res.exit_code == 2 and "two inputs would write the same outputs 'a.nii.gz'" in res.output
    assert list(pred.iterdir()) == []


def test_an_export_from_another_mimood_version_runs_with_a_warning(export, tmp_path):
    old = tmp_path / "export"
    shutil.copytree(export, old)
    m = Manifest.load(old)
    m.versions["mimood"] = "0.0.9"
    m.save(old / "manifest.json")
    inp = tmp_path / "in"
    inp.mkdir()
    write_scan(inp / "a.nii.gz", seed=24)
    res = CliRunner().invoke(main, [str(inp), "-o", str(tmp_path / "out"), "-m", str(old), "--backend", "ort"])
    assert res.exit_code == 0, res.output
    assert res.output.count("warning: ") == 1 and "exported by mimood 0.0.9, running mimood" in res.output
    res = CliRunner().invoke(main, [str(inp), "-o", str(tmp_path / "out2"), "-m", str(export), "--backend", "ort"])
    assert "warning" not in res.output
