"""`mimood-demo`: the whole pipeline on the built-in demo data (the README's first Quickstart command)."""
from __future__ import annotations

import time

import click

from mimood.cli._common import Command, common, cpu_only, friendly_errors, renamed
from mimood.config import PRESETS


@click.command(cls=Command, epilog="The old spelling --out still works in this release (deprecated).")
@click.option("-o", "--output", "out", default="mimood_demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo data, the run, the export and the maps.")
@click.option("--preset", type=click.Choice(PRESETS), default="cpu", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Override the preset's training steps (quick try-outs).")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort", "torch"]), default="auto", show_default=True,
              help="Inference backend for the demo test scans.")
@common(cpu=True)
@renamed("--out", "-o/--output", "out", type=click.Path(file_okay=False))
@friendly_errors
def main(out, preset, steps, backend, device, quiet):
    """Generate demo data, train every model, export ONNX graphs, find the demo lesions."""
    from mimood.pipeline import run_demo

    cpu_only(device, "mimood-demo")
    t0 = time.time()
    result = run_demo(out, preset=preset, steps=steps, say=click.echo, progress=not quiet, backend=backend)
    click.echo(f"done in {time.time() - t0:.0f} s; maps, masks and PNG overlays of the demo test scans are in "
               f"{result['folder']}/maps (report.csv lists them)")


if __name__ == "__main__":
    main()
