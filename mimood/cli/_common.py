"""What every command shares: one-line errors instead of tracebacks, and a non-zero exit."""
from __future__ import annotations

import functools
import sys

import click

from mimood.errors import EXIT_OUTPUT, EXIT_USAGE, InputError, OutputError


def friendly_errors(fn):
    """Turn an `InputError` (bad file) or `ValueError` (bad option) into one line on stderr and exit 2, and an
    `OutputError` or any other `OSError` (an output folder that is a file, a read-only or full disk) into one
    line and exit 3 (mimood.errors: EXIT_*)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USAGE)
        except (ValueError, FileNotFoundError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USAGE)
        except OutputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_OUTPUT)
        except OSError as e:
            click.echo(f"error: {os_error_line(e)}", err=True)
            sys.exit(EXIT_OUTPUT)

    return wrapper


def os_error_line(e: OSError) -> str:
    """`<file>: <reason>` for an OSError (its str() is "[Errno 28] No space left on device: 'x'")."""
    where = e.filename if e.filename is not None else ""
    return f"{where}: {e.strerror or e}" if where else str(e.strerror or e)
