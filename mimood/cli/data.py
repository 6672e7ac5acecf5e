"""`mimood-data`: demo data, input checks and previews (thin over `mimood.data`)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from mimood.cli._common import friendly_errors
from mimood.config import DataConfig
from mimood.data.discover import check_case, discover
from mimood.data.io import atomic_write
from mimood.errors import InputWarning


@click.group(help="Data tools: make the built-in demo data, check a data set, preview what the model sees.")
def main():
    pass


@main.command(help="Write synthetic demo volumes (from the shipped MNI152 T2 template) under --out.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="output folder")
@click.option("--n-train", default=16, show_default=True, type=click.IntRange(min=0),
              help="healthy training volumes")
@click.option("--n-test", default=6, show_default=True, type=click.IntRange(min=0),
              help="test volumes with synthetic lesions (2 healthy test volumes are added)")
@click.option("--seed", default=0, show_default=True, type=int)
@friendly_errors
def demo(out: Path, n_train: int, n_test: int, seed: int):
    from mimood.data.demo import make_demo  # torch/MONAI load only for this command

    info = make_demo(out, n_train=n_train, n_test_lesion=n_test, seed=seed, progress=True)
    n_lesions = sum(len(t["lesions"]) for t in info["test"])
    click.echo(f"wrote {len(info['train'])} healthy training volumes to {out / 'train'}")
    click.echo(f"wrote {len(info['test'])} test volumes ({info['n_test_lesion']} with {n_lesions} lesions, "
               f"{info['n_test_healthy']} healthy) to {out / 'test' / 'images'}, labels in {out / 'test' / 'labels'}")
    click.echo(f"described in {out / 'README.txt'} and {out / 'demo.json'} (seed {seed})")


@main.command(help="Write N healthy T2-like volumes synthesised from whole-head label maps (SynthSeg style: "
                    "random per-structure T2 contrast, bias field, noise, blur or thick slices, small deformations; "
                    "skull-stripped) to --out, with synth.json describing every volume.")
@click.option("--labelmaps", required=True, type=click.Path(path_type=Path),
              help="folder of label maps (FreeSurfer labels; >= 500 extra-cerebral)")
@click.option("--n", "n", default=40, show_default=True, type=click.IntRange(min=1), help="volumes to write")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="output folder")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--select", default=":", show_default=True,
              help="which of the sorted label maps to use, as a Python slice (e.g. 0:18 for training, 18: for "
                   "held-out subjects)")
@friendly_errors
def synth(labelmaps: Path, n: int, out: Path, seed: int, select: str):
    from mimood.data.synth import make_synth

    info = make_synth(labelmaps, out, n, seed=seed, select=_slice(select), progress=True)
    sources = sorted({v["source"] for v in info["volumes"]})
    click.echo(f"wrote {len(info['volumes'])} volumes from {len(sources)} label maps to {out} (seed {seed}); "
               f"parameters in {out / 'synth.json'}")


def _slice(text: str) -> slice:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return slice(*(int(p) if p.strip() else None for p in parts))
    except ValueError:
        raise ValueError(f"--select {text!r}: expected START:STOP, e.g. 0:18") from None


@main.command(help="Check every volume (and label) under INPUT: one line per problem, exit 1 if any; warnings "
                    "about usable files are printed as 'warning: ...' lines.")
@click.argument("input", type=click.Path(path_type=Path))
@click.option("--modality", default="t2", show_default=True, help="which file of a BraTS-style case to read")
@click.option("--labels", is_flag=True, help="every volume must have a label (an evaluation set)")
@click.option("--skull-check/--no-skull-check", default=True, show_default=True,
              help="report volumes that do not look skull-stripped (background share, non-zero volume, the field "
                   "of view's outer shell; mimood.data.checks)")
@friendly_errors
def check(input: Path, modality: str, labels: bool, skull_check: bool):
    cases = discover(input, modality=modality)
    cfg = DataConfig(modality=modality)
    failed = 0
    for case in tqdm(cases, desc="checking", unit="volume", disable=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InputWarning)
            problems = check_case(case, cfg, require_label=labels, skull=skull_check)
        failed += bool(problems)
        for p in problems:
            tqdm.write(p)
        for w in caught:                  # a refused file's warnings (header repairs) would only repeat it
            if not issubclass(w.category, InputWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            elif not problems:
                tqdm.write(f"warning: {w.message}")
    n_labels = sum(c.label is not None for c in cases)
    click.echo(f"checked {len(cases)} volumes ({n_labels} with labels): {len(cases) - failed} ok, {failed} failed")
    sys.exit(1 if failed else 0)


@main.command(help="PNG of a few axial slices of FILE after preprocessing, with the label's outline if given.")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write")
@click.option("--label", type=click.Path(path_type=Path), default=None, help="label volume to outline")
@friendly_errors
def preview(file: Path, out: Path, label: Path | None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimood.data.preprocess import preprocess

    s = preprocess(file, DataConfig(), label=label)
    candidates = np.arange(len(s.index))
    if s.labels is not None and s.labels.any():
        candidates = np.flatnonzero(s.labels.any(axis=(1, 2)))    # show the lesion where there is one
    pick = candidates[np.unique(np.linspace(0, len(candidates) - 1, min(6, len(candidates))).round().astype(int))]
    fig, axes = plt.subplots(1, len(pick), figsize=(2.6 * len(pick), 3.0), squeeze=False)
    for ax, i in zip(axes[0], pick):
        ax.imshow(s.images[i], cmap="gray", vmin=0, vmax=1)
        if s.labels is not None and s.labels[i].any():
            ax.contour(s.labels[i], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"slice {s.index[i]}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{file.name}: {len(s.index)} slices of {s.images.shape[1]} x {s.images.shape[2]}, "
                 "neurological view (patient left on the left)", fontsize=9)
    fig.tight_layout()
    with atomic_write(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    click.echo(f"wrote {out} ({len(pick)} of {len(s.index)} slices)")


if __name__ == "__main__":
    main()
