"""What a `mimood-infer` run did with a fuzz set (mimood.testing.fuzz): issue 15's counts for one output folder.

    verdict = judge_folder(inputs, folder, out, screen_text, with_mask=True)
    verdict["missing"], verdict["partial"], verdict["silent_wrong"], verdict["unexpected"], verdict["stray"]

- missing: inputs with neither a map (an ok row) nor a failure row in report.csv;
- partial: temporaries left in the output folder, outputs that do not load (NIfTI) or are not whole PNGs;
- silent_wrong: an input mapped that had to be refused, or mapped without the warning it had to get (on screen or
  in its row), and outputs shared by two inputs (fewer map/mask/png files than ok rows);
- unexpected: failure rows for an unexpected error (the per-scan catch-all caught a bug; traceback in errors.log);
- stray: lines on screen that are not mimood's own (Python's warning display, nibabel's log, a traceback).
tests/test_fuzz.py judges a slice of the set this way, benchmarks/fuzz_infer.py the whole set.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from mimood.testing.fuzz import FuzzInput

TRACEBACK = "Traceback (most recent call last)"
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Python's warning display ("x.py:12: InputWarning: ..."), its source line, a traceback's frames, a logger
_STRAY = re.compile(r"(\w+Warning: |^File \"|^warnings\.warn|^(INFO|WARNING|DEBUG|ERROR)[: ]|pixdim\[|" + re.escape(
    TRACEBACK) + ")")
_OURS = ("warning: ", "failed: ", "error: ")


def screen_lines(text: str) -> list[str]:
    """The lines a terminal shows, without progress bars (tqdm's carriage returns and cursor moves)."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", _ESCAPES.sub("", text))]
    return [ln for ln in lines if ln and "%|" not in ln and not re.match(r"^(scans|slices): ", ln)]


def stray_lines(text: str) -> list[str]:
    """Screen lines that are not mimood's own (module docstring)."""
    return [ln for ln in screen_lines(text) if not ln.startswith(_OURS) and _STRAY.search(ln)]


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


def judge_folder(inputs: list[FuzzInput], folder: Path, out: Path, screen: str, with_mask: bool,
                 with_png: bool = True) -> dict:
    """The counts for one folder run (module docstring); `screen`: its stdout and stderr."""
    rows = read_rows(out / "report.csv") or {}
    missing, wrong, unexpected, outcome = [], [], [], {}
    for i in inputs:
        row = rows.get(str(folder / i.name))
        if row is None:
            missing.append(f"{i.name}: no row")
            continue
        outcome[row["status"]] = outcome.get(row["status"], 0) + 1
        if row["status"] != "ok":
            if ": unexpected " in row["error"]:
                unexpected.append(f"{i.name}: {row['error']}")
            continue
        if i.expect == "refuse":
            wrong.append(f"{i.name}: mapped, must be refused ({i.fragment})")
        elif i.expect == "warn" and i.fragment not in screen and i.fragment not in json.dumps(row):
            wrong.append(f"{i.name}: mapped without the warning '{i.fragment}'")
    n_ok = sum(r["status"] == "ok" for r in rows.values())
    files = outputs_of(out)
    for kind in ("maps",) + (("pngs",) if with_png else ()) + (("masks",) if with_mask else ()):
        if files[kind] < n_ok:
            wrong.append(f"{n_ok - files[kind]} {kind} shared by two inputs ({files[kind]} {kind}, {n_ok} ok rows)")
    return {"inputs": len(inputs), "rows": len(rows), "outcomes": outcome, "missing": missing,
            "partial": partial_files(out), "silent_wrong": wrong, "unexpected": unexpected,
            "stray": stray_lines(screen), "tracebacks": screen.count(TRACEBACK)}
