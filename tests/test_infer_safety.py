"""Issue 15's runtime side: one scan's unexpected error is its row (traceback in errors.log, not on screen), the
skull-strip flag, reader warnings as one line and a report column, exit 3 for an output folder that is a file,
read-only or full (the last complete report kept, --continue finishing after), stale temporaries of killed runs
swept and nothing else, manifests with NaN/string values or paths leaving the folder refused, the umask."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mimood.cli.infer import main
from mimood.contract import Manifest, atomic_write, sweep_temporaries, temporary_name
from mimood.data.discover import Case
from mimood.errors import EXIT_FAILED, EXIT_OUTPUT, EXIT_USAGE, InputError
from mimood.runtime import infer_folder
from mimood.runtime.bundle import Bundle
from mimood.runtime.outputs import output_paths
from mimood.runtime.safety import check_unique_outputs
from mimood.testing.fuzz import synthetic_scan
from test_infer import read_report, write_scan
from test_runtime import tiny_export_folder

TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export_folder(tmp_path_factory)


def infer(export, inp, out, *extra):
    return CliRunner().invoke(main, [str(inp), "-o", str(out), "-m", str(export), "--backend", "ort", *extra])


def screen(text):
    """The lines on screen, without tqdm's carriage returns and cursor moves."""
    return [ln.strip() for ln in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)) if ln.strip()]


def whole_head(path):
    nib.save(synthetic_scan(shape=(48, 56, 12), head=True), str(path))


def test_an_unexpected_error_is_the_scans_row_and_the_others_finish(export, tmp_path, monkeypatch):
    import mimood.runtime.safety as safety

    real = safety.preprocess

    def preprocess(image, cfg):            # a bug that only one scan hits
        if "boom" in image.get_filename():
            raise RuntimeError("something mimood did not expect")
        return real(image, cfg)

    monkeypatch.setattr(safety, "preprocess", preprocess)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for name, seed in (("a", 1), ("boom", 2), ("c", 3)):
        write_scan(inp / f"{name}.nii.gz", seed=seed)
    whole_head(inp / "head.nii.gz")
    res = infer(export, inp, out)
    assert res.exit_code == EXIT_FAILED and TRACEBACK not in res.output, res.output
    rows = read_report(out / "report.csv")
    assert [rows[n]["status"] for n in ("a.nii.gz", "boom.nii.gz", "c.nii.gz", "head.nii.gz")] == \
        ["ok", "failed", "ok", "ok"]
    log = out / "errors.log"
    assert rows["boom.nii.gz"]["error"] == (f"{inp / 'boom.nii.gz'}: unexpected RuntimeError: something mimood did "
                                            f"not expect (traceback in {log})")
    text = log.read_text()
    assert text.count(TRACEBACK) == 1 and "RuntimeError: something mimood did not expect" in text
    # the whole head is mapped with one warning line (and the report says so); the others carry none
    warned = [ln for ln in screen(res.output) if ln.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {inp / 'head.nii.gz'}: not skull-stripped?")
    assert rows["head.nii.gz"]["warnings"].startswith(f"{inp / 'head.nii.gz'}: not skull-stripped?")
    assert rows["a.nii.gz"]["warnings"] == ""


def test_skull_refuse_fails_the_head_and_ignore_maps_it_silently(export, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    whole_head(inp / "head.nii.gz")
    refused = infer_folder(inp, tmp_path / "refuse", export, backend="ort", progress=False, skull="refuse")
    assert refused.rows[0].status == "failed" and "not skull-stripped?" in refused.rows[0].error
    ignored = infer_folder(inp, tmp_path / "ignore", export, backend="ort", progress=False, skull="ignore")
    assert ignored.rows[0].status == "ok" and ignored.rows[0].warnings == ""
    res = infer(export, inp, tmp_path / "bad", "--skull", "maybe")
    assert res.exit_code == 2 and "'maybe' is not one of" in res.output


def test_reader_warnings_are_one_line_and_quiet_shows_problems_only(export, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_scan(inp / "ok.nii", seed=1)
    write_scan(inp / "padded.nii", seed=2)
    with open(inp / "padded.nii", "ab") as f:
        f.write(bytes(1000))                               # zero padding after the declared volume
    (inp / "bad.nii").write_bytes(b"not a scan" * 50)
    res = infer(export, inp, out, "--quiet")
    assert res.exit_code == EXIT_FAILED
    assert res.output.splitlines() == [
        f"failed: {inp / 'bad.nii'}: not a NIfTI file (no NIfTI-1/2 header)",
        f"warning: {inp / 'padded.nii'}: 1000 zero bytes after the declared 40 x 48 x 10 volume ignored",
        res.output.splitlines()[-1]]
    assert res.output.splitlines()[-1].startswith("3 scans: 2 ok, 1 failed")
    shutil.rmtree(out)
    res = infer(export, inp, out)                          # not quiet: the warning as it came, one line
    assert "InputWarning" not in res.output and res.output.count("1000 zero bytes after the declared") == 1


def test_out_is_a_file_exit_3_in_one_line(export, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_scan(inp / "a.nii.gz")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        res = infer(export, inp, out)
        assert res.exit_code == EXIT_OUTPUT and TRACEBACK not in res.output
        assert res.output.startswith(f"error: {out}: ") and len(res.output.splitlines()) == 1, res.output


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a small tmpfs under tmp_path (root only; the test is skipped without it)."""
    mounted = []

    def mount(size: str, ro: bool = False, remount: bool = False):
        path = tmp_path / "disk"
        path.mkdir(exist_ok=True)
        opts = ("remount," if remount else "") + f"size={size}" + (",ro" if ro else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted[:1]:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_output_disk_exit_3_in_one_line(export, tmp_path, tmpfs):
    inp = tmp_path / "in"
    inp.mkdir()
    write_scan(inp / "a.nii.gz")
    disk = tmpfs("1m", ro=True)
    res = infer(export, inp, disk / "out")
    assert res.exit_code == EXIT_OUTPUT and TRACEBACK not in res.output
    assert res.output == f"error: {disk / 'out'}: cannot write into {disk} (read-only file system)\n"


def test_full_disk_stops_with_the_last_complete_report_and_continue_finishes(export, tmp_path, tmpfs):
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(6):
        write_scan(inp / f"s{k}.nii", seed=k)              # ~80 kB map each: a 200 kB disk holds about two
    disk = tmpfs("200k")
    out = disk / "out"
    res = infer(export, inp, out)
    assert res.exit_code == EXIT_OUTPUT and TRACEBACK not in res.output, res.output
    assert res.output.splitlines()[-1].startswith(f"error: {out}") and "No space left on device" in res.output
    rows = read_report(out / "report.csv")                 # complete and true: every ok row has its files
    ok = [n for n, r in rows.items() if r["status"] == "ok"]
    assert 1 <= len(ok) < 6 and all((out / n).is_file() and (out / f"{n[:-4]}.png").is_file() for n in ok)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    tmpfs("4m", remount=True)                              # room again
    res = infer(export, inp, out, "--continue")
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in read_report(out / "report.csv").values()] == ["ok"] * 6


def test_stale_temporaries_of_dead_processes_are_swept_and_nothing_else(export, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / temporary_name("a.nii.gz", pid=dead.pid)
    live = out / temporary_name("b.nii.gz")                # this process: still writing
    keep = [live, out / ".c.tmp-123.nii.gz", out / "a.nii.gz", out / "notes.txt",
            out / temporary_name("d.png", pid=dead.pid).replace("tmp-", "tmp-0")]   # not the writer's pattern
    (out / "sub").mkdir()
    keep.append(out / "sub" / temporary_name("e.nii.gz", pid=dead.pid))            # not in this folder
    for p in [stale] + keep:
        Path(p).write_bytes(b"x")
    assert sweep_temporaries(out) == [stale]
    assert not stale.exists() and all(Path(p).exists() for p in keep)
    stale.write_bytes(b"x")                                 # and every start of mimood-infer sweeps
    inp = tmp_path / "in"
    inp.mkdir()
    write_scan(inp / "a.nii.gz")
    res = infer(export, inp, out, "--continue")
    assert res.exit_code == 0 and "removed 1 temporary files left by killed runs" in res.output
    assert not stale.exists() and live.exists()


def test_manifest_values_and_file_entries_are_checked(export, tmp_path):
    cases = [({"threshold": float("nan")}, "'threshold' must be a number in [0, 1] (or null), got NaN"),
             ({"threshold": "high"}, "'threshold' must be a number in [0, 1] (or null), got \"high\""),
             ({"lam": float("nan")}, "'lam' must be a number in [0, 1], got NaN"),
             ({"lam": "x"}, "'lam' must be a number in [0, 1], got \"x\""),
             ({"graphs.encode.file": "../outside/encode.onnx"}, "'graphs.encode.file' must be a file inside the "
                                                                "export folder"),
             ({"graphs.atd.file": "/etc/passwd"}, "'graphs.atd.file' must be a file inside")]
    for k, (change, message) in enumerate(cases):
        bad = tmp_path / f"e{k}"
        shutil.copytree(export, bad)
        m = json.loads((bad / "manifest.json").read_text())
        for key, value in change.items():
            if key.startswith("graphs."):
                m["graphs"][key.split(".")[1]]["file"] = value
            else:
                m[key] = value
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(InputError) as e:
            Bundle.open(bad)
        assert str(e.value) == f"{bad / 'manifest.json'}: {message}" or str(e.value).startswith(
            f"{bad / 'manifest.json'}: {message}"), str(e.value)
    m = Manifest.load(export)
    m.threshold = float("nan")                            # and none is ever written
    with pytest.raises(InputError, match="'threshold' must be a number"):
        m.save(tmp_path / "manifest.json")
    assert not (tmp_path / "manifest.json").exists()
    inp = tmp_path / "in"
    inp.mkdir()
    write_scan(inp / "a.nii.gz")
    res = infer(tmp_path / "e0", inp, tmp_path / "o")     # at the command line: one line, exit 2
    assert res.exit_code == EXIT_USAGE and res.output.count("\n") == 1 and "got NaN" in res.output


def test_export_refuses_a_nan_lam_before_exporting(tmp_path):
    from mimood.cli.export import main as export_main
    from mimood.config import preset

    run = tmp_path / "run"
    run.mkdir()
    preset("tiny").save(run / "config.json")
    res = CliRunner().invoke(export_main, ["-m", str(run), "--lam", "nan"])
    assert res.exit_code == EXIT_USAGE and res.output == "error: --lam: 'lam' must be a number in [0, 1], got NaN\n"


def test_the_writer_gives_files_the_umask_mode(tmp_path):
    from mimood.config import preset
    from mimood.models.checkpoint import build_model, save_model

    old = os.umask(0o027)
    try:
        save_model(build_model("vqvae", preset("tiny").vqvae), tmp_path / "v.safetensors", "vqvae")  # 0600 by safetensors
        with atomic_write(tmp_path / "t.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert [oct(os.stat(tmp_path / n).st_mode & 0o777) for n in ("v.safetensors", "t.txt")] == ["0o640", "0o640"]


def test_two_cases_writing_one_file_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    cases = [Case("a", tmp_path / "x" / "a.nii.gz", None), Case("A", tmp_path / "y" / "A.nii.gz", None)]
    with pytest.raises(InputError, match="its output A.nii.gz would also be written for"):
        check_unique_outputs({str(c.image): output_paths(out, c.name, c.image).values() for c in cases})
    with pytest.raises(InputError, match="would also be written for the run itself"):
        check_unique_outputs({"r": [out / "report.csv"]}, own=[out / "Report.csv"])
    assert not out.exists()
