"""`mimood-infer -i INPUT -o OUTPUT [-m MODEL]`: anomaly maps for a folder of scans (thin over
`mimood.runtime.infer_folder`, whose docstring describes the outputs, `--continue` and `--part`;
mimood.runtime.writer the two output formats).

Exit status (mimood.errors): 0 when every scan is done, 1 when some failed (each is a row of the report) or the
MOOD check found a problem, 2 for bad arguments or an unusable input or model folder (nothing done), 3 when the
output folder or its disk cannot take the outputs (a file, read-only, full: nothing done, or the run stopped with
its last complete report)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from mimood.cli._common import Command, common, friendly_errors, model_option, need, renamed
from mimood.errors import EXIT_FAILED, EXIT_OK, InputError
from mimood.runtime.bundle import BACKENDS, PRECISIONS
from mimood.runtime.components import MIN_COMPONENT_ML

FORMATS = ("files", "mood")           # = mimood.runtime.writer.FORMATS (not imported here: --help stays light)


def _part(value: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise ValueError(f"--part {value!r}: expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(m[1]), int(m[2])


def _export_folder(model: Path | None, quiet: bool) -> Path:
    """The export folder -m/--model names (mimood.runtime.model), a run's exported first when it has none."""
    from mimood.runtime.model import resolve_model

    choice = resolve_model(model, say=None if quiet else lambda msg: click.echo(msg, err=True))
    if choice.needs_export:
        try:
            from mimood.export.export import export_run
        except ImportError as e:             # the runtime-only install
            raise ValueError(f"{choice.run} has no export yet, and exporting needs the export extra ({e}): "
                             "pip install 'mimood[export]', or give -m EXPORT_FOLDER") from None

        if not quiet:
            click.echo(f"{choice.run} has no export yet: exporting it to {choice.export}", err=True)
        export_run(choice.run, progress=not quiet)
    return choice.export


@click.command(cls=Command, help="Anomaly maps, masks, overlays and index.html for every volume under INPUT, written "
                                 "to OUTPUT with report.csv (its columns and units in report.columns.json) and "
                                 "provenance.json; --format mood writes the MOOD challenge's folder instead.",
               epilog="Old spellings --out, --export DIR and --run DIR still work in this release (deprecated).")
@click.argument("input_dir", required=False, type=click.Path(path_type=Path), metavar="[INPUT]")
@click.option("-i", "--input", "input_opt", type=click.Path(path_type=Path),
              help="Scans: a folder (searched recursively) or one file; same as INPUT.")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), help="Output folder.  [required]")
@model_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="files", show_default=True,
              help="files: maps, masks, PNGs, report, index.html; mood: only <name>.nii.gz maps in [0, 1] and "
                   "<name>.nii.gz.txt scan scores (the MOOD challenge's convention).")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="With --format mood: write the report, provenance, overlays and index.html here.")
@click.option("--min-component-ml", type=click.FloatRange(min=0), default=MIN_COMPONENT_ML, show_default=True,
              help="Drop flagged components smaller than this from the mask and the statistics (0 keeps all).")
@click.option("--neurological", is_flag=True,
              help="Overlays in the neurological view (patient's left on image left); default radiological.")
@click.option("--no-viewer", is_flag=True, help="No interactive viewer data for index.html (saves re-reading "
                                                "each scan and ~2-3 MB per scan).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: TensorRT, else torch with CUDA graphs on a GPU, else onnxruntime.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--continue", "resume", is_flag=True, help="Skip scans a previous run finished.")
@click.option("--part", default="1/1", show_default=True,
              help="Process shard I of N (cases i with i % N == I-1, sorted by path).")
@click.option("--modality", default=None, help="File suffix of BraTS-style folders (default: the export's).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--skull", type=click.Choice(("warn", "refuse", "ignore")), default="warn", show_default=True,
              help="A scan that does not look skull-stripped: map it with a warning, refuse it (a failed row), or "
                   "map it without a word.")
@common
@renamed("--out", "-o/--output", "output", type=click.Path(path_type=Path))
@renamed("--export", "-m/--model", "model", type=click.Path(path_type=Path))
@renamed("--run", "-m/--model", "model", type=click.Path(path_type=Path))
@friendly_errors
def main(input_dir, input_opt, output, model, fmt, report_dir, min_component_ml, neurological, no_viewer, backend,
         precision, resume, part, modality, seed, skull, device, quiet):
    from mimood.runtime.infer import infer_folder

    if (input_dir is None) == (input_opt is None):
        raise ValueError("give the input once: INPUT or -i/--input")
    need(output, "-o/--output")
    if report_dir is not None and fmt != "mood":
        raise ValueError("--report DIR goes with --format mood (the files format writes its report into -o)")
    source = input_dir or input_opt
    if not source.exists():
        raise InputError(source, "no such file or folder")
    report = infer_folder(source, output, _export_folder(model, quiet), backend=backend, precision=precision,
                          resume=resume, part=_part(part), progress=not quiet, modality=modality, seed=seed,
                          skull=skull, fmt=fmt, report_dir=report_dir, min_component_ml=min_component_ml,
                          radiological=not neurological, viewer=not no_viewer,
                          device=None if device == "auto" else device)
    failed = report.failures
    if quiet:                        # the problems only, as a cron job's mail wants them (shown as they came else)
        for r in report.rows:
            if r.status != "ok":
                click.echo(f"failed: {r.error}", err=True)
            elif r.warnings:
                click.echo(f"warning: {r.warnings}", err=True)
    if not quiet or failed:
        where = f"report {report.path}" if report.path is not None else f"MOOD folder {output}"
        click.echo(f"{len(report.rows)} scans: {len(report.rows) - len(failed)} ok, {len(failed)} failed "
                   f"({report.backend}); {where}", err=quiet)
    if report.problems:
        click.echo(f"MOOD check: {len(report.problems)} problems (listed above)", err=True)
    sys.exit(EXIT_FAILED if failed or report.problems else EXIT_OK)


if __name__ == "__main__":
    main()
