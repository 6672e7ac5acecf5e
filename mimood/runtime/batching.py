"""Fixed-shape batches: slices of one or many scans packed into full batches of B (the last one padded with
empty slices), restored, and the maps scattered back to their scans.

The exported graphs have static shapes, so every call restores exactly B slices. Packing the slices of many
scans into the same batches wastes no work on padding (a folder of 60-slice scans with B = 32 would pad a
third of its batches otherwise) while memory stays bounded by the scans whose slices are in flight.

Sampling noise per slice, not per batch: the uniform noise of slice k of a scan comes from its own generator,
seeded by (seed, k), and each slice's R restorations only ever read their own rows. A row whose mask is empty
stays unchanged from then on (the detector sees the same tokens again), so running more iterations for the
sake of other slices in the batch changes nothing. A scan's map is therefore the same whatever it is packed
with, in whichever part of a sharded folder or resumed run, for any batch size (up to the float rounding of
batched kernels); padding rows get zero noise.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import numpy as np

from mimood.config import RestoreConfig
from mimood.restore import Engine, Restoration, restore, scan_lambda


class SliceNoise:
    """A generator-like object for `restore()`: `random((B*R, N))` -> rows b*R..b*R+R-1 from slice b's stream."""

    def __init__(self, keys: list[int | None], R: int, seed: int):
        self.R = R
        self.streams = [None if k is None else np.random.default_rng([seed, k]) for k in keys]

    def random(self, shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
        BR, N = shape
        out = np.zeros((BR, N), dtype=dtype)                                 # padding rows: zeros
        for b, g in enumerate(self.streams):
            if g is not None:
                out[b * self.R:(b + 1) * self.R] = g.random((self.R, N), dtype=dtype)
        return out


@dataclass
class Batch:
    images: np.ndarray                    # [B, H, W] float32, rows after len(rows) are padding (zeros)
    rows: list[tuple[Hashable, int]]      # (scan key, slice index in that scan) of each filled row
    lams: np.ndarray | None = None        # [B] float32 detector threshold of each row's scan (None: the config's)


class Packer:
    """First in, first out: `add` a scan's slices, take `full()` batches as they fill, `flush()` the rest."""

    def __init__(self, batch: int):
        self.batch = batch
        self.queue: deque[tuple[Hashable, int, np.ndarray, float | None]] = deque()

    def add(self, key: Hashable, images: np.ndarray, lam: float | None = None) -> None:
        """Queue a scan's slices; lam: its own detector threshold (`scan_lambda`), None for the config's."""
        self.queue.extend((key, i, img, lam) for i, img in enumerate(images))

    def full(self) -> Iterator[Batch]:
        while len(self.queue) >= self.batch:
            yield self._take(self.batch)

    def flush(self) -> Iterator[Batch]:
        yield from self.full()
        if self.queue:
            yield self._take(len(self.queue))

    def _take(self, n: int) -> Batch:
        items = [self.queue.popleft() for _ in range(n)]
        images = np.zeros((self.batch,) + items[0][2].shape, dtype=np.float32)   # [B, H, W]
        images[:n] = [img for _, _, img, _ in items]
        lams = None
        if any(lam is not None for *_, lam in items):          # padding rows: inf, nothing is re-sampled there
            lams = np.full(self.batch, np.inf, dtype=np.float32)
            lams[:n] = [np.nan if lam is None else lam for *_, lam in items]
        return Batch(images, [(key, i) for key, i, _, _ in items], lams)


def restore_batch(engine: Engine, batch: Batch, cfg: RestoreConfig, seed: int) -> Restoration:
    """Restore one full batch (padding rows included) with per-slice noise."""
    keys = [i for _, i in batch.rows] + [None] * (len(batch.images) - len(batch.rows))
    lams = None if batch.lams is None else np.where(np.isnan(batch.lams), cfg.lam, batch.lams)
    return restore(engine, batch.images[:, None], cfg, rng=SliceNoise(keys, engine.R, seed), lam=lams,
                   filled=len(batch.rows))


def run_batch(engine: Engine, batch: Batch, cfg: RestoreConfig, seed: int) -> np.ndarray:
    """Restore one full batch; returns the maps of its filled rows [len(rows), H, W]."""
    return restore_batch(engine, batch, cfg, seed).maps[: len(batch.rows)]


def infer_slices(engine: Engine, images: np.ndarray, cfg: RestoreConfig, seed: int = 0,
                 scan: np.ndarray | None = None) -> np.ndarray:
    """Anomaly maps [S, H, W] of the slices images [S, H, W] of one scan (float32 in [0, 1], background 0), in
    batches of `engine.batch`. With the per-scan rule the scan's lambda comes from all its slices `scan`
    (default: images; give it when images are a subset, e.g. every k-th slice)."""
    images = np.asarray(images, dtype=np.float32)
    maps = np.zeros(images.shape, dtype=np.float32)
    packer = Packer(engine.batch)
    packer.add(0, images, None if cfg.lam_scan_percentile is None
               else scan_lambda(images if scan is None else scan, cfg))                            # one scan
    for batch in packer.flush():
        maps[[i for _, i in batch.rows]] = run_batch(engine, batch, cfg, seed)
    return maps
