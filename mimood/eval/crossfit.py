"""Cross-fit without a leak: every evaluated case is scored by a run that saw no slice of it.

A run's training *and* calibration material is what `mimood-train` cached in `<run>/data/{train,val}_slices.npz`
(calibration uses the validation volumes), so a run's "seen" subjects are read from those caches, not from what
a script believes it passed. Subjects are compared without the modality suffix: `brats18_x_t2` and
`brats18_x_flair` are one subject.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mimood.data.slices import load_slice_set

_SUFFIX = re.compile(r"_(t1|t1ce|t1gd|t2|flair|seg|mask|label)$")


def subject_id(name: str) -> str:
    """A case name without its modality suffix, lower-cased: 'Brats18_X_t2' -> 'brats18_x'."""
    return _SUFFIX.sub("", name.lower())


def split_cases(names: Sequence[str], k: int = 2, seed: int = 0) -> list[list[str]]:
    """`names` dealt into `k` disjoint folds of near-equal size after a seeded shuffle; the subjects of one fold
    never appear in another (two files of one subject go to the same fold)."""
    if k < 2:
        raise ValueError(f"cross-fit needs k >= 2 folds, got {k}")
    subjects = sorted({subject_id(n) for n in names})
    if len(subjects) < k:
        raise ValueError(f"{len(subjects)} subjects cannot fill {k} folds")
    order = [subjects[i] for i in np.random.RandomState(seed).permutation(len(subjects))]
    fold_of = {s: i % k for i, s in enumerate(order)}
    return [sorted(n for n in names if fold_of[subject_id(n)] == f) for f in range(k)]


def seen_subjects(run: str | Path) -> set[str]:
    """Subjects whose slices the run trained or calibrated on (from its slice caches)."""
    run = Path(run)
    return {subject_id(n) for part in ("train", "val")
            for n in load_slice_set(run / "data" / f"{part}_slices.npz").names}


def check_no_leak(run: str | Path, cases: Iterable[str]) -> None:
    """Raise ValueError naming the run and the subjects when any of `cases` was seen by `run`."""
    leaked = sorted(seen_subjects(run) & {subject_id(c) for c in cases})
    if leaked:
        raise ValueError(f"{run}: trained or calibrated on {len(leaked)} of the cases it would score "
                         f"({', '.join(leaked)}): not a cross-fit")
