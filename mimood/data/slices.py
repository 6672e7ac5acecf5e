"""The training-set cache: every kept slice of every training volume, preprocessed once.

Stored as float16 (a slice is 50 kB; a 300-volume set about 2 GB in memory) in one `.npz` written
atomically. Validation holds out whole volumes, never slices of a training volume.

Healthy material from labelled lesion scans (`DataConfig`):
- `lesion_margin` > 0 keeps the slices at least that many mm from any labelled voxel;
- `hemispheres` adds, for the other slices, the lesion-free half mirrored onto the lesion's side: where every
  brain pixel of one half of the 160 x 160 window (the window is centred on the brain, so its middle column is
  about the midline) lies at least `hemisphere_margin` mm (3-D) from the label, that half and its left-right
  mirror image make a whole healthy slice. No labelled voxel, nor any voxel within the margin of one, reaches
  a training sample (`hemisphere_slices` checks it).

Sources: `build_slice_set` takes the cases of several `--data` sources; each slice's sampling weight gives
every source its share of the training batches (`source_weights`), whatever its number of slices, and the
validation split holds out volumes of every source (`split_by_case`).
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
from mimood.data.preprocess import Slices, preprocess
from mimood.errors import InputError


@dataclass
class SliceSet:
    images: np.ndarray      # [N, 160, 160] float16 in [0, 1]
    case: np.ndarray        # [N] int, index into `names`
    index: np.ndarray       # [N] int, slice index in the canonical volume
    names: list[str]
    weight: np.ndarray | None = None   # [N] float64 sampling weight (None: uniform)
    mirrored: np.ndarray | None = None  # [N] bool: a mirrored lesion-free hemisphere (None: none is)
    source: np.ndarray | None = None   # [len(names)] int: which --data source each volume came from

    def __len__(self) -> int:
        return len(self.images)

    def probabilities(self) -> np.ndarray | None:
        """[N] sampling probabilities, or None for uniform sampling (then draws stay `rng.integers`)."""
        if self.weight is None or len(self.weight) == 0 or np.all(self.weight == self.weight[0]):
            return None
        return self.weight / self.weight.sum()


def hemisphere_slices(s: Slices, cfg: DataConfig, taken: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole healthy slices made of a lesion-free half and its mirror image (module docstring), for the slices
    of `s` (preprocessed with its label) that `taken` [S] bool does not already use. Returns (images [M, H, W],
    slice indices [M]); the half must hold at least a quarter of the slice's brain pixels."""
    from scipy import ndimage

    size = s.images.shape[-1]
    half = size // 2
    labels = s.labels                                                        # [S, H, W] bool
    if labels is None or not labels.any():
        return np.zeros((0, size, size), np.float32), np.zeros(0, np.int64)
    dz = float(np.sqrt((np.asarray(s.geometry.grid_affine)[:3, 2] ** 2).sum()))
    # distance to the label in mm; slices are contiguous along the superior axis except where a slice with
    # too little brain was skipped, which only makes the distance across that gap shorter (conservative)
    dist = ndimage.distance_transform_edt(~labels, sampling=(dz, cfg.spacing, cfg.spacing))
    out, index = [], []
    for i in np.flatnonzero(~taken):
        brain = s.brain[i]
        for side in (slice(0, half), slice(half, size)):
            b = brain[:, side]
            if b.sum() < 0.25 * brain.sum() or b.sum() == 0:
                continue
            if dist[i][:, side][b].min() < cfg.hemisphere_margin or labels[i][:, side].any():
                continue
            img = np.array(s.images[i])
            if side.start == 0:
                img[:, half:] = img[:, :half][:, ::-1]
            else:
                img[:, :half] = img[:, half:][:, ::-1]
            out.append(img)
            index.append(s.index[i])
            break                                     # at most one half per slice (both free: not in this set)
    if not out:
        return np.zeros((0, size, size), np.float32), np.zeros(0, np.int64)
    return np.stack(out).astype(np.float32), np.asarray(index, np.int64)


def build_slice_set(cases: list[Case], cfg: DataConfig, progress: bool = True,
                    sources: list[int] | None = None, source_weights: list[float] | None = None
                    ) -> tuple[SliceSet, list[str]]:
    """Preprocess every case; bad files are skipped and returned as "path: problem" lines.

    With `cfg.lesion_margin > 0` and a label, only slices at least that many mm from any labelled voxel
    are kept, so the tumour-free slices of lesion scans can train the model; `cfg.hemispheres` adds the
    mirrored lesion-free halves of the others (module docstring). `sources[i]` is case i's source (default: all
    one source) and `source_weights[j]` source j's share of the sampling (default: equal shares).
    """
    images, case_ids, index, names, mirrored, case_source, skipped = [], [], [], [], [], [], []
    sources = [0] * len(cases) if sources is None else list(sources)
    for case, src in tqdm(list(zip(cases, sources)), desc="preprocessing", unit="volume", disable=not progress):
        use_label = cfg.lesion_margin > 0 and case.label is not None
        try:
            s = preprocess(case.image, cfg, label=case.label if use_label else None)
        except InputError as e:
            skipped.append(str(e))
            continue
        keep = np.ones(len(s.index), dtype=bool)
        if use_label:
            keep = s.lesion_distance >= cfg.lesion_margin
        extra = np.zeros((0,) + s.images.shape[1:], np.float32), np.zeros(0, np.int64)
        if use_label and cfg.hemispheres:
            extra = hemisphere_slices(s, cfg, keep)
        if not keep.any() and not len(extra[0]):
            skipped.append(f"{case.image}: no slice is {cfg.lesion_margin} mm away from the labelled lesion")
            continue
        images += [s.images[keep].astype(np.float16), extra[0].astype(np.float16)]
        index += [s.index[keep], extra[1]]
        mirrored += [np.zeros(int(keep.sum()), bool), np.ones(len(extra[1]), bool)]
        case_ids.append(np.full(int(keep.sum()) + len(extra[1]), len(names)))
        names.append(case.name)
        case_source.append(src)
    size = cfg.size
    if not names:
        return SliceSet(np.zeros((0, size, size), np.float16), np.zeros(0, np.int64), np.zeros(0, np.int64),
                        []), skipped
    out = SliceSet(np.concatenate(images), np.concatenate(case_ids).astype(np.int64),
                   np.concatenate(index).astype(np.int64), names, mirrored=np.concatenate(mirrored),
                   source=np.asarray(case_source, np.int64))
    out.weight = source_balance(out, source_weights)
    return out, skipped


def source_balance(s: SliceSet, source_weights: list[float] | None = None) -> np.ndarray:
    """[N] per-slice weights giving source j the share source_weights[j] / sum (default equal) of the samples,
    spread evenly over its slices."""
    per_slice_source = s.source[s.case]
    n_src = int(s.source.max()) + 1
    w = np.ones(n_src) if source_weights is None else np.asarray(source_weights, np.float64)
    if len(w) < n_src or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"need a non-negative weight for each of the {n_src} data sources, got {list(w)}")
    counts = np.bincount(per_slice_source, minlength=n_src).astype(np.float64)
    return np.where(counts[per_slice_source] > 0, w[per_slice_source] / np.maximum(counts[per_slice_source], 1), 0)


def save_slice_set(s: SliceSet, path: str | Path) -> None:
    """Write the set as an uncompressed `.npz` (loads fast), atomically."""
    extra = {k: v for k, v in (("weight", s.weight), ("mirrored", s.mirrored), ("source", s.source))
             if v is not None}
    with atomic_write(path) as tmp:
        np.savez(tmp, images=s.images, case=s.case, index=s.index, names=np.array(s.names, dtype=str), **extra)


def load_slice_set(path: str | Path) -> SliceSet:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            opt = {k: z[k] for k in ("weight", "mirrored", "source") if k in z.files}
            return SliceSet(z["images"], z["case"], z["index"], [str(n) for n in z["names"]], **opt)
    except FileNotFoundError:
        raise InputError(path, "slice cache not found") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(path, f"not a slice cache ({e})") from None


def split_by_case(s: SliceSet, val_fraction: float, seed: int) -> tuple[SliceSet, SliceSet]:
    """(train, val): a seeded random `val_fraction` of the volumes (at least one) held out whole. With several
    sources, the share is held out of each source that has at least two volumes (so calibration on the held-out
    volumes sees every kind of scan), and at least one volume overall."""
    n = len(s.names)
    if n < 2:
        raise ValueError(f"need at least 2 volumes to hold one out for validation, got {n}")
    source = np.zeros(n, np.int64) if s.source is None else s.source
    rng = np.random.default_rng(seed)
    val_cases = []
    groups = [np.flatnonzero(source == j) for j in np.unique(source)]
    for members in groups:
        if len(groups) == 1 or len(members) >= 2:
            k = min(len(members) - 1, max(1, round(val_fraction * len(members)))) if len(groups) > 1 else \
                min(n - 1, max(1, round(val_fraction * n)))
            val_cases += rng.permutation(members)[:k].tolist()
    if not val_cases:                                    # every source has a single volume: hold out one of them
        val_cases = rng.permutation(n)[:1].tolist()
    is_val = np.isin(s.case, val_cases)
    return _subset(s, ~is_val), _subset(s, is_val)


def _subset(s: SliceSet, keep: np.ndarray) -> SliceSet:
    """The kept slices, with case ids renumbered into the kept volumes' names."""
    used = np.unique(s.case[keep])
    remap = np.full(len(s.names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    pick = lambda a: None if a is None else a[keep]                          # noqa: E731
    return SliceSet(s.images[keep], remap[s.case[keep]], s.index[keep], [s.names[i] for i in used],
                    pick(s.weight), pick(s.mirrored), None if s.source is None else s.source[used])
