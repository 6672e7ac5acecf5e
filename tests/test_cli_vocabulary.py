"""One CLI vocabulary: every command takes -i/-o (and -m where it needs a model), --device, --threads, -q and
-V/--version, reports click's usage errors in mimood's one-line style, and still accepts the old spellings for one
release (a deprecation warning, the same library call; old and new together is an error).

The library functions behind the commands are replaced by recorders here: what is checked is the command line ->
call mapping, which is the CLI's whole job (each function has its own tests)."""
import json

import click
import pytest
from click.testing import CliRunner

import mimood
from mimood.cli import bench, data, demo, eval as eval_cli, export, infer, train


class Called(Exception):
    pass


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    """A run folder with an export, a scans folder and a labels folder in the working directory (the commands get
    relative paths)."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "export" / "manifest.json").write_text("{}")
    (tmp_path / "scans").mkdir()
    (tmp_path / "labels").mkdir()
    return tmp_path


def record(monkeypatch, module: str, name: str):
    """Replace module.name by a recorder that stops the command (click's Exit: a clean exit 0)."""
    import importlib

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise click.exceptions.Exit(0)

    monkeypatch.setattr(importlib.import_module(module), name, fake)
    return calls


def norm(call, root):
    """A recorded call with tmp paths made relative (and config objects as their dicts), for comparison."""
    def one(v):
        if hasattr(v, "__dataclass_fields__"):
            from dataclasses import asdict
            return json.dumps(asdict(v), sort_keys=True, default=str)
        return str(v).replace(str(root), "ROOT") if not isinstance(v, (int, float, type(None))) else v
    args, kwargs = call
    return [one(a) for a in args], {k: one(v) for k, v in kwargs.items() if not callable(v)}


# (command, library function, new spelling, old spelling); paths relative to the `folders` fixture
CASES = {
    "infer -o": (infer.main, "mimood.runtime.infer", "infer_folder",
                 ["-i", "scans", "-o", "out", "-m", "run/export"], ["scans", "--out", "out", "--export", "run/export"]),
    "infer --run": (infer.main, "mimood.runtime.infer", "infer_folder",
                    ["scans", "-o", "out", "-m", "run"], ["scans", "-o", "out", "--run", "run"]),
    "train": (train.main, "mimood.train.recipes", "train",
              ["all", "-i", "scans", "-o", "newrun", "--preset", "tiny"],
              ["all", "--data", "scans", "--run", "newrun", "--preset", "tiny"]),
    "train --run-dir": (train.main, "mimood.train.recipes", "train",
                        ["ood", "-o", "newrun"], ["ood", "--run-dir", "newrun"]),
    "eval": (eval_cli.main, "mimood.eval.report", "evaluate_run",
             ["-m", "run", "-i", "labels", "-o", "ev"],
             ["--run", "run", "--data", "labels", "--json", "ev/eval.json", "--png", "ev/png"]),
    "export": (export.main, "mimood.export.export", "export_run",
               ["-m", "run", "-o", "exp", "-T", "0"], ["--run", "run", "--out", "exp", "-T", "0"]),
    "bench": (bench.main, "mimood.bench", "run_bench",
              ["-m", "run", "-o", "b.json", "--preset", "tiny"], ["--run", "run", "--json", "b.json", "--preset", "tiny"]),
    "data demo": (data.main, "mimood.data.demo", "make_demo", ["demo", "-o", "d"], ["demo", "--out", "d"]),
    "data synth": (data.main, "mimood.data.synth", "make_synth", ["synth", "-i", "labels", "-o", "s"],
                   ["synth", "--labelmaps", "labels", "--out", "s"]),
    "demo": (demo.main, "mimood.pipeline", "run_demo", ["-o", "dm", "--steps", "2"], ["--out", "dm", "--steps", "2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_old_and_new_flags_make_the_same_call(case, folders, monkeypatch):
    command, module, name, new, old = CASES[case]
    calls = record(monkeypatch, module, name)
    runner = CliRunner()
    r_new = runner.invoke(command, new)
    r_old = runner.invoke(command, old)
    assert r_new.exit_code == 0 and r_old.exit_code == 0, (r_new.output, r_old.output)
    assert len(calls) == 2 and norm(calls[0], folders) == norm(calls[1], folders)
    assert "deprecated" not in r_new.output
    old_flags = [a for a in old if a.startswith("--") and a not in new]
    for flag in old_flags:
        assert f"warning: {flag} is deprecated, use -" in r_old.output, r_old.output


@pytest.mark.parametrize("command, args", [
    (infer.main, ["scans", "-o", "out", "--out", "out2", "-m", "run"]),
    (infer.main, ["scans", "-o", "out", "--export", "run/export", "--run", "run"]),
    (train.main, ["all", "-o", "newrun", "--run-dir", "other"]),
    (eval_cli.main, ["-m", "run", "-i", "labels", "-o", "ev", "--json", "x.json"]),
    (export.main, ["-m", "run", "--run", "run"]),
    (data.main, ["demo", "-o", "d", "--out", "d"]),
])
def test_old_and_new_together_is_one_error_line(command, args, folders):
    r = CliRunner().invoke(command, args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and ("not both" in errors[0]), r.output


@pytest.mark.parametrize("command, args", [
    (infer.main, []), (train.main, []), (eval_cli.main, []), (export.main, []), (bench.main, []), (data.main, []),
    (data.main, ["check"]), (demo.main, []),
])
def test_every_command_has_the_common_options(command, args):
    runner = CliRunner()
    r = runner.invoke(command, args + ["--version"])
    assert r.exit_code == 0 and f"(mimood) {mimood.__version__}" in r.output
    r = runner.invoke(command, args + ["--help"])
    assert r.exit_code == 0 and "%%" not in r.output
    if command is not data.main or args:
        for opt in ("--device", "--threads", "-q, --quiet", "-V, --version"):
            assert opt in r.output, (opt, r.output)
    if command not in (data.main, demo.main, train.main):
        assert "-o, --output" in r.output
    for old in ("--out ", "--export ", "--run ", "--json ", "--labelmaps"):     # hidden: not offered any more
        assert f"  {old}" not in r.output


def test_click_usage_errors_in_mimood_style(folders):
    runner = CliRunner()
    for command, args, words in [
        (infer.main, ["scans", "-o", "out", "--bogus"], "No such option '--bogus'"),
        (infer.main, ["scans", "-o", "out", "--outpt"], "--output"),
        (eval_cli.main, ["-m", "run", "-T", "-1"], "-T"),
        (export.main, ["-T", "x"], "-T"),
        (train.main, ["nothing"], "nothing"),
        (data.main, ["bogus"], "No such command"),
        (infer.main, ["scans", "-o", "out", "--device", "tpu"], "cuda:N"),
        (train.main, ["all", "--device", "cuda"], "runs on the CPU"),
        (infer.main, ["scans", "-o", "out", "--threads", "0"], "--threads"),
    ]:
        r = runner.invoke(command, args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, r.output)
        assert "Error:" not in r.output and "Usage:" not in r.output
    r = runner.invoke(infer.main, ["scans", "-o", "out", "--outpt"])
    assert "--out'" not in r.output                                           # never suggests an old spelling


def test_threads_reach_onnxruntime_sessions_and_torch(folders, monkeypatch):
    import onnxruntime as ort
    import torch

    from mimood.runtime import threads

    monkeypatch.setattr(threads, "THREADS", None)                             # restored afterwards
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    assert threads.session_options(ort).intra_op_num_threads == 0               # onnxruntime's own default
    before = torch.get_num_threads()
    seen = []

    def fake(*args, **kwargs):
        seen.append((threads.THREADS, threads.session_options(ort).intra_op_num_threads, torch.get_num_threads()))
        raise click.exceptions.Exit(0)

    monkeypatch.setattr("mimood.runtime.infer.infer_folder", fake)
    try:
        r = CliRunner().invoke(infer.main, ["scans", "-o", "out", "-m", "run", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert r.exit_code == 0, r.output
    assert seen == [(1, 1, 1)]
