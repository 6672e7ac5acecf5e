"""Issue 15's hostile folder, end to end: the full fuzz set (mimood.testing.fuzz: >= 150 inputs, the 4 GiB gzip
bombs, output-name collisions, links, seeded mutations of a valid scan) through `mimood-infer`, plus the runs a
folder cannot hold: kill -9 then --continue, a full disk, an unusable --out, --quiet, tampered manifests.

    python benchmarks/fuzz_infer.py [--export DIR] [--base SCAN] [--n-mutations 100] [--seed 0] [--json OUT]

Without --export a tiny export of random-weight models is made (the outcome per input does not depend on the
weights). --base: the valid scan the mutations start from (default: a small synthetic one; e.g.
/work/shared/data/real/lesion/brats18_tcia01_425_1_t2.nii.gz for issue 15's attack). It reports:

    inputs                 how many files the folder held
    tracebacks on screen   "Traceback (most recent call last)" in any run's stdout/stderr
    missing rows           inputs with neither a map (an ok row with its files) nor a failure row
    partial files          temporaries left behind (also after kill -9 + --continue), outputs that do not load
    silent wrong outputs   mapped where it had to be refused or warned about, outputs shared by two inputs,
                           exit 0 with a NaN threshold, --quiet hiding a failure, ...
    unexpected errors      failure rows of the per-scan catch-all (a bug caught; its traceback in errors.log)
    stray screen lines     Python's warning display, nibabel's log lines
    wrong exit codes       not 1 for "some scans failed", 2 for a bad export, 3 for an unusable output folder
                           or disk, or an error that is not one line
(mimood.testing.judge counts them) and the peak memory and time on each bomb, whether kill -9 + --continue gives
byte-identical outputs with no stale temporary, and whether a run stopped by a full disk, with the disk grown,
finishes with --continue byte-identical. Exit status 0 only when every count is 0. The disk-full and read-only
cases need a small tmpfs (root); they are skipped, and say so, without one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mimood.errors import EXIT_FAILED, EXIT_OK, EXIT_OUTPUT, EXIT_USAGE  # noqa: E402
from mimood.testing.fuzz import FuzzInput, make_inputs, synthetic_scan  # noqa: E402
from mimood.testing.judge import (TRACEBACK, judge_folder, partial_files, read_rows, screen_lines,  # noqa: E402
                                  stray_lines)
# runs mimood-infer in this process's child and records its peak memory (a kill -9 leaves no file)
# (VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report this script's peak)
HWM = "int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1])"
RUNNER = ("import os, sys\n"
          "from mimood.cli.infer import main\n"
          "try:\n    main(sys.argv[1:], prog_name='mimood-infer')\n"
          f"finally:\n    open(os.environ['FUZZ_RSS'], 'w').write(str({HWM}))\n")


class Infer:
    """`mimood-infer` runs, each one's screen output, exit status, seconds and peak memory."""

    def __init__(self, export: Path, work: Path, backend: str):
        self.export, self.work, self.backend = export, work, backend
        self.runs: list[dict] = []

    def run(self, label: str, inp: Path, out: Path, *extra: str, export: Path | None = None,
            timeout: float = 3600, kill_after: float | None = None, kill_when=None) -> dict:
        rss = self.work / f"rss-{len(self.runs)}"
        rss.unlink(missing_ok=True)
        cmd = [sys.executable, "-c", RUNNER, str(inp), "-o", str(out), "-m", str(export or self.export),
               "--backend", self.backend, *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "FUZZ_RSS": str(rss)}
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
        killed = False
        if kill_when is not None:               # kill -9 as soon as the condition holds (or at kill_after)
            while p.poll() is None and not kill_when() and time.perf_counter() - t0 < (kill_after or timeout):
                time.sleep(0.002)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
        r = {"label": label, "rc": p.returncode, "killed": killed, "seconds": round(time.perf_counter() - t0, 2),
             "peak_mib": int(rss.read_text()) // 1024 if rss.exists() else None, "stdout": stdout, "stderr": stderr,
             "tracebacks": (stdout + stderr).count(TRACEBACK)}
        self.runs.append(r)
        return r


def tiny_export(work: Path) -> Path:
    """Random-weight tiny-preset models, lambda 0.3, a map threshold, exported for batches of 4 x R 2."""
    import torch

    from mimood.config import preset
    from mimood.export.export import export_run
    from mimood.models.checkpoint import build_model, save_model

    cfg, run = preset("tiny"), work / "run"
    run.mkdir()
    cfg.save(run / "config.json")
    torch.manual_seed(0)
    for kind, c in (("vqvae", cfg.vqvae), ("atd", cfg.transformer), ("mvtm", cfg.transformer)):
        save_model(build_model(kind, c), run / kind / "best.safetensors", kind)
    (run / "calibration.json").write_text(json.dumps({"lam": 0.3, "threshold": 0.1}))
    export_run(run, out=work / "export", batch=4, R=2, validate=False, build_engines=False, progress=False)
    return work / "export"


def valid_folder(folder: Path, base: nib.Nifti1Image, n: int) -> Path:
    folder.mkdir(parents=True)
    data = np.asarray(base.dataobj)
    for k in range(n):
        rng = np.random.default_rng(k)
        scaled = np.where(data > 0, data * rng.uniform(0.8, 1.2), 0).astype(data.dtype)
        nib.save(nib.Nifti1Image(scaled, base.affine, base.header), folder / f"scan_{k:02d}.nii.gz")
    return folder


def kill_and_continue(infer: Infer, folder: Path, ref: Path, work: Path) -> dict:
    """An uninterrupted run (`ref`) against one killed (-9) while it writes an output file (a temporary exists;
    polled every 2 ms) and then --continue'd: the outputs byte for byte, and no temporary left."""
    out = work / "kill_out"

    def writing() -> bool:
        try:
            return any(e.name.startswith(".") and ".tmp" in e.name for e in os.scandir(out))
        except OSError:
            return False

    first = infer.run("kill: killed run", folder, out, kill_when=writing, kill_after=600)
    left = [p.name for p in out.iterdir() if p.name.startswith(".") and ".tmp" in p.name] if out.is_dir() else []
    second = infer.run("kill: --continue", folder, out, "--continue")
    same, names = identical(ref, out)
    stale = [p.name for p in out.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    swept = [ln for ln in screen_lines(second["stdout"] + second["stderr"]) if ln.startswith("removed ")]
    return {"killed": first["killed"], "temporaries_after_kill": left, "continue_exit": second["rc"],
            "swept_note": swept[0] if swept else "", "outputs": len(names), "byte_identical": len(same),
            "stale_temporaries": stale, "partial": partial_files(out)}


def identical(ref: Path, out: Path) -> tuple[list[str], list[str]]:
    """(outputs of `ref` that `out` holds byte for byte, all outputs of `ref`): maps, masks, PNGs."""
    names = sorted(p.name for p in ref.iterdir() if p.suffix in (".gz", ".nii", ".png"))
    return [n for n in names if (out / n).is_file() and (out / n).read_bytes() == (ref / n).read_bytes()], names


def bomb_runs(infer: Infer, inputs: list[FuzzInput], folder: Path, work: Path) -> list[dict]:
    out = []
    for i in inputs:
        if i.kind != "bomb":
            continue
        one = work / f"only_{Path(i.name).stem}"
        one.mkdir()
        shutil.copyfile(folder / i.name, one / i.name)
        r = infer.run(f"bomb {i.name}", one, work / f"out_{one.name}")
        rows = read_rows(work / f"out_{one.name}" / "report.csv") or {}
        row = next(iter(rows.values()), {})
        out.append({"input": i.name, "note": i.note, "compressed_bytes": (folder / i.name).stat().st_size,
                    "seconds": r["seconds"], "peak_mib": r["peak_mib"], "status": row.get("status"),
                    "error": row.get("error"), "tracebacks": r["tracebacks"], "screen": last_line(r),
                    **load_alone(folder / i.name)})
    return out


def tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def disk_runs(infer: Infer, folder: Path, ref: Path, work: Path) -> list[dict]:
    """--out at a file, on a read-only file system, on a disk that fills mid-run (then grown and --continue'd:
    the outputs of the uninterrupted run `ref`, byte for byte). Each must exit 3 in one line."""
    out = []
    (work / "a_file").write_text("x")
    out.append(_screen_case("--out is a file", infer.run("out is a file", folder, work / "a_file"), EXIT_OUTPUT))
    ro, full = work / "ro", work / "full"
    if tmpfs(ro, "1m", readonly=True):
        try:
            out.append(_screen_case("read-only output file system", infer.run("read-only out", folder, ro / "o"),
                                    EXIT_OUTPUT))
        finally:
            unmount(ro)
    else:
        out.append({"case": "read-only output file system", "skipped": "cannot mount a tmpfs (needs root)"})
    outputs = [p for p in ref.iterdir() if p.suffix in (".gz", ".nii", ".png")]
    per_scan = sum(p.stat().st_size for p in outputs) // max(1, len(list(folder.iterdir())))
    size = max(64 << 10, int(per_scan * 2.5))                       # room for about two scans' outputs
    if tmpfs(full, str(size)):
        try:
            o = full / "o"
            r = infer.run("disk full", folder, o)
            case = _screen_case("disk fills mid-run", r, EXIT_OUTPUT)
            rows = read_rows(o / "report.csv")
            ok = [Path(f).name for f, row in (rows or {}).items() if row["status"] == "ok"]
            untrue = [n for n in ok if not (o / n).is_file()]           # an ok row must have its map
            case.update({"disk_bytes": size, "report_readable": rows is not None, "rows": len(rows or {}),
                         "ok_rows": len(ok), "ok_rows_without_map": untrue, "partial": partial_files(o)})
            grown = subprocess.run(["mount", "-o", "remount,size=64m", str(full)], capture_output=True).returncode == 0
            if grown:
                again = infer.run("disk full: grown, --continue", folder, o, "--continue")
                same, names = identical(ref, o)
                case.update({"continue_exit": again["rc"], "continue_rows": len(read_rows(o / "report.csv") or {}),
                             "continue_byte_identical": f"{len(same)}/{len(names)}",
                             "continue_partial": partial_files(o)})
                if again["rc"] != EXIT_OK or len(same) != len(names):
                    case["problem"] = f"after growing the disk, --continue: exit {again['rc']}, " \
                                      f"{len(same)}/{len(names)} outputs byte-identical"
            if untrue and "problem" not in case:
                case["problem"] = f"ok rows without their map: {untrue}"
            out.append(case)
        finally:
            unmount(full)
    else:
        out.append({"case": "disk fills mid-run", "skipped": "cannot mount a tmpfs (needs root)"})
    return out


def _screen_case(name: str, r: dict, expect: int) -> dict:
    """A run that must exit `expect`, with an `error:` line (exit 2 or 3) that is one line."""
    lines = screen_lines(r["stdout"] + r["stderr"])
    errors = [ln for ln in lines if ln.startswith("error: ")]
    case = {"case": name, "exit": r["rc"], "expect_exit": expect, "tracebacks": r["tracebacks"],
            "last_line": last_line(r), "error_lines": len(errors)}
    if r["rc"] != expect:
        case["problem"] = f"exit {r['rc']}, expected {expect}"
    elif expect in (EXIT_USAGE, EXIT_OUTPUT) and (len(errors) != 1 or lines[-1] != errors[0]):
        case["problem"] = f"{len(errors)} error lines (expected one, last)"
    return case


def last_line(r: dict) -> str:
    """The last line on screen that is not a progress bar."""
    return (screen_lines(r["stdout"] + r["stderr"]) or [""])[-1][:300]


LOAD = ("import sys, time\n"
        "from mimood.data.io import load_volume\n"
        "from mimood.errors import InputError\n"
        f"base = {HWM}\n"
        "t = time.perf_counter()\n"
        "try:\n    load_volume(sys.argv[1]); what = 'loaded'\n"
        "except InputError as e:\n    what = str(e)\n"
        f"print(round(time.perf_counter() - t, 3), base // 1024, {HWM} // 1024, what)\n")


def load_alone(path: Path) -> dict:
    """load_volume(path) in a fresh process: seconds, peak MiB after the imports and in all, outcome."""
    out = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    seconds, base, peak, what = out.stdout.strip().split(" ", 3)
    return {"load_seconds": float(seconds), "imports_mib": int(base), "load_peak_mib": int(peak), "load": what}


def export_runs(infer: Infer, export: Path, folder: Path, work: Path) -> list[dict]:
    """Manifests with a NaN or non-numeric threshold or lambda, and graph paths leaving the export folder: each
    refused in one line, exit 2."""
    outside = work / "outside"
    cases = [("threshold NaN", {"threshold": float("nan")}), ("threshold 'high'", {"threshold": "high"}),
             ("lam NaN", {"lam": float("nan")}), ("lam 'x'", {"lam": "x"}),
             ("graph file ../", {"graph_file": "../outside/encode.onnx"}),
             ("graph file absolute", {"graph_file": str(outside / "encode.onnx")})]
    out = []
    for name, change in cases:
        bad = work / f"export_{len(out)}"
        shutil.copytree(export, bad)
        m = json.loads((bad / "manifest.json").read_text())
        if "graph_file" in change:
            outside.mkdir(exist_ok=True)
            shutil.copyfile(bad / m["graphs"]["encode"]["file"], outside / "encode.onnx")
            m["graphs"]["encode"]["file"] = change["graph_file"]
        else:
            m.update(change)
        (bad / "manifest.json").write_text(json.dumps(m))
        o = work / f"out_export_{len(out)}"
        r = infer.run(f"export: {name}", folder, o, export=bad)
        case = _screen_case(f"manifest {name}", r, EXIT_USAGE)
        case["silent_wrong"] = r["rc"] == 0            # a run that succeeds with such a manifest is wrong
        out.append(case)
    return out


def quiet_run(infer: Infer, folder: Path, work: Path) -> dict:
    """--quiet on a folder with one broken scan: exit 1, the failure and a summary still printed."""
    r = infer.run("--quiet with failures", folder, work / "out_quiet", "--quiet")
    lines = screen_lines(r["stdout"] + r["stderr"])
    case = _screen_case("--quiet with a failure", r, EXIT_FAILED)
    case.update({"printed": lines, "hides_failures": not any(ln.startswith("failed: ") for ln in lines)})
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, help="export folder (default: a tiny random-weight export)")
    ap.add_argument("--base", type=Path, help="valid scan the mutations start from (default: synthetic)")
    ap.add_argument("--n-mutations", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bomb-gib", type=float, default=4.0, help="what each gzip bomb inflates to")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    ap.add_argument("--json", type=Path, help="write the full results here")
    ap.add_argument("--without", nargs="*", default=[], metavar="NAME",
                    help="drop these inputs (file names) from the set, e.g. to see past one that aborts the run")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fuzz_infer_")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run_all(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(summary(results))
    sys.exit(0 if results["clean"] else 1)


def run_all(args, work: Path) -> dict:
    from mimood.data.io import load_volume

    export = args.export or tiny_export(work)
    with_mask = json.loads((export / "manifest.json").read_text()).get("threshold") is not None
    if args.base:
        loaded = load_volume(args.base)
        base = nib.Nifti1Image(np.round(loaded.get_fdata()).astype(np.int16), loaded.affine)
        base.set_qform(loaded.affine, code=1)
        base.set_sform(loaded.affine, code=1)
    else:
        base = synthetic_scan()
    folder = work / "inputs"
    t0 = time.perf_counter()
    inputs = make_inputs(folder, base, seed=args.seed, n_mutations=args.n_mutations,
                         bomb_bytes=int(args.bomb_gib * (1 << 30)))
    made = time.perf_counter() - t0
    for i in [i for i in inputs if i.name in args.without]:
        inputs.remove(i)
        (folder / i.name).unlink()
    infer = Infer(export, work, args.backend)
    folder_run = infer.run("fuzz folder", folder, work / "out")
    screen = folder_run["stdout"] + folder_run["stderr"]
    main_result = judge_folder(inputs, folder, work / "out", screen, with_mask)
    main_result.update({"exit": folder_run["rc"], "seconds": folder_run["seconds"], "peak_mib": folder_run["peak_mib"],
                        "errors_log_entries": _log_entries(work / "out" / "errors.log")})
    bombs = bomb_runs(infer, inputs, folder, work)
    valid = valid_folder(work / "valid", base, 4)
    ref = work / "ref"
    reference = infer.run("reference: the valid folder", valid, ref)
    kill = kill_and_continue(infer, valid, ref, work)
    mixed = work / "mixed"
    shutil.copytree(valid, mixed)
    (mixed / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"junk" * 10)
    quiet = quiet_run(infer, mixed, work)
    disks = disk_runs(infer, valid, ref, work)
    exports = export_runs(infer, export, valid, work)

    tracebacks = sum(r["tracebacks"] for r in infer.runs)
    stray = main_result["stray"] + [f"{r['label']}: {ln}" for r in infer.runs[1:]
                                    for ln in stray_lines(r["stdout"] + r["stderr"])]
    partial = main_result["partial"] + [f"after kill -9 + --continue: {p}" for p in kill["partial"]] + \
        [f"disk full: {p}" for d in disks for p in d.get("partial", []) + d.get("continue_partial", [])]
    wrong = main_result["silent_wrong"] + [f"manifest {e['case']}: exit 0" for e in exports if e["silent_wrong"]]
    if kill["byte_identical"] != kill["outputs"]:
        wrong.append(f"kill -9 + --continue: {kill['outputs'] - kill['byte_identical']} outputs differ")
    if quiet["hides_failures"]:
        wrong.append("--quiet: a failure not printed")
    exits = [f"{c['case']}: {c['problem']}" for c in disks + exports + [quiet] if c.get("problem")]
    if folder_run["rc"] != EXIT_FAILED:
        exits.append(f"fuzz folder: exit {folder_run['rc']}, expected {EXIT_FAILED} (some scans failed)")
    if reference["rc"] != EXIT_OK or kill["continue_exit"] != EXIT_OK:
        exits.append(f"valid folder: exit {reference['rc']}, after kill -9 + --continue {kill['continue_exit']}")
    if kill["stale_temporaries"]:
        partial.append(f"after kill -9 + --continue: {kill['stale_temporaries']}")
    return {"inputs": main_result["inputs"], "made_seconds": round(made, 1), "base": str(args.base or "synthetic"),
            "without": args.without,
            "seed": args.seed, "export": str(args.export or "tiny random-weight export"),
            "tracebacks": tracebacks, "missing_rows": main_result["missing"], "partial_files": partial,
            "silent_wrong": wrong, "unexpected": main_result["unexpected"], "stray_lines": stray,
            "exit_problems": exits, "folder": main_result, "bombs": bombs, "kill_continue": kill, "quiet": quiet,
            "disk": disks, "manifests": exports,
            "runs": [{k: v for k, v in r.items() if k not in ("stdout", "stderr")} for r in infer.runs],
            "traceback_runs": [r["label"] for r in infer.runs if r["tracebacks"]],
            "clean": not (tracebacks or main_result["missing"] or partial or wrong or main_result["unexpected"]
                          or stray or exits)}


def _log_entries(path: Path) -> int:
    return path.read_text().count(TRACEBACK) if path.is_file() else 0


def summary(r: dict) -> str:
    f = r["folder"]
    lines = [f"fuzz set: {r['inputs']} inputs (base {r['base']}, seed {r['seed']}, made in {r['made_seconds']} s), "
             f"export: {r['export']}" + (f", without {', '.join(r['without'])}" if r["without"] else ""),
             f"folder run: exit {f['exit']}, {f['seconds']} s, peak {f['peak_mib']} MiB, rows {f['rows']} "
             f"{f['outcomes']}, errors.log tracebacks {f['errors_log_entries']}",
             f"tracebacks on screen:  {r['tracebacks']}" + (f"  (runs: {', '.join(r['traceback_runs'])})"
                                                           if r["traceback_runs"] else ""),
             f"missing rows:          {len(r['missing_rows'])}",
             f"partial files:         {len(r['partial_files'])}",
             f"silent wrong outputs:  {len(r['silent_wrong'])}",
             f"unexpected errors:     {len(r['unexpected'])}  (caught per scan, tracebacks in errors.log)",
             f"stray screen lines:    {len(r['stray_lines'])}  (Python warnings, nibabel's log)",
             f"wrong exit codes:      {len(r['exit_problems'])}"]
    for what in ("missing_rows", "partial_files", "silent_wrong", "unexpected", "stray_lines", "exit_problems"):
        lines += [f"    {what}: {x}" for x in r[what][:20]]
    for b in r["bombs"]:
        lines.append(f"bomb {b['input']} ({b['compressed_bytes']} bytes, {b['note']}): mimood-infer {b['seconds']} s, "
                     f"peak {b['peak_mib']} MiB, row {b['status']}; load_volume alone {b.get('load_seconds')} s, peak "
                     f"{b.get('load_peak_mib')} MiB ({b.get('imports_mib')} MiB after imports): "
                     f"{b.get('load', b.get('error'))}"[:400])
    k = r["kill_continue"]
    lines.append(f"kill -9 while writing + --continue: killed {k['killed']} (temporaries then: "
                 f"{len(k['temporaries_after_kill'])}), {k['byte_identical']}/{k['outputs']} outputs "
                 f"byte-identical, stale temporaries {len(k['stale_temporaries'])}, exit {k['continue_exit']}"
                 + (f" ({k['swept_note']})" if k["swept_note"] else ""))
    q = r["quiet"]
    lines.append(f"--quiet with a failure: exit {q['exit']}, printed: {' | '.join(q['printed'])}"[:400])
    for d in r["disk"] + r["manifests"]:
        if "skipped" in d:
            lines.append(f"{d['case']}: skipped ({d['skipped']})")
            continue
        more = ""
        if "report_readable" in d:
            more = (f"; report readable {d['report_readable']}, {d['rows']} rows ({d['ok_rows']} ok, each with its "
                    f"map: {not d['ok_rows_without_map']}), partial files {len(d['partial'])}")
            if "continue_exit" in d:
                more += (f"; disk grown, --continue: exit {d['continue_exit']}, {d['continue_rows']} rows, "
                         f"{d['continue_byte_identical']} outputs byte-identical to an uninterrupted run")
        lines.append(f"{d['case']}: exit {d['exit']} (expected {d['expect_exit']}), tracebacks {d['tracebacks']}, "
                     f"last line: {d['last_line']}{more}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
