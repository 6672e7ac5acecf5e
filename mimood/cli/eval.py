"""`mimood-eval`: calibrate a run on its healthy hold-out, then compare MIM-OOD with the baselines on labelled scans
(thin over `mimood.eval.report.evaluate_run`).

    mimood-eval -m RUN -i DATA [-o OUT] [--modality t2] [-R 4] [-T 8] [--lam 0.005]
                [--methods mimood,ar,mvtm_likelihood,token_critic,intensity] [--max-cases N] [--slice-stride K]
                [--seed 0]                            OUT/eval.json (the tables) and OUT/png/ (overlay pictures)
    mimood-eval -m RUN --calibrate [--lam-percentile 90 | --paper-lam] [--slice-stride K]
                                                      (re)write RUN/calibration.json only
    mimood-eval -m RUN --train-critic                 train the Token Critic baseline (then calibrate)

The old spellings --run RUN, --data DATA, --json FILE and --png DIR still work in this release (deprecated).
"""
from __future__ import annotations

from pathlib import Path

import click

from mimood.cli._common import Command, common, cpu_only, deprecated, friendly_errors, model_option, need, renamed
from mimood.config import LAM_PERCENTILE


def _methods(value: str | None) -> tuple[str, ...] | None:
    from mimood.eval.methods import METHODS
    if value is None:
        return None
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or 'none given'}: choose from {', '.join(METHODS)}")
    return names


@click.command(cls=Command, epilog="Old spellings --run, --data, --json FILE and --png DIR still work in this "
                                   "release (deprecated).")
@model_option(help="Trained run folder (config.json, checkpoints).  [required]")
@click.option("-i", "--input", "data", type=click.Path(exists=True, path_type=Path),
              help="Labelled test scans (images/ + labels/, BraTS-style, or volumes with *_seg beside them).")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for eval.json (the tables) and png/ (overlay pictures, a few slices per case).")
@click.option("--modality", default="t2", show_default=True, help="File suffix of BraTS-style folders.")
@click.option("-R", "R", type=click.IntRange(min=1), help="Restorations per slice (default: the run's config).")
@click.option("-T", "T", type=click.IntRange(min=0), help="Restoration iterations (default: the run's config).")
@click.option("--lam", type=float, help="MIM-OOD's ATD threshold lambda (default: calibration.json).")
@click.option("--seed", type=int, help="Sampling seed (default: the run's config).")
@click.option("--methods", "methods", callback=lambda ctx, p, v: _methods(v),
              help="Comma-separated subset of mimood,ar,mvtm_likelihood,token_critic,intensity (default: all the "
                   "run has; token_critic needs --train-critic once).")
@click.option("--max-cases", type=click.IntRange(min=1), help="Evaluate only the first N cases.")
@click.option("--slice-stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Evaluate (and, when calibrating, restore the hold-out at) every K-th slice; stated in the output.")
@click.option("--calibrate", "recalibrate", is_flag=True,
              help="(Re)calibrate on the run's healthy hold-out first; alone (no -i) it only calibrates.")
@click.option("--lam-percentile", default=LAM_PERCENTILE, show_default=True,
              type=click.FloatRange(0, 100, min_open=True, max_open=True),
              help="Calibration: lambda = this percentile of the ATD scores of healthy hold-out brain tokens.")
@click.option("--paper-lam", is_flag=True,
              help="Calibration: keep the configured lambda (the paper's 0.005) instead of the percentile rule.")
@click.option("--voxel-percentile", default=99.0, show_default=True,
              type=click.FloatRange(0, 100, min_open=True, max_open=True),
              help="Calibration: binary threshold = this percentile of healthy brain-voxel anomaly scores.")
@click.option("--train-critic", is_flag=True,
              help="Train the MVTM + Token Critic baseline's critic into RUN/critic first (an ATD-sized training).")
@click.option("--no-ood", is_flag=True,
              help="Skip the scan/slice-level OOD table (made when RUN/ood.safetensors exists: mimood-train ood).")
@common(cpu=True)
@renamed("--run", "-m/--model", "model", type=click.Path(path_type=Path))
@renamed("--data", "-i/--input", "data", type=click.Path(exists=True, path_type=Path))
@deprecated("--json", "-o/--output DIR (it writes DIR/eval.json)", "json_path",
            type=click.Path(dir_okay=False, path_type=Path))
@deprecated("--png", "-o/--output DIR (it writes DIR/png/)", "png_dir", type=click.Path(file_okay=False, path_type=Path))
@friendly_errors
def main(model, data, output, modality, R, T, lam, seed, methods, max_cases, slice_stride, recalibrate,
         lam_percentile, paper_lam, voxel_percentile, train_critic, no_ood, device, quiet, json_path, png_dir):
    """Evaluate MIM-OOD and its baselines (AR restoration, MVTM likelihood, MVTM + Token Critic, intensity) on
    labelled scans: token- and pixel-level tables as in the paper, per-case Dice, inference time. Pixel metrics are
    inside the brain. The thresholds come from RUN/calibration.json (made first if missing)."""
    from mimood.eval.report import evaluate_run
    from mimood.runtime.model import require_run

    cpu_only(device, "mimood-eval")
    run = require_run(need(model, "-m/--model"), "mimood-eval")
    if data is None and not (recalibrate or train_critic):
        raise click.UsageError("give -i/--input (scans to evaluate), --calibrate or --train-critic")
    if output is not None and (json_path is not None or png_dir is not None):
        raise click.UsageError("give -o/--output or the old --json/--png, not both")
    if output is not None:
        json_path, png_dir = output / "eval.json", output / "png"
    evaluate_run(run, data, modality=modality, json_path=json_path, png_dir=png_dir, R=R, T=T, lam=lam, seed=seed,
                 methods=methods, max_cases=max_cases, slice_stride=slice_stride, recalibrate=recalibrate,
                 lam_percentile=None if paper_lam else lam_percentile, voxel_percentile=voxel_percentile,
                 train_critic=train_critic, ood=not no_ood, progress=not quiet, say=click.echo,
                 note=lambda msg: click.echo(msg, err=True))


if __name__ == "__main__":
    main()
