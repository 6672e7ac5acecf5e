"""`mimood-export -m RUN [-o EXPORT]`: a run folder -> ONNX graphs (+ fp16 copies, TensorRT engines) and their
manifest. The old spellings --run RUN and --out EXPORT still work in this release (deprecated)."""
from __future__ import annotations

from pathlib import Path

import click

from mimood.cli._common import Command, common, cpu_only, fail, friendly_errors, model_option, renamed
from mimood.config import DETECTORS


def _summary(check: dict) -> str:
    """One check record of the manifest in a few words: ids as the share that differs, floats as max |err|."""
    verdict = "" if check["passed"] else "FAIL "
    if check.get("problem"):
        return f"{verdict}{check['name']}: {check['problem']}"
    if check["atol"] == 0 and check["rtol"] == 0:
        return (f"{verdict}{check['name']} {check['mismatch_share']:.2%} differ "
                f"(<= {check['max_mismatch_share']:.2%})")
    return f"{verdict}{check['name']} |err| {check['max_abs_err']:.2g} (<= {check['atol']:g})"


@click.command(cls=Command, epilog="Old spellings --run and --out still work in this release (deprecated).")
@model_option(help="Training run folder (config.json, <model>/best.safetensors, data/val_slices.npz).  "
                   "[default: runs/default]")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Export folder (replaced whole when complete).  [default: <run>/export]")
@click.option("--fp16", is_flag=True, help="Also write half-precision graphs (LayerNorm, softmax, sampling, "
                                           "VQ search and the residual stay fp32).")
@click.option("--int8", is_flag=True, help="Also write int8 copies of the ATD and MVTM step for --backend ort "
                                           "--precision int8, used only where their maps pass the map check.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Slices per fixed-shape batch.")
@click.option("-R", "R", type=click.IntRange(min=1), default=None,
              help="Restorations per slice.  [default: the run's]")
@click.option("-T", "T", type=click.IntRange(min=0), default=None,
              help="Restoration iterations.  [default: the run's]")
@click.option("--lam", type=float, default=None,
              help="Detector threshold lambda.  [default: <run>/calibration.json's, else the run's]")
@click.option("--detector", type=click.Choice(DETECTORS), default=None,
              help="What picks the tokens to re-sample: the ATD (the paper), or each token's mean input "
                   "intensity (needs the run calibrated with mimood_intensity).  [default: the run's]")
@click.option("--no-validate", "no_validate", is_flag=True,
              help="Skip the onnxruntime-vs-PyTorch checks (they take seconds).")
@common(cpu=True)
@renamed("--run", "-m/--model", "model", type=click.Path(path_type=Path))
@renamed("--out", "-o/--output", "out", type=click.Path(path_type=Path))
@friendly_errors
def main(model, out, fp16, int8, batch, R, T, lam, detector, no_validate, device, quiet):
    """Export the run's VQ-VAE, ATD and MVTM as the four graphs of the restoration loop, check each
    against PyTorch on held-out slices, and write the manifest inference reads."""
    from mimood.export.export import ValidationError, export_run
    from mimood.runtime.model import require_run

    cpu_only(device, "mimood-export")
    run = require_run(model if model is not None else Path("runs/default"), "mimood-export")
    try:
        m = export_run(run, out=out, batch=batch, fp16=fp16, R=R, T=T, lam=lam, validate=not no_validate,
                       progress=not quiet, int8=int8, detector=detector)
    except ValidationError as e:
        fail(f"{e} (nothing written)", 1)
    out = run / "export" if out is None else out
    click.echo(f"graphs for batch {m.batch} x R {m.R} (T {m.T}, detector {m.detector}, lambda {m.lam:g}):")
    for key, g in m.graphs.items():
        checks = m.validation.get(key)
        status = "; ".join(_summary(c) for c in checks) if checks else "not validated"
        click.echo(f"  {g['file']:<22} {g['precision']}  {status}")
    click.echo(m.extra.engines or "TensorRT engines: not built")
    click.echo(f"manifest: {out / 'manifest.json'}")
    ort_graphs = m.extra.ort_graphs
    if ort_graphs:
        click.echo("onnxruntime-only copies (attention fused; --backend ort runs them on the CPU at fp32):")
    for name, g in ort_graphs.items():
        checks = m.validation.get(f"{name}.ort")
        status = "; ".join(_summary(c) for c in checks) if checks else "not validated"
        click.echo(f"  {g.file:<22} {g.precision}  {status}")
    if m.extra.int8:
        click.echo("int8 copies (--backend ort --precision int8):")
    for name, g in m.extra.int8.items():
        checks = m.validation.get(f"{name}.int8")
        status = "; ".join(_summary(c) for c in checks) if checks else "not validated"
        used = {True: "used", False: f"NOT used: {g.reason}", None: "used (not checked)"}[g.accepted]
        click.echo(f"  {g.file:<22} {g.precision}  {status}; {used}")


if __name__ == "__main__":
    main()
