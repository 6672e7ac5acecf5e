"""What one inference run writes, per scan and per run, in one of two formats (the output side of `InferJob`).

    writer = RunWriter(out, fmt="files", threshold=0.08, reference=HealthyReference([...], "ood.mirror"))
    writer.check(input, all_cases)                 # refuses an output folder it must not write into
    row = writer.write(case, slices, maps, raw_score, "ood.mirror", ...)   # every file of one scan, its report row
    problems = writer.close(rows, notes, cases)    # index.html, the MOOD check

`files` (the default): into OUT, per scan the map, the filtered mask, the overlay PNG and the viewer data
(mimood.runtime.outputs), and per run report.csv (+ report.columns.json, the columns and their units),
provenance.json and index.html (mimood.runtime.html_report: every scan of every part found in OUT).

`mood` (mimood.runtime.mood, the MOOD challenge's convention): OUT holds exactly `<input file name>` (the map in
[0, 1] on the input's grid) and `<input file name>.txt` (the [0, 1] scan score) per scan, nothing else; the
report, provenance, overlays and index go to `report_dir` when one is given, else nowhere. The run refuses an
export without a healthy reference for its scan score (no [0, 1] score), an OUT holding other files, and two
inputs with the same file name (in two subfolders: they would overwrite each other's outputs); at the end
`check_mood_folder` reads OUT back as the evaluator would.

`--continue` (`finished`): files: a scan is finished when this part's report lists it as ok and its map, mask
(with a threshold), PNG (with matplotlib) and viewer data (with the viewer) exist; mood: when its map and score
files exist. Outputs made with another export (the manifest's hash in the previous provenance differs) are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mimood.data.discover import Case
from mimood.data.preprocess import Slices
from mimood.errors import InputError
from mimood.runtime.components import MIN_COMPONENT_ML, LesionStats
from mimood.runtime.html_report import Entry, write_index, write_viewer_data
from mimood.runtime.mood import check_mood_folder, mood_paths, write_mood_scan
from mimood.runtime.outputs import (SIDECAR, Row, columns_sidecar, output_paths, read_report, scan_maps,
                                    write_json, write_maps, write_report)
from mimood.runtime.overlay import write_overlay
from mimood.runtime.reference import MIN_REFERENCE, HealthyReference

FORMATS = ("files", "mood")


def healthy_reference(score_name: str, ood_reference: dict | None, extra: dict) -> HealthyReference | None:
    """The healthy reference of the raw scan score `score_name` ("ood.<name>": the OOD fit's reference scans,
    ood_reference = OODScorer.meta["reference"]; "map": the export's manifest.extra.reference["map"]); None
    when the export has none."""
    kind, _, name = score_name.partition(".")
    scores = (ood_reference or {}).get(name) if kind == "ood" else extra.get(score_name)
    return HealthyReference(scores, score_name) if scores else None


def reference_note(ref: HealthyReference | None, score_name: str) -> str:
    """What a user should know about the [0, 1] scan score of this export ('' when nothing)."""
    if ref is None:
        return (f"the export has no healthy reference scores for its {score_name} score: scan_score left empty "
                "(raw_score holds the raw score)")
    if ref.n < MIN_REFERENCE:
        return (f"the [0, 1] scan score rests on {ref.n} healthy reference scans: z-score and percentile "
                f"omitted (they need at least {MIN_REFERENCE})")
    return ""


class RunWriter:
    """The outputs of one run (or part) of `InferJob` (module docstring)."""

    def __init__(self, out: str | Path, fmt: str = "files", report_dir: str | Path | None = None,
                 threshold: float | None = None, reference: HealthyReference | None = None,
                 min_ml: float = MIN_COMPONENT_ML, png: bool = True, viewer: bool = True,
                 radiological: bool = True, tag: str = ""):
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; expected one of {FORMATS}")
        if min_ml < 0:
            raise ValueError(f"--min-component-ml {min_ml}: must be >= 0 (0 keeps every flagged voxel)")
        self.out, self.fmt = Path(out), fmt
        self.reports = self.out if fmt == "files" else (Path(report_dir) if report_dir is not None else None)
        self.threshold, self.reference, self.min_ml = threshold, reference, min_ml
        self.png = png and self.reports is not None
        self.viewer = viewer and self.reports is not None
        self.radiological, self.tag = radiological, tag
        self.notes: dict[str, str] = {}              # scan name -> why it has no overlay or viewer

    @property
    def report_path(self) -> Path | None:
        return None if self.reports is None else self.reports / f"report{self.tag}.csv"

    @property
    def prov_path(self) -> Path | None:
        return None if self.reports is None else self.reports / f"provenance{self.tag}.json"

    # -- before the run ---------------------------------------------------------------------------------------
    def check(self, input: Path, all_cases: list[Case]) -> None:
        """Refuse what would mix or overwrite outputs (module docstring), before anything is written."""
        if self.fmt != "mood":             # output names are unique already (mimood.data.discover._unique_names)
            return
        seen: dict[str, Path] = {}
        for c in all_cases:                # MOOD names outputs by the input's file name, which folders may repeat
            if c.image.name.casefold() in seen:
                raise InputError(input, f"two inputs would write the same outputs {c.image.name!r}: "
                                        f"{seen[c.image.name.casefold()]} and {c.image} (MOOD names outputs by the "
                                        "input's file name: rename one, or run them into separate folders)")
            seen[c.image.name.casefold()] = c.image
        if self.reference is None:
            raise InputError(self.out, "--format mood needs a [0, 1] scan score, and the export has no healthy "
                                       "reference scores to calibrate one")
        if self.reports is not None and self.reports.resolve() == self.out.resolve():
            raise InputError(self.reports, "--report must be another folder than the MOOD output folder")
        allowed = {p.name for c in all_cases for p in mood_paths(self.out, c.image)}
        if self.out.is_dir():
            foreign = sorted(p.name for p in self.out.iterdir() if p.name not in allowed and not _temporary(p))
            if foreign:
                raise InputError(self.out, f"holds files outside the MOOD convention ({', '.join(foreign[:3])}"
                                           f"{', ...' if len(foreign) > 3 else ''}): give an empty folder")

    def start(self) -> None:
        """Create the folders and write the column sidecar."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.reports is not None:
            self.reports.mkdir(parents=True, exist_ok=True)
            write_json(self.reports / SIDECAR, columns_sidecar())

    def finished(self, cases: list[Case], sha: str) -> tuple[dict[int, Row], dict[str, dict]]:
        """The rows (by case index) and provenance of scans a previous run finished (module docstring)."""
        old = None
        if self.prov_path is not None:
            try:
                old = json.loads(self.prov_path.read_text())
            except (OSError, ValueError):
                old = None
        if isinstance(old, dict) and old.get("manifest_sha256") not in (None, sha):
            raise InputError(self.out, "was written with another export (manifest hash differs); "
                                       "drop --continue or choose another -o/--output")
        previous = {r.file: r for r in read_report(self.report_path) if r.status == "ok"} if self.reports else {}
        info = old.get("scans", {}) if isinstance(old, dict) else {}
        rows, scans = {}, {}
        for k, c in enumerate(cases):
            row = previous.get(str(c.image))
            if self.fmt == "mood":
                map_path, score_path = mood_paths(self.out, c.image)
                if not (map_path.is_file() and score_path.is_file()):
                    continue
                if row is None:                            # no report kept: the score file says enough
                    row = Row(str(c.image), "ok", name=c.name, scan_score=_read_score(score_path))
            else:
                paths = output_paths(self.out, c.name, c.image)
                needed = ([paths["map"]] + ([paths["mask"]] if self.threshold is not None else [])
                          + ([paths["png"]] if self.png else []) + ([paths["viewer"]] if self.viewer else []))
                if row is None or not all(p.is_file() for p in needed):
                    continue
            rows[k] = row
            if str(c.image) in info:
                scans[str(c.image)] = info[str(c.image)]
        return rows, scans

    # -- per scan ---------------------------------------------------------------------------------------------
    def write(self, case: Case, slices: Slices, maps: np.ndarray, raw: float, score_name: str, backend: str,
              seconds: float) -> Row:
        """Write one restored scan's outputs (maps [S, H, W] of `slices`; raw: its raw scan score, or None for the
        map score) and return its report row (seconds: so far; the caller adds the writing time)."""
        m = scan_maps(slices, maps, self.threshold, score_name, self.min_ml)
        raw = m.map_score if raw is None else float(raw)
        ref = self.reference
        score = ref.calibrate(raw) if ref is not None else None
        if self.fmt == "mood":
            write_mood_scan(self.out, case.image, m.volume, score)
        else:
            write_maps(output_paths(self.out, case.name, case.image), m)
        row = Row(str(case.image), "ok", name=case.name, scan_score=None if score is None else _digits(score, 12),
                  raw_score=_digits(raw, 9), score_name=score_name, reference_scans=None if ref is None else ref.n,
                  map_score=_digits(m.map_score, 9),
                  stats=None if m.stats is None else LesionStats(**m.stats.row()),     # as report.csv holds it
                  slices=len(slices.index), seconds=seconds, backend=backend)
        if self.reports is not None:
            paths = output_paths(self.reports, case.name, case.image)
            why = []
            if self.png:
                label = f"{score_name} vs {ref.n} healthy" if ref is not None else score_name
                why.append(write_overlay(paths["png"], case.name, slices, maps, self.threshold,
                                         raw if score is None else score, label, self.radiological,
                                         min_ml=self.min_ml, calibrated=score is not None))
            if self.viewer:
                why.append(write_viewer_data(self.reports, case.name, case.image, m.volume)[1])
            self.notes[case.name] = "; ".join(w for w in why if w)
        return row

    def failed(self, case: Case, error: Exception, seconds: float, backend: str) -> Row:
        return Row(str(case.image), "failed", name=case.name, error=str(error), seconds=seconds, backend=backend)

    def save_report(self, rows: list[Row]) -> None:
        if self.report_path is not None:
            write_report(self.report_path, rows)

    def save_provenance(self, prov: dict) -> None:
        if self.prov_path is not None:
            write_json(self.prov_path, prov)

    # -- after the run ----------------------------------------------------------------------------------------
    def close(self, rows: list[Row], notes: list[str], all_cases: list[Case]) -> list[str]:
        """Write index.html (every part's scans found beside this report) and, for mood, check OUT; returns the
        problems the MOOD check found ([] for files)."""
        if self.reports is not None:
            write_folder_index(self.reports, notes, {r.file: r for r in rows}, self.notes)
        if self.fmt != "mood":
            return []
        done = [Path(r.file) for r in rows if r.status == "ok"]
        return check_mood_folder(self.out, done, allowed=[c.image for c in all_cases])


def write_folder_index(folder: str | Path, notes: list[str] = (), rows: dict[str, Row] | None = None,
                       why: dict[str, str] | None = None) -> Path:
    """OUT/index.html over every report in `folder` (report.csv and each report.part<I>of<N>.csv, so the last
    part to finish lists all of them; run it again to refresh), with `rows` (file -> Row) taking precedence."""
    folder = Path(folder)
    found: dict[str, Row] = {}
    for path in sorted(folder.glob("report*.csv")):
        found.update({r.file: r for r in read_report(path)})
    found.update(rows or {})
    entries = []
    for r in found.values():
        name = r.name or Path(r.file).name.split(".nii")[0]
        png, js = folder / f"{name}.png", folder / "viewer" / f"{name}.js"
        focus = None
        if r.stats is not None and r.stats.largest_r_mm is not None:
            focus = (r.stats.largest_r_mm, r.stats.largest_a_mm, r.stats.largest_s_mm)
        entries.append(Entry(name, r.record(), overlay=png.name if png.is_file() and r.status == "ok" else None,
                             viewer=f"viewer/{name}.js" if js.is_file() and r.status == "ok" else None,
                             note=(why or {}).get(name, ""), focus_mm=focus))
    return write_index(folder, entries, notes=list(notes))


def _digits(x: float, n: int) -> float:
    """x to n significant digits (a [0, 1] score keeps its order near 1 with 12: 0.999999999999 stays below 1)."""
    return float(f"{float(x):.{n}g}")


def _read_score(path: Path) -> float | None:
    try:
        return float(path.read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None


def _temporary(path: Path) -> bool:
    """A temporary of mimood's atomic writer (`.<stem>.tmp-<pid>-<hex><suffix>`), e.g. another part's in flight."""
    return path.name.startswith(".") and ".tmp-" in path.name


__all__ = ["FORMATS", "RunWriter", "healthy_reference", "reference_note", "write_folder_index"]
