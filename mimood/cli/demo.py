"""`mimood-demo`: the bundled model on the demo test scans and real scans (the README's first Quickstart command);
`--train`: the whole training path on the demo data instead."""
from __future__ import annotations

import time

import click

from mimood.cli._common import Command, common, cpu_only, friendly_errors, model_option, renamed
from mimood.config import PRESETS


@click.command(cls=Command, epilog="The old spelling --out still works in this release (deprecated).")
@click.option("-o", "--output", "out", default="mimood_demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo data, the maps (and with --train the run and its export).")
@model_option(help="Export folder or run folder to map with (default: the bundled model; not with --train).")
@click.option("--train", is_flag=True, help="Train every model on the demo data first (the training path; "
                                            "about 20 minutes on 2 cores with the cpu preset).")
@click.option("--preset", type=click.Choice(PRESETS), default="cpu", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="With --train: override the preset's training steps (quick try-outs).")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort", "torch"]), default="auto", show_default=True,
              help="Inference backend.")
@common(cpu=True)
@renamed("--out", "-o/--output", "out", type=click.Path(file_okay=False))
@friendly_errors
def main(out, model, train, preset, steps, backend, device, quiet):
    """Map the demo test scans (and real scans from ../shared/data when present) with the bundled model; with
    --train, generate demo data, train every model, export ONNX graphs and find the demo lesions."""
    from mimood.pipeline import run_demo

    cpu_only(device, "mimood-demo")
    if train and model is not None:
        raise click.UsageError("--train trains its own model: leave out -m/--model")
    t0 = time.time()
    result = run_demo(out, model=model, train=train, preset=preset, steps=steps, say=click.echo,
                      progress=not quiet, backend=backend)
    click.echo(f"done in {time.time() - t0:.0f} s; maps, masks and PNG overlays of the demo test scans are in "
               f"{result['folder']}/maps" + (f", of the real scans in {result['folder']}/maps_real"
                                            if result.get("real") else "") + " (index.html and report.csv list them)")


if __name__ == "__main__":
    main()
