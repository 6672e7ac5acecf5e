"""`mimood-data`: demo data, input checks and previews (thin over `mimood.data`).

    mimood-data demo -o DIR                 mimood-data synth -i LABELMAPS -o DIR
    mimood-data check -i INPUT              mimood-data preview -i FILE -o PNG
The old spellings --out and --labelmaps still work in this release (deprecated)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from mimood.cli._common import Group, common, cpu_only, friendly_errors, need, renamed, version_option
from mimood.config import DataConfig
from mimood.data.discover import check_case, discover
from mimood.data.io import atomic_write
from mimood.errors import InputWarning


@click.group(cls=Group, help="Data tools: make the built-in demo data, check a data set, preview what the model "
                              "sees.")
@version_option
def main():
    pass


@main.command(help="Write synthetic demo volumes (from the shipped MNI152 T2 template) under -o/--output.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Output folder.  [required]")
@click.option("--n-train", default=16, show_default=True, type=click.IntRange(min=0),
              help="Healthy training volumes.")
@click.option("--n-test", default=6, show_default=True, type=click.IntRange(min=0),
              help="Test volumes with synthetic lesions (2 healthy test volumes are added).")
@click.option("--seed", default=0, show_default=True, type=int)
@common(cpu=True)
@renamed("--out", "-o/--output", "out", type=click.Path(path_type=Path))
@friendly_errors
def demo(out: Path, n_train: int, n_test: int, seed: int, device: str, quiet: bool):
    from mimood.data.demo import make_demo  # torch/MONAI load only for this command

    cpu_only(device, "mimood-data demo")
    out = need(out, "-o/--output")
    info = make_demo(out, n_train=n_train, n_test_lesion=n_test, seed=seed, progress=not quiet)
    if quiet:
        return
    n_lesions = sum(len(t["lesions"]) for t in info["test"])
    click.echo(f"wrote {len(info['train'])} healthy training volumes to {out / 'train'}")
    click.echo(f"wrote {len(info['test'])} test volumes ({info['n_test_lesion']} with {n_lesions} lesions, "
               f"{info['n_test_healthy']} healthy) to {out / 'test' / 'images'}, labels in {out / 'test' / 'labels'}")
    click.echo(f"described in {out / 'README.txt'} and {out / 'demo.json'} (seed {seed})")


@main.command(help="Write N healthy T2-like volumes synthesised from whole-head label maps (SynthSeg style: "
                    "random per-structure T2 contrast, bias field, noise, blur or thick slices, small deformations; "
                    "skull-stripped) to -o/--output, with synth.json describing every volume.")
@click.option("-i", "--input", "labelmaps", type=click.Path(path_type=Path),
              help="Folder of label maps (FreeSurfer labels; >= 500 extra-cerebral).  [required]")
@click.option("--n", "n", default=40, show_default=True, type=click.IntRange(min=1), help="Volumes to write.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Output folder.  [required]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--select", default=":", show_default=True,
              help="Which of the sorted label maps to use, as a Python slice (e.g. 0:18 for training, 18: for "
                   "held-out subjects).")
@common(cpu=True)
@renamed("--labelmaps", "-i/--input", "labelmaps", type=click.Path(path_type=Path))
@renamed("--out", "-o/--output", "out", type=click.Path(path_type=Path))
@friendly_errors
def synth(labelmaps: Path, n: int, out: Path, seed: int, select: str, device: str, quiet: bool):
    from mimood.data.synth import make_synth

    cpu_only(device, "mimood-data synth")
    labelmaps, out = need(labelmaps, "-i/--input"), need(out, "-o/--output")
    info = make_synth(labelmaps, out, n, seed=seed, select=_slice(select), progress=not quiet)
    if quiet:
        return
    sources = sorted({v["source"] for v in info["volumes"]})
    click.echo(f"wrote {len(info['volumes'])} volumes from {len(sources)} label maps to {out} (seed {seed}); "
               f"parameters in {out / 'synth.json'}")


def _one_input(arg: Path | None, opt: Path | None) -> Path:
    if (arg is None) == (opt is None):
        raise click.UsageError("give the input once: as the argument or as -i/--input")
    return arg or opt


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
@click.argument("input_arg", required=False, type=click.Path(path_type=Path), metavar="[INPUT]")
@click.option("-i", "--input", "input_opt", type=click.Path(path_type=Path), help="Same as INPUT: a folder or a file.")
@click.option("--modality", default="t2", show_default=True, help="Which file of a BraTS-style case to read.")
@click.option("--labels", is_flag=True, help="Every volume must have a label (an evaluation set).")
@click.option("--skull-check/--no-skull-check", default=True, show_default=True,
              help="Report volumes that do not look skull-stripped (background share, non-zero volume, the field "
                   "of view's outer shell; mimood.data.checks).")
@common(cpu=True)
@friendly_errors
def check(input_arg: Path | None, input_opt: Path | None, modality: str, labels: bool, skull_check: bool,
          device: str, quiet: bool):
    cpu_only(device, "mimood-data check")
    input = _one_input(input_arg, input_opt)
    cases = discover(input, modality=modality)
    cfg = DataConfig(modality=modality)
    failed = 0
    for case in tqdm(cases, desc="checking", unit="volume", disable=True if quiet else None):
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
@click.argument("file_arg", required=False, type=click.Path(path_type=Path), metavar="[FILE]")
@click.option("-i", "--input", "file_opt", type=click.Path(path_type=Path), help="Same as FILE: the volume.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="PNG to write.  [required]")
@click.option("--label", type=click.Path(path_type=Path), default=None, help="Label volume to outline.")
@common(cpu=True)
@renamed("--out", "-o/--output", "out", type=click.Path(path_type=Path))
@friendly_errors
def preview(file_arg: Path | None, file_opt: Path | None, out: Path, label: Path | None, device: str, quiet: bool):
    cpu_only(device, "mimood-data preview")
    file, out = _one_input(file_arg, file_opt), need(out, "-o/--output")
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
    if not quiet:
        click.echo(f"wrote {out} ({len(pick)} of {len(s.index)} slices)")


if __name__ == "__main__":
    main()
