"""`mimood-infer INPUT_DIR -o OUT_DIR --export DIR`: anomaly maps for a folder of scans (thin over
`mimood.runtime.infer_folder`, whose docstring describes the outputs, `--continue` and `--part`).

Exit status (mimood.errors): 0 when every scan is done, 1 when some failed (each is a row of the report), 2 for
bad arguments or an unusable input or export folder (nothing done), 3 when the output folder or its disk cannot
take the outputs (a file, read-only, full: nothing done, or the run stopped with its last complete report)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from mimood.cli._common import friendly_errors
from mimood.errors import EXIT_FAILED, EXIT_OK
from mimood.runtime.bundle import BACKENDS, PRECISIONS


def _part(value: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise ValueError(f"--part {value!r}: expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(m[1]), int(m[2])


def _export_folder(run: Path | None, export: Path | None, quiet: bool) -> Path:
    """The export folder: --export, or the run's `<run>/export` (exported first when it has none)."""
    if (run is None) == (export is None):
        raise ValueError("give one of --export DIR (made by mimood-export) or --run DIR (a training run)")
    if export is not None:
        return export
    folder = run / "export"
    if not (folder / "manifest.json").is_file():
        try:
            from mimood.export.export import export_run
        except ImportError as e:             # the runtime-only install
            raise ValueError(f"{run} has no export yet, and exporting needs the export extra ({e}): "
                             "pip install 'mimood[export]', or give --export DIR") from None

        click.echo(f"{run} has no export yet: exporting it to {folder}", err=True)
        export_run(run, progress=not quiet)
    return folder


@click.command(help="Anomaly maps, masks and overlays for every volume under INPUT_DIR, written to OUT_DIR "
                    "with report.csv and provenance.json.")
@click.argument("input_dir", required=False, type=click.Path(path_type=Path))
@click.option("-i", "--input", "input_opt", type=click.Path(path_type=Path), help="Same as INPUT_DIR.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--export", "export", type=click.Path(path_type=Path), help="Export folder (mimood-export).")
@click.option("--run", "run", type=click.Path(path_type=Path),
              help="Training run folder: use <run>/export, exporting it first if needed.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: TensorRT, else torch with CUDA graphs on a GPU, else onnxruntime.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--continue", "resume", is_flag=True, help="Skip scans a previous run finished.")
@click.option("--part", default="1/1", show_default=True,
              help="Process shard I of N (cases i with i %% N == I-1, sorted by path).")
@click.option("--modality", default=None, help="File suffix of BraTS-style folders (default: the export's).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--skull", type=click.Choice(("warn", "refuse", "ignore")), default="warn", show_default=True,
              help="A scan that does not look skull-stripped: map it with a warning, refuse it (a failed row), or "
                   "map it without a word.")
@click.option("--quiet", is_flag=True, help="No progress bars or messages; failures and warnings still print.")
@friendly_errors
def main(input_dir, input_opt, out, export, run, backend, precision, resume, part, modality, seed, skull, quiet):
    from mimood.runtime.infer import infer_folder

    if (input_dir is None) == (input_opt is None):
        raise ValueError("give the input folder once: INPUT_DIR or -i/--input")
    report = infer_folder(input_dir or input_opt, out, _export_folder(run, export, quiet), backend=backend,
                          precision=precision, resume=resume, part=_part(part), progress=not quiet,
                          modality=modality, seed=seed, skull=skull)
    failed = report.failures
    if quiet:                        # the problems only, as a cron job's mail wants them (shown as they came else)
        for r in report.rows:
            if r.status != "ok":
                click.echo(f"failed: {r.error}", err=True)
            elif r.warnings:
                click.echo(f"warning: {r.warnings}", err=True)
    if not quiet or failed:
        click.echo(f"{len(report.rows)} scans: {len(report.rows) - len(failed)} ok, {len(failed)} failed "
                   f"({report.backend}); report {report.path}", err=quiet)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


if __name__ == "__main__":
    main()
