"""Overlay pictures of an evaluation: for a few slices per case, the input with the ground-truth outline and each
method's anomaly map with the ground truth (red) and the calibrated binary mask (cyan) outlined."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mimood.contract import atomic_write
from mimood.eval.evaluate import CaseResult, EvalResult
from mimood.eval.tables import PAPER_NAMES


def pick_slices(c: CaseResult, n: int = 3) -> np.ndarray:
    """Indices into the evaluated slices: spread over the lesion slices (the whole case when there are none)."""
    candidates = np.flatnonzero(c.lesion_slices)
    if candidates.size == 0:
        candidates = np.arange(len(c.rows))
    q = np.linspace(0, len(candidates) - 1, n + 2)[1:-1] if len(candidates) > n else np.arange(len(candidates))
    return candidates[np.unique(np.round(q).astype(int))]


def save_overlays(res: EvalResult, out: str | Path, per_case: int = 3) -> list[Path]:
    """One PNG per case under `out` (created); returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for c in res.cases:
        pick = pick_slices(c, per_case)
        cols = 1 + len(res.methods)
        fig, axes = plt.subplots(len(pick), cols, figsize=(2.4 * cols, 2.5 * len(pick)), squeeze=False)
        for row, i in zip(axes, pick):
            lab = c.labels[i]
            row[0].imshow(c.images[i], cmap="gray", vmin=0, vmax=1)
            row[0].set_title(f"slice {c.slices.index[c.rows[i]]}", fontsize=8)
            for ax, m in zip(row[1:], res.methods):
                vmax = float(np.percentile(c.maps[m], 99.9)) or 1.0             # per method: scales differ
                ax.imshow(c.maps[m][i], cmap="magma", vmin=0, vmax=vmax)
                t = res.thresholds.get(m)
                if t is not None and (c.maps[m][i] >= t).any():
                    ax.contour(c.maps[m][i] >= t, levels=[0.5], colors="cyan", linewidths=0.6)
                ax.set_title(PAPER_NAMES.get(m, m), fontsize=8)
            for ax in row:
                if lab.any():
                    ax.contour(lab, levels=[0.5], colors="red", linewidths=0.6)
                ax.axis("off")
        fig.suptitle(f"{c.name}: ground truth red, calibrated mask cyan", fontsize=9)
        fig.tight_layout()
        path = out / f"{c.name}.png"
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
        written.append(path)
    return written
