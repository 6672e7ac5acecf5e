"""The training-set cache: every kept slice of every training volume, preprocessed once.

Stored as float16 (a slice is 50 kB; a 300-volume set about 2 GB in memory) in one `.npz` written
atomically. Validation holds out whole volumes, never slices of a training volume.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mimood.config import DataConfig
from mimood.data.discover import Case
from mimood.data.io import atomic_write
from mimood.data.preprocess import preprocess
from mimood.errors import InputError


@dataclass
class SliceSet:
    images: np.ndarray      # [N, 160, 160] float16 in [0, 1]
    case: np.ndarray        # [N] int, index into `names`
    index: np.ndarray       # [N] int, slice index in the canonical volume
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)


def build_slice_set(cases: list[Case], cfg: DataConfig, progress: bool = True) -> tuple[SliceSet, list[str]]:
    """Preprocess every case; bad files are skipped and returned as "path: problem" lines.

    With `cfg.lesion_margin > 0` and a label, only slices at least that many mm from any labelled voxel
    are kept, so the tumour-free slices of lesion scans can train the model.
    """
    images, case_ids, index, names, skipped = [], [], [], [], []
    for case in tqdm(cases, desc="preprocessing", unit="volume", disable=not progress):
        use_label = cfg.lesion_margin > 0 and case.label is not None
        try:
            s = preprocess(case.image, cfg, label=case.label if use_label else None)
        except InputError as e:
            skipped.append(str(e))
            continue
        keep = np.ones(len(s.index), dtype=bool)
        if use_label:
            keep = s.lesion_distance >= cfg.lesion_margin
        if not keep.any():
            skipped.append(f"{case.image}: no slice is {cfg.lesion_margin} mm away from the labelled lesion")
            continue
        images.append(s.images[keep].astype(np.float16))
        index.append(s.index[keep])
        case_ids.append(np.full(int(keep.sum()), len(names)))
        names.append(case.name)
    size = cfg.size
    if not names:
        return SliceSet(np.zeros((0, size, size), np.float16), np.zeros(0, np.int64), np.zeros(0, np.int64),
                        []), skipped
    return SliceSet(np.concatenate(images), np.concatenate(case_ids).astype(np.int64),
                    np.concatenate(index).astype(np.int64), names), skipped


def save_slice_set(s: SliceSet, path: str | Path) -> None:
    """Write the set as an uncompressed `.npz` (loads fast), atomically."""
    with atomic_write(path) as tmp:
        np.savez(tmp, images=s.images, case=s.case, index=s.index, names=np.array(s.names, dtype=str))


def load_slice_set(path: str | Path) -> SliceSet:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return SliceSet(z["images"], z["case"], z["index"], [str(n) for n in z["names"]])
    except FileNotFoundError:
        raise InputError(path, "slice cache not found") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(path, f"not a slice cache ({e})") from None


def split_by_case(s: SliceSet, val_fraction: float, seed: int) -> tuple[SliceSet, SliceSet]:
    """(train, val): a seeded random `val_fraction` of the volumes (at least one) held out whole."""
    n = len(s.names)
    if n < 2:
        raise ValueError(f"need at least 2 volumes to hold one out for validation, got {n}")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val_cases = np.random.default_rng(seed).permutation(n)[:n_val]
    is_val = np.isin(s.case, val_cases)
    return _subset(s, ~is_val), _subset(s, is_val)


def _subset(s: SliceSet, keep: np.ndarray) -> SliceSet:
    """The kept slices, with case ids renumbered into the kept volumes' names."""
    used = np.unique(s.case[keep])
    remap = np.full(len(s.names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return SliceSet(s.images[keep], remap[s.case[keep]], s.index[keep], [s.names[i] for i in used])
