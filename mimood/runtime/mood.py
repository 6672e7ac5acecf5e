"""The MOOD challenge output convention (`mimood-infer --format mood`): the folder the challenge evaluator reads.

Medical Out-of-Distribution Analysis Challenge (MOOD, MICCAI; github.com/MIC-DKFZ/mood, scripts/evalresults.py).
What its evaluator does with a prediction folder, and so what this writer guarantees:
- pixel level: for every test file `<name>` (e.g. `00017.nii.gz`) it loads `<pred folder>/<name>`: same name, a
  NIfTI whose array has the test image's shape (a different shape, or a missing file, silently scores as all
  zeros); values are clipped to [0, 1] and read as float16.
  Here: `<name>` is the input's own file name, the map on the input's grid with the input's affine and header,
  float32, values in [0, 1] (clipped: a map outside it would be changed by the evaluator anyway).
- sample level: it reads the first line of `<pred folder>/<name>.txt` as one float (a missing or unreadable
  file silently scores 0) and clips it to [0, 1]; its metric is average precision over scans, so only the order
  matters, and ties at the clip lose it.
  Here: `<name>.txt` holds the calibrated [0, 1] scan score (mimood.runtime.reference: strictly increasing in
  the raw score, so scans beyond every healthy reference keep their order) on one line.
- nothing else: the challenge's docker runs read-only and gives the writer only the prediction folder; no report,
  overlay, mask or provenance goes there (`check_mood_folder` says what is missing, extra or out of range).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from mimood.data.io import atomic_write, save_nifti


def mood_paths(out: str | Path, image: str | Path) -> tuple[Path, Path]:
    """(map, score) paths for an input scan: `out/<input name>` and `out/<input name>.txt`."""
    name = Path(image).name
    return Path(out) / name, Path(out) / f"{name}.txt"


def write_mood_scan(out: str | Path, image: str | Path, map_volume: nib.Nifti1Image, score: float) -> None:
    """Write one scan's MOOD map (map_volume: on the input's grid and affine, mimood.data.preprocess.to_volume)
    and its [0, 1] scan score, each atomically."""
    if not (np.isfinite(score) and 0.0 <= score <= 1.0):
        raise ValueError(f"MOOD scan score must be a calibrated score in [0, 1], got {score}")
    map_path, score_path = mood_paths(out, image)
    data = np.clip(np.asarray(map_volume.dataobj, dtype=np.float32), 0.0, 1.0)
    save_nifti(data, map_volume.affine, map_volume, map_path)
    with atomic_write(score_path) as tmp:
        tmp.write_text(f"{float(score)!r}\n")             # every digit: near 1, order is all AP sees


def check_mood_folder(out: str | Path, images: list[str | Path], allowed: list[str | Path] = ()) -> list[str]:
    """Problems that would make the MOOD evaluator read `out` differently from what mimood meant, one line each
    ([] when the folder holds exactly a map and a score for every input, both valid, and nothing else). `allowed`:
    further inputs whose files may be there but are not checked (the other parts of a --part run); temporaries of
    the atomic writer in flight (`.<name>.tmp-...`) are not counted as extra files."""
    out = Path(out)
    problems = []
    expected = {p.name for image in allowed for p in mood_paths(out, image)}
    for image in images:
        map_path, score_path = mood_paths(out, image)
        expected |= {map_path.name, score_path.name}
        if not map_path.is_file():
            problems.append(f"{map_path}: missing (the evaluator would score it as all zeros)")
        else:
            try:
                pred, ref = nib.load(map_path), nib.load(image)
            except Exception as e:  # nibabel raises many types for unreadable files
                problems.append(f"{map_path}: unreadable ({e})")
            else:
                if pred.shape != ref.shape:
                    problems.append(f"{map_path}: shape {pred.shape} differs from the input's {ref.shape}")
                elif not np.allclose(pred.affine, ref.affine, atol=1e-4):
                    problems.append(f"{map_path}: affine differs from the input's")
                else:
                    data = np.asarray(pred.dataobj)
                    if not (np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1):
                        problems.append(f"{map_path}: values outside [0, 1]")
        if not score_path.is_file():
            problems.append(f"{score_path}: missing (the evaluator would score 0)")
        else:
            try:
                value = float(score_path.read_text().splitlines()[0])
            except (IndexError, ValueError):
                problems.append(f"{score_path}: the first line is not a number")
            else:
                if not 0.0 <= value <= 1.0:
                    problems.append(f"{score_path}: {value} is outside [0, 1]")
    in_flight = (lambda name: name.startswith(".") and ".tmp-" in name) if allowed else (lambda name: False)
    for extra in sorted(p.name for p in out.iterdir() if p.name not in expected and not in_flight(p.name)
                        ) if out.is_dir() else []:
        problems.append(f"{out / extra}: not part of the MOOD convention (only <name> and <name>.txt)")
    return problems
