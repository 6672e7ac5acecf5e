"""`mimood-bench`: the restoration loop timed on every available backend/precision, side by side in one run,
against the PyTorch eager reference, the AR baseline and the machine's measured peak (see `mimood.bench`).

    mimood-bench [-m RUN] [-o results.json] [--backends ort ...] [--device cpu|cuda]
The old spellings --run RUN and --json FILE still work in this release (deprecated)."""
from __future__ import annotations

from pathlib import Path

import click

from mimood.cli._common import Command, common, friendly_errors, model_option, renamed


@click.command(cls=Command, epilog="Old spellings --run and --json still work in this release (deprecated).")
@model_option(help="Training run folder to time (its checkpoints).  [default: random weights of --preset]")
@click.option("--preset", default="cpu", show_default=True, type=click.Choice(["paper", "cpu", "tiny"]),
              help="Model sizes for random weights when no -m/--model is given (speed does not depend on weights).")
@click.option("--backends", multiple=True,
              help="Only these backends or backend-precision pairs (torch, ort, trt, ort-fp16, ...); repeatable. "
                   "torch fp32 eager, the reference, is always timed.  [default: all available]")
@click.option("-R", "R", type=click.IntRange(min=1), default=None, help="Restorations per slice.  [default: the run's]")
@click.option("-T", "T", type=click.IntRange(min=0), default=None, help="Iterations, all run.  [default: the run's]")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Slices per batch.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed batches per path (after one warm-up); the median is reported.")
@click.option("--ar-positions", type=click.IntRange(min=1, max=400), default=40, show_default=True,
              help="AR reference passes timed (of 400) and scaled.")
@click.option("--no-volume", is_flag=True, help="Skip the end-to-end 155-slice volume timing.")
@click.option("--slices", "slices", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Time the batch on the central slices of this NIfTI scan (e.g. a BraTS case) instead of the "
                   "healthy template: the onnxruntime CPU paths skip settled rows, so their time depends on it.")
@click.option("-o", "--output", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the results as JSON: {machine, settings, results, skipped, ar, ratios} "
                   "(rewritten after each part, so a stopped run keeps what it measured).")
@common
@renamed("--run", "-m/--model", "model", type=click.Path(path_type=Path))
@renamed("--json", "-o/--output", "json_path", type=click.Path(path_type=Path, dir_okay=False))
@friendly_errors
def main(model, preset, backends, R, T, batch, repeats, ar_positions, no_volume, slices, json_path, device, quiet):
    """Seconds per batch of the whole restoration loop (encode, T x (ATD + MVTM step), decode + score) for
    each available backend and precision, slices/s, one volume end to end, FLOP/s against the machine's
    peak, and AR restoration on the same batch. Paths that cannot run here are listed with the reason."""
    from mimood.bench import format_table, run_bench, save_json
    from mimood.runtime.model import require_run

    run = None if model is None else require_run(model, "mimood-bench")
    bench = run_bench(run, preset, list(backends) or None, R=R, T=T, batch=batch, repeats=repeats,
                      ar_positions=ar_positions, volume=not no_volume, slices=slices,
                      device=None if device == "auto" else device,
                      say=(lambda msg: None) if quiet else lambda msg: click.echo(msg, err=True),
                      saved=None if json_path is None else lambda b: save_json(b, json_path))
    click.echo(format_table(bench))
    if json_path is not None:
        save_json(bench, json_path)
        click.echo(f"json: {json_path}")


if __name__ == "__main__":
    main()
