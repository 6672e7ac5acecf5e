"""`mimood-eval`: calibrate a run on its healthy hold-out, then compare MIM-OOD with the baselines on labelled scans.

    mimood-eval --run DIR --data DIR [--modality t2] [--json FILE] [--png DIR] [-R 4] [-T 8] [--lam 0.005]
                [--methods mimood,ar,mvtm_likelihood,token_critic,intensity] [--max-cases N] [--slice-stride K]
                [--seed 0]
    mimood-eval --run DIR --calibrate [--lam-percentile 90 | --paper-lam] [--slice-stride K]
                                                                 (re)write DIR/calibration.json only
    mimood-eval --run DIR --train-critic                         train the Token Critic baseline (then calibrate)
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from mimood.cli._common import friendly_errors
from mimood.config import LAM_PERCENTILE
from mimood.data.io import atomic_write


def _methods(value: str | None) -> tuple[str, ...] | None:
    from mimood.eval.methods import METHODS
    if value is None:
        return None
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or 'none given'}: choose from {', '.join(METHODS)}")
    return names


@click.command()
@click.option("--run", "run", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Trained run folder.")
@click.option("--data", "data", type=click.Path(exists=True, path_type=Path),
              help="Labelled test scans (images/ + labels/, BraTS-style, or volumes with *_seg beside them).")
@click.option("--modality", default="t2", show_default=True, help="File suffix of BraTS-style folders.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the tables as JSON.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write overlay pictures (a few slices per case) into this folder.")
@click.option("-R", "R", type=click.IntRange(min=1), help="Restorations per slice (default: the run's config).")
@click.option("-T", "T", type=click.IntRange(min=1), help="Restoration iterations (default: the run's config).")
@click.option("--lam", type=float, help="MIM-OOD's ATD threshold lambda (default: calibration.json).")
@click.option("--seed", type=int, help="Sampling seed (default: the run's config).")
@click.option("--methods", "methods", callback=lambda ctx, p, v: _methods(v),
              help="Comma-separated subset of mimood,ar,mvtm_likelihood,token_critic,intensity (default: all the "
                   "run has; token_critic needs --train-critic once).")
@click.option("--max-cases", type=click.IntRange(min=1), help="Evaluate only the first N cases.")
@click.option("--slice-stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Evaluate (and, when calibrating, restore the hold-out at) every K-th slice; stated in the output.")
@click.option("--calibrate", "recalibrate", is_flag=True,
              help="(Re)calibrate on the run's healthy hold-out first; alone (no --data) it only calibrates.")
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
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def main(run, data, modality, json_path, png_dir, R, T, lam, seed, methods, max_cases, slice_stride, recalibrate,
         lam_percentile, paper_lam, voxel_percentile, train_critic, no_ood, quiet):
    """Evaluate MIM-OOD and its baselines (AR restoration, MVTM likelihood, MVTM + Token Critic, intensity) on
    labelled scans: token- and pixel-level tables as in the paper, per-case Dice, inference time. Pixel metrics are
    inside the brain. The thresholds come from RUN/calibration.json (made first if missing)."""
    from mimood.config import RunConfig
    from mimood.eval.calibrate import CALIBRATION, calibrate, load_calibration
    from mimood.eval.evaluate import evaluate
    from mimood.eval.methods import available_methods
    from mimood.eval.tables import TABLES, format_table, to_json

    if data is None and not (recalibrate or train_critic):
        raise click.UsageError("give --data (scans to evaluate), --calibrate or --train-critic")
    if train_critic:
        from mimood.eval.token_critic import train_token_critic
        result = train_token_critic(run, progress=not quiet)
        click.echo(f"trained {run / 'critic'}: {result.steps} steps in {result.seconds:.0f} s, val {result.last_val}")
        recalibrate = True                                    # the critic needs its threshold
    run_cfg = RunConfig.load(run / "config.json").restore
    cal = load_calibration(run)
    uncalibrated = [m for m in (methods or available_methods(run)) if cal and m not in cal.get("methods", {})]
    if recalibrate or cal is None or (data is not None and uncalibrated):
        if cal is None and not recalibrate:
            click.echo(f"{run} has no {CALIBRATION}: calibrating on its healthy hold-out first", err=True)
        elif not recalibrate:        # e.g. mimood-demo calibrates MIM-OOD only: add the baselines' thresholds
            click.echo(f"{run / CALIBRATION} has no thresholds for {', '.join(uncalibrated)}: recalibrating",
                       err=True)
        # the --methods given (default: every method the run has), with the run's own loop settings
        # (-R/-T/--lam/--seed are evaluation options);
        # --slice-stride also thins the hold-out slices restored for the voxel thresholds
        cal = calibrate(run, run_cfg, methods, lam_percentile=None if paper_lam else lam_percentile,
                        voxel_percentile=voxel_percentile, slice_stride=slice_stride, progress=not quiet)
        click.echo(f"wrote {run / CALIBRATION}: " + ", ".join(
            f"{m} lam={v['lam']:.4g} thr={v['threshold']:.4g}" if "lam" in v else f"{m} thr={v['threshold']:.4g}"
            for m, v in cal["methods"].items()))
    if data is None:
        return
    overrides = {k: v for k, v in (("R", R), ("T", T), ("seed", seed)) if v is not None}
    res = evaluate(run, data, replace(run_cfg, **overrides), methods, lam=lam, modality=modality, max_cases=max_cases,
                   slice_stride=slice_stride, progress=not quiet)
    s = res.settings
    for path in s["skipped_unlabelled"]:
        click.echo(f"skipped {path}: no label", err=True)
    lams = ", ".join(f"{m}={v:.4g}" for m, v in s["lams"].items())
    click.echo(f"{s['cases']} cases, {s['slices']} slices (stride {s['slice_stride']}), R={s['R']} T={s['T']} "
               f"seed={s['seed']}" + (f", token thresholds {lams}" if lams else ""))
    if lam is not None or (s["calibration"]["R"], s["calibration"]["T"]) != (s["R"], s["T"]):
        click.echo(f"note: calibrated thresholds were chosen with R={s['calibration']['R']} "
                   f"T={s['calibration']['T']} lam={s['calibration']['lam']:.4g}")
    tables = [fn(res) for fn in TABLES]
    for t in tables:
        click.echo("\n" + format_table(t))
    result = to_json(res, tables)
    if not no_ood and (run / "ood.safetensors").exists():
        # MOODv2 scores on MVTM features: scan.<score>, slice.<score> and token.<score> beside the methods' rows
        from mimood.eval.ood import eval_tables
        ood, text = eval_tables(run, data, modality, max_cases, slice_stride, progress=not quiet)
        click.echo("\n" + text)
        result["scan"], result["slice"] = ood["scan"], ood["slice"]
        result.setdefault("token", {}).update(ood["token"])
        result["ood"] = {k: ood[k] for k in ("counts", "aggregation", "scan_score")}
    elif not no_ood:
        click.echo(f"\n(no scan-level OOD table: {run} has no ood.safetensors; run `mimood-train ood --run {run}`)")
    if json_path is not None:
        with atomic_write(json_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"\nwrote {json_path}")
    if png_dir is not None:
        from mimood.eval.pictures import save_overlays
        paths = save_overlays(res, png_dir)
        click.echo(f"wrote {len(paths)} pictures to {png_dir}")


if __name__ == "__main__":
    main()
