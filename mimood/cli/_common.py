"""What every command shares: one-line errors instead of tracebacks, and a non-zero exit."""
from __future__ import annotations

import functools
import sys

import click

from mimood.errors import InputError


def friendly_errors(fn):
    """Turn an `InputError` (bad file) or `ValueError` (bad option) into one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (ValueError, FileNotFoundError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper

