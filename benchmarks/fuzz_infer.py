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
    partial files          temporaries left behind, outputs that do not load
    silent wrong outputs   mapped where it had to be refused or warned about, outputs shared by two inputs,
                           exit 0 with a NaN threshold, ...
and the peak memory and time on each bomb, and whether kill -9 + --continue gives byte-identical outputs with
no stale temporary. Exit status 0 only when tracebacks, missing rows, partial files and silent wrong outputs are
all 0. The disk-full and read-only cases need a small tmpfs (root); they are skipped, and say so, without one.
"""
from __future__ import annotations

import argparse
import csv
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

from mimood.testing.fuzz import FuzzInput, make_inputs, synthetic_scan  # noqa: E402

TRACEBACK = "Traceback (most recent call last)"
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
        cmd = [sys.executable, "-c", RUNNER, str(inp), "-o", str(out), "--export", str(export or self.export),
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


def read_rows(path: Path) -> dict[str, dict] | None:
    """report.csv by input file, or None when it is missing or not a complete csv."""
    try:
        with open(path, newline="") as f:
            return {r["file"]: r for r in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return None


def partial_files(out: Path) -> list[str]:
    """Temporaries left in `out` and outputs that do not load (NIfTI) or are not whole PNGs."""
    bad = []
    if not out.is_dir():
        return bad
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        if p.name.startswith(".") and ".tmp" in p.name:
            bad.append(f"{p.name}: temporary left behind")
        elif p.name.endswith((".nii", ".nii.gz")):
            try:
                np.asarray(nib.load(str(p)).dataobj)
            except Exception as e:  # any failure to read back is a partial file
                bad.append(f"{p.name}: does not load ({type(e).__name__})")
        elif p.suffix == ".png" and not p.read_bytes().endswith(b"IEND\xaeB`\x82"):
            bad.append(f"{p.name}: not a whole PNG")
    return bad


def outputs_of(out: Path) -> dict[str, int]:
    files = [p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")] if out.is_dir() else []
    masks = sum(n.endswith("_mask.nii.gz") for n in files)
    maps = sum(n.endswith((".nii", ".nii.gz")) for n in files) - masks
    return {"maps": maps, "masks": masks, "pngs": sum(n.endswith(".png") for n in files)}


def judge_folder(inputs: list[FuzzInput], folder: Path, out: Path, run: dict, with_mask: bool) -> dict:
    """The issue's counts for one folder run."""
    rows = read_rows(out / "report.csv") or {}
    screen = run["stdout"] + run["stderr"]
    missing, wrong, outcome = [], [], {}
    for i in inputs:
        path = str(folder / i.name)
        row = rows.get(path)
        if row is None:
            missing.append(f"{i.name}: no row")
            continue
        outcome[row["status"]] = outcome.get(row["status"], 0) + 1
        if row["status"] != "ok":
            continue
        if i.expect == "refuse":
            wrong.append(f"{i.name}: mapped, must be refused ({i.fragment})")
        elif i.expect == "warn" and i.fragment not in screen and i.fragment not in json.dumps(row):
            wrong.append(f"{i.name}: mapped without the warning '{i.fragment}'")
    n_ok = sum(r["status"] == "ok" for r in rows.values())
    files = outputs_of(out)
    for kind in ("maps", "pngs") + (("masks",) if with_mask else ()):
        if files[kind] < n_ok:
            wrong.append(f"{n_ok - files[kind]} {kind} shared by two inputs ({files[kind]} {kind}, {n_ok} ok rows)")
    return {"inputs": len(inputs), "rows": len(rows), "outcomes": outcome, "missing": missing,
            "partial": partial_files(out), "silent_wrong": wrong, "exit": run["rc"], "seconds": run["seconds"],
            "peak_mib": run["peak_mib"], "tracebacks": run["tracebacks"]}


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


def kill_and_continue(infer: Infer, folder: Path, work: Path) -> dict:
    """An uninterrupted run against one killed (-9) while it writes an output file (a temporary exists; polled
    every 2 ms) and then --continue'd."""
    ref, out = work / "kill_ref", work / "kill_out"
    infer.run("kill: reference", folder, ref)

    def writing() -> bool:
        try:
            return any(e.name.startswith(".") and ".tmp" in e.name for e in os.scandir(out))
        except OSError:
            return False

    first = infer.run("kill: killed run", folder, out, kill_when=writing, kill_after=600)
    left = [p.name for p in out.iterdir() if p.name.startswith(".") and ".tmp" in p.name] if out.is_dir() else []
    second = infer.run("kill: --continue", folder, out, "--continue")
    names = sorted(p.name for p in ref.iterdir() if p.suffix in (".gz", ".nii", ".png"))
    same = [n for n in names if (out / n).is_file() and (out / n).read_bytes() == (ref / n).read_bytes()]
    stale = [p.name for p in out.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    return {"killed": first["killed"], "temporaries_after_kill": left, "continue_exit": second["rc"],
            "outputs": len(names),
            "byte_identical": len(same), "stale_temporaries": stale, "partial": partial_files(out)}


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


def disk_runs(infer: Infer, folder: Path, work: Path) -> list[dict]:
    """--out at a file, on a read-only file system, on a disk that fills mid-run."""
    out = []
    (work / "a_file").write_text("x")
    r = infer.run("out is a file", folder, work / "a_file")
    out.append(_screen_case("--out is a file", r))
    ro, full = work / "ro", work / "full"
    if tmpfs(ro, "1m", readonly=True):
        try:
            out.append(_screen_case("read-only output file system", infer.run("read-only out", folder, ro / "o")))
        finally:
            unmount(ro)
    else:
        out.append({"case": "read-only output file system", "skipped": "cannot mount a tmpfs (needs root)"})
    per_scan = sum(p.stat().st_size for p in folder.iterdir()) // max(1, len(list(folder.iterdir())))
    if tmpfs(full, str(max(64 << 10, int(per_scan * 2.5)))):        # room for about two scans' outputs
        try:
            r = infer.run("disk full", folder, full / "o")
            case = _screen_case("disk fills mid-run", r)
            rows = read_rows(full / "o" / "report.csv")
            case.update({"report_readable": rows is not None, "rows": len(rows or {}),
                         "partial": partial_files(full / "o")})
            out.append(case)
        finally:
            unmount(full)
    else:
        out.append({"case": "disk fills mid-run", "skipped": "cannot mount a tmpfs (needs root)"})
    return out


def _screen_case(name: str, r: dict) -> dict:
    return {"case": name, "exit": r["rc"], "tracebacks": r["tracebacks"], "last_line": last_line(r)}


def last_line(r: dict) -> str:
    """The last line on screen that is not a progress bar."""
    text = (r["stdout"] + r["stderr"]).replace("\r", "\n")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "\x1b" not in ln and "%|" not in ln]
    return (lines or [""])[-1][:200]


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
    """Manifests with a NaN or non-numeric threshold or lambda, and a graph path leaving the export folder."""
    cases = [("threshold NaN", {"threshold": float("nan")}), ("threshold 'high'", {"threshold": "high"}),
             ("lam NaN", {"lam": float("nan")}), ("lam 'x'", {"lam": "x"}),
             ("graph file ../", {"graph_file": "../outside/encode.onnx"})]
    out = []
    for name, change in cases:
        bad = work / f"export_{len(out)}"
        shutil.copytree(export, bad)
        m = json.loads((bad / "manifest.json").read_text())
        if "graph_file" in change:
            outside = bad.parent / "outside"
            outside.mkdir(exist_ok=True)
            shutil.copyfile(bad / m["graphs"]["encode"]["file"], outside / "encode.onnx")
            m["graphs"]["encode"]["file"] = change["graph_file"]
        else:
            m.update(change)
        (bad / "manifest.json").write_text(json.dumps(m))
        o = work / f"out_export_{len(out)}"
        r = infer.run(f"export: {name}", folder, o, export=bad)
        case = _screen_case(f"manifest {name}", r)
        case["silent_wrong"] = r["rc"] == 0            # a run that succeeds with such a manifest is wrong
        out.append(case)
    return out


def quiet_run(infer: Infer, folder: Path, work: Path) -> dict:
    r = infer.run("--quiet with failures", folder, work / "out_quiet", "--quiet")
    screen = (r["stdout"] + r["stderr"]).strip()
    return {"case": "--quiet with failures", "exit": r["rc"], "printed_lines": len(screen.splitlines()),
            "hides_failures": r["rc"] != 0 and not screen, "tracebacks": r["tracebacks"]}


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
    main_result = judge_folder(inputs, folder, work / "out", folder_run, with_mask)
    bombs = bomb_runs(infer, inputs, folder, work)
    valid = valid_folder(work / "valid", base, 4)
    kill = kill_and_continue(infer, valid, work)
    mixed = work / "mixed"
    shutil.copytree(valid, mixed)
    (mixed / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"junk" * 10)
    quiet = quiet_run(infer, mixed, work)
    disks = disk_runs(infer, valid, work)
    exports = export_runs(infer, export, valid, work)

    tracebacks = sum(r["tracebacks"] for r in infer.runs)
    partial = main_result["partial"] + [f"after kill -9 + --continue: {p}" for p in kill["partial"]] + \
        [f"disk full: {p}" for d in disks for p in d.get("partial", [])]
    wrong = main_result["silent_wrong"] + [f"manifest {e['case']}: exit 0" for e in exports if e["silent_wrong"]]
    if kill["byte_identical"] != kill["outputs"]:
        wrong.append(f"kill -9 + --continue: {kill['outputs'] - kill['byte_identical']} outputs differ")
    if quiet["hides_failures"]:
        wrong.append("--quiet: exit 1 with nothing printed")
    return {"inputs": main_result["inputs"], "made_seconds": round(made, 1), "base": str(args.base or "synthetic"),
            "without": args.without,
            "seed": args.seed, "export": str(args.export or "tiny random-weight export"),
            "tracebacks": tracebacks, "missing_rows": main_result["missing"], "partial_files": partial,
            "silent_wrong": wrong, "folder": main_result, "bombs": bombs, "kill_continue": kill, "quiet": quiet,
            "disk": disks, "manifests": exports,
            "runs": [{k: v for k, v in r.items() if k not in ("stdout", "stderr")} for r in infer.runs],
            "traceback_runs": [r["label"] for r in infer.runs if r["tracebacks"]],
            "clean": not (tracebacks or main_result["missing"] or partial or wrong)}


def summary(r: dict) -> str:
    f = r["folder"]
    lines = [f"fuzz set: {r['inputs']} inputs (base {r['base']}, seed {r['seed']}, made in {r['made_seconds']} s), "
             f"export: {r['export']}" + (f", without {', '.join(r['without'])}" if r["without"] else ""),
             f"folder run: exit {f['exit']}, {f['seconds']} s, peak {f['peak_mib']} MiB, rows {f['rows']} "
             f"{f['outcomes']}",
             f"tracebacks on screen:  {r['tracebacks']}" + (f"  (runs: {', '.join(r['traceback_runs'])})"
                                                           if r["traceback_runs"] else ""),
             f"missing rows:          {len(r['missing_rows'])}",
             f"partial files:         {len(r['partial_files'])}",
             f"silent wrong outputs:  {len(r['silent_wrong'])}"]
    for what in ("missing_rows", "partial_files", "silent_wrong"):
        lines += [f"    {what}: {x}" for x in r[what][:20]]
    for b in r["bombs"]:
        lines.append(f"bomb {b['input']} ({b['compressed_bytes']} bytes, {b['note']}): mimood-infer {b['seconds']} s, "
                     f"peak {b['peak_mib']} MiB, row {b['status']}; load_volume alone {b.get('load_seconds')} s, peak "
                     f"{b.get('load_peak_mib')} MiB ({b.get('imports_mib')} MiB after imports): "
                     f"{b.get('load', b.get('error'))}"[:400])
    k = r["kill_continue"]
    lines.append(f"kill -9 while writing + --continue: killed {k['killed']} (temporaries then: "
                 f"{len(k['temporaries_after_kill'])}), {k['byte_identical']}/{k['outputs']} outputs "
                 f"byte-identical, stale temporaries {len(k['stale_temporaries'])}, exit {k['continue_exit']}")
    q = r["quiet"]
    lines.append(f"--quiet with a failure: exit {q['exit']}, {q['printed_lines']} lines printed")
    for d in r["disk"] + r["manifests"]:
        lines.append(f"{d['case']}: " + (f"skipped ({d['skipped']})" if "skipped" in d else
                                         f"exit {d['exit']}, tracebacks {d['tracebacks']}, last line: "
                                         f"{d['last_line']}"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
