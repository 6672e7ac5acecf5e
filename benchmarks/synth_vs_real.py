"""Issue 13's picture: synthetic healthy slices (mimood-data synth) beside real BraTS T2 slices at the same
relative axial levels, both after the preprocessing every model sees (RAS, 1 mm, P98 clip, 160 x 160 window).

    python benchmarks/synth_vs_real.py --synth SYNTH_DIR --real ../shared/data/real/lesion --out PNG
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mimood.config import DataConfig
from mimood.data.discover import discover
from mimood.data.preprocess import preprocess

LEVELS = (0.25, 0.45, 0.6, 0.75)      # share of the brain's axial extent, bottom to top


def level_slices(path: Path, label: Path | None = None):
    s = preprocess(path, DataConfig(), label=label)
    rows = [int(round(q * (len(s.index) - 1))) for q in LEVELS]
    return s.images[rows], None if s.labels is None else s.labels[rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synth", type=Path, required=True)
    p.add_argument("--real", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=3, help="volumes of each kind")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synth = sorted(args.synth.glob("synth_*.nii.gz"))[: args.n]
    real = discover(args.real)[: args.n]
    rows = [(f"synthetic {f.name[6:-7]}", *level_slices(f)) for f in synth]
    rows += [(f"BraTS {c.name[:-3]}", *level_slices(c.image, c.label)) for c in real]
    fig, axes = plt.subplots(len(rows), len(LEVELS), figsize=(2.2 * len(LEVELS), 2.3 * len(rows)), squeeze=False)
    for r, (name, images, labels) in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if labels is not None and labels[c].any():
                ax.contour(labels[c], levels=[0.5], colors="red", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if r == 0:
                ax.set_title(f"{LEVELS[c]:.0%} of brain height", fontsize=8)
    fig.suptitle("after preprocessing (P98 clip, [0,1]); neurological view; red: BraTS tumour outline", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
