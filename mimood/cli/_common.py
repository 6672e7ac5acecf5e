"""What every command shares: one error style, one option vocabulary, old flags kept for one release.

Errors: every problem a user causes is one line on stderr, `error: <what>`, and exit status 2, whether click finds
it (a missing or malformed option: `Command`, `Group`) or mimood does (an `InputError` naming a file, a
`ValueError` naming an option: `friendly_errors`); no traceback. Warnings are `warning: <what>` lines.

The vocabulary (every command):
    -i/--input PATH     what a command reads (scans, training data, labelled test data)
    -o/--output PATH    what it writes (a folder; bench: a JSON file)
    -m/--model PATH     an export folder (manifest.json) or a training run folder (config.json); inference falls
                        back to the bundled model (mimood.runtime.model)
    --device D          auto | cpu | cuda | cuda:N
    --threads N         CPU threads for onnxruntime and torch (default: theirs, all cores)
    -q/--quiet          no progress bars or messages
    -V/--version        the mimood version
Renamed flags (`renamed`) keep working for one release, hidden from --help: `warning: --out is deprecated, use
-o/--output`; the old and the new spelling together is an error.
"""
from __future__ import annotations

import functools
import re
import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from mimood import __version__
from mimood.errors import EXIT_OUTPUT, EXIT_USAGE, InputError, InputWarning, OutputError


# -- one error style ---------------------------------------------------------------------------------------------
def friendly_errors(fn):
    """Turn an `InputError` (bad file) or `ValueError` (bad option) into one line on stderr and exit 2, and an
    `OutputError` or any other `OSError` (an output folder that is a file, a read-only or full disk) into one
    line and exit 3 (mimood.errors: EXIT_*); show mimood's `InputWarning`s as `warning: ...` lines (every one:
    a batch run repeats them per scan)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", InputWarning)
                shown = warnings.showwarning

                def show(message, category, *rest, **kw):
                    if issubclass(category, InputWarning):
                        warn(str(message))
                    else:
                        shown(message, category, *rest, **kw)

                warnings.showwarning = show
                return fn(*args, **kwargs)
        except (InputError, ValueError, FileNotFoundError) as e:
            fail(str(e), EXIT_USAGE)
        except OutputError as e:
            fail(str(e), EXIT_OUTPUT)
        except OSError as e:
            fail(os_error_line(e), EXIT_OUTPUT)

    return wrapper


def os_error_line(e: OSError) -> str:
    """`<file>: <reason>` for an OSError (its str() is "[Errno 28] No space left on device: 'x'")."""
    where = e.filename if e.filename is not None else ""
    return f"{where}: {e.strerror or e}" if where else str(e.strerror or e)


def fail(message: str, code: int = EXIT_USAGE):
    """The one error line, then exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


class _OneStyle:
    """click's own usage errors ("Missing option", "Invalid value", "No such option") in mimood's style: one line
    `error: ...` naming the command's --help, exit 2 (click prints a usage block and `Error: ...`)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            if isinstance(e, click.NoSuchOption) and ctx is not None and e.possibilities:   # never suggest an old
                hidden = {o for p in ctx.command.params if getattr(p, "hidden", False) for o in p.opts}   # spelling
                e.possibilities = [p for p in e.possibilities if p not in hidden]
            hint = f" (see {ctx.command_path} --help)" if isinstance(e, click.UsageError) and ctx else ""
            if not standalone_mode:
                raise
            fail(f"{e.format_message()}{hint}", e.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


class Command(_OneStyle, click.Command):
    pass


class Group(_OneStyle, click.Group):
    command_class = Command


# -- the vocabulary ----------------------------------------------------------------------------------------------
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(ctx, param, value):
    if value is not None and not DEVICE.fullmatch(value):
        raise click.BadParameter(f"{value!r}: expected auto, cpu, cuda or cuda:N", ctx, param)
    return value


def _threads(ctx, param, value):
    if value is not None:
        from mimood.runtime.threads import set_threads
        set_threads(value)
    return value


def version_option(fn):
    return click.version_option(__version__, "-V", "--version", package_name="mimood",
                                message="%(prog)s (mimood) %(version)s")(fn)


def device_option(fn, cpu: bool = False):
    help = ("auto or cpu: this command runs on the CPU (cuda is refused)." if cpu else
            "Where models run: auto (a GPU when there is one), cpu, cuda or cuda:N.")
    return click.option("--device", default="auto", show_default=True, callback=_device, metavar="DEVICE",
                        help=help)(fn)


def threads_option(fn):
    return click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N", callback=_threads,
                        expose_value=False, is_eager=True,
                        help="CPU threads for onnxruntime and torch.  [default: all cores]")(fn)


def quiet_option(fn):
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages.")(fn)


def common(fn=None, *, device: bool = True, quiet: bool = True, cpu: bool = False):
    """--device (cpu: for commands that run on the CPU only, see `cpu_only`), --threads (applied before the
    command runs), -q/--quiet and -V/--version on a command, listed in that order."""
    def deco(f):
        f = version_option(f)
        f = quiet_option(f) if quiet else f
        f = threads_option(f)
        return device_option(f, cpu) if device else f
    return deco(fn) if fn is not None else deco


def cpu_only(device: str, command: str) -> None:
    """For commands that run PyTorch on the CPU only (training, evaluation, export): refuse a GPU device."""
    if device not in ("auto", "cpu"):
        raise click.UsageError(f"--device {device}: {command} runs on the CPU in this version (use --device cpu)")


def model_option(fn=None, *, help: str = "Export folder (manifest.json) or training run folder (config.json; "
                                          "exported first when it has no export).  [default: the bundled model]",
                 **kw):
    def deco(f):
        return click.option("-m", "--model", "model", type=click.Path(path_type=Path), help=help, **kw)(f)
    return deco(fn) if fn is not None else deco


# -- old flags, kept for one release --------------------------------------------------------------------------------
def deprecated(old: str, use: str, dest: str, **option):
    """A hidden option `old` whose value the command receives as `dest` (default None), printing
    `warning: <old> is deprecated, use <use>` when it is given."""
    def deco(fn):
        def note(ctx, param, value):
            if value not in (None, (), False):
                warn(f"{old} is deprecated, use {use} (the old spelling goes in the next release)")
            return value

        return click.option(old, dest, hidden=True, default=None, callback=note, **option)(fn)
    return deco


def renamed(old: str, new: str, param: str, **option):
    """`old` is the previous spelling of option `param` (shown as `new`): a `deprecated` hidden option whose value
    goes to `param`; the old and the new spelling (or two old ones) together is a usage error."""
    dest = f"_old_{param}_{old.strip('-').replace('-', '_')}"

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            value = kwargs.pop(dest)
            if value not in (None, (), False):
                ctx = click.get_current_context()
                taken = ctx.meta.setdefault("mimood.renamed", {})
                given = ctx.get_parameter_source(param) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
                if given or param in taken:
                    raise click.UsageError(f"{old} is the old spelling of {new}: give {taken.get(param, new)} or "
                                           f"{old}, not both", ctx)
                taken[param] = old
                kwargs[param] = value
            return fn(*args, **kwargs)

        return deprecated(old, new, dest, **option)(wrapper)
    return deco


def need(value, flag: str):
    """A required option that has an old spelling (click cannot require it: the old spelling may fill it)."""
    if value in (None, ()):
        raise click.UsageError(f"missing option {flag}", click.get_current_context())
    return value
