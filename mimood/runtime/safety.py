"""What keeps one bad scan, a full disk or a killed run from spoiling a folder run (issue 15); `InferJob` calls it.

- `check_out` (before anything is read) and `prepare_out` (before anything is written): an output folder that
  is a file, lies on a read-only file system or cannot be created is one `OutputError` line, exit 3; at every
  start the temporaries a killed run left there are swept (`mimood.contract.sweep_temporaries`: only names
  of the one writer, of dead processes on this machine).
- `check_unique_outputs`: no two cases, and no case and the run's own files, write the same file, compared
  ignoring case (discovery names them so; this refuses before anything is written if it ever did not).
- `read_scan`: load -> skull-strip check (`--skull warn|refuse|ignore`) -> preprocess, with the reader's
  `InputWarning`s collected per scan (one line each, and the report's `warnings` column) instead of Python's
  two-line warning display.
- `ErrorLog.describe`: the report row's one-line error for anything raised while handling one scan. An
  `InputError` is its message; an unexpected exception (a bug, a `MemoryError`) becomes "unexpected <type>:
  <message>", its traceback appended to `errors.log` in the output folder, never on the screen. An `OSError`
  that means the disk cannot take outputs at all (`DISK_ERRNOS`: full, quota, read-only, I/O error) is the
  scan's row too, and then stops the run (`stop_for_disk`): every later scan would fail the same way.
- `writing`: the job's own files (report, provenance) that cannot be written are an `OutputError`; the report
  is written atomically, so the last complete one stays.
"""
from __future__ import annotations

import errno
import os
import traceback
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from mimood.config import DataConfig
from mimood.contract import sweep_temporaries
from mimood.data.checks import check_skull_stripped
from mimood.data.io import load_volume
from mimood.data.preprocess import Slices, preprocess
from mimood.errors import InputError, InputWarning, OutputError

SKULL_MODES = ("warn", "refuse", "ignore")
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}   # the output disk, not one file


def check_out(out: Path) -> None:
    """Refuse an output folder that cannot be one, before any scan is read: an existing file, a path below a
    file, a folder (or the nearest existing parent of a new one) that is read-only or not writable."""
    if out.exists() and not out.is_dir():
        raise OutputError(out, "is a file, not a folder (choose another output folder)")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise OutputError(out, f"cannot be created: {existing} is a file")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(out, f"cannot write into {existing} ({_why_not_writable(existing)})")


def _why_not_writable(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def prepare_out(out: Path) -> list[Path]:
    """Create the output folder and sweep the stale temporaries of killed runs; returns those removed."""
    with writing(out, "create the output folder"):
        out.mkdir(parents=True, exist_ok=True)
    return sweep_temporaries(out)


@contextmanager
def writing(path: Path, what: str, after: str = "") -> Iterator[None]:
    """An `OSError` inside becomes `OutputError(path, "cannot <what> (<reason>)<after>")`: the run's own files."""
    try:
        yield
    except OSError as e:
        raise OutputError(path, f"cannot {what} ({e.strerror or e}){after}") from None


def check_unique_outputs(files: dict[str, Iterable[Path]], own: Iterable[Path] = ()) -> None:
    """`files`: input -> the output files it writes; `own`: the run's files (report, provenance, log). Refuse,
    before anything is written, two writers of one file (compared ignoring case, as macOS and Windows disks
    compare names)."""
    seen: dict[str, str] = {str(p).casefold(): "the run itself" for p in own}
    for source, paths in files.items():
        for p in paths:
            key = str(p).casefold()
            if key in seen:
                raise InputError(source, f"its output {p.name} would also be written for {seen[key]}; rename one "
                                         "of the inputs")
            seen[key] = source


def read_scan(path: Path, cfg: DataConfig, skull: str = "warn") -> tuple[Slices, list[str]]:
    """(the scan's slices, the reader's warnings as one line each): `load_volume`, `check_skull_stripped` with
    `skull` ("warn", "refuse" or "ignore"), `preprocess`. Warnings other than `InputWarning` go on as before."""
    if skull not in SKULL_MODES:
        raise ValueError(f"skull must be one of {SKULL_MODES}, got {skull!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_volume(path)                 # names the file, so preprocessing errors do too
        check_skull_stripped(image, path, skull)
        slices = preprocess(image, cfg)
    found = []
    for w in caught:
        if issubclass(w.category, InputWarning):
            found.append(one_line(str(w.message)))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return slices, list(dict.fromkeys(found))


def one_line(text: str) -> str:
    return " ".join(text.split())


class ErrorLog:
    """The one-line error of a failed scan, with unexpected exceptions' tracebacks in `path` (module docstring).
    The log is only created when something unexpected happened."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = 0

    def describe(self, error: BaseException, source: Path) -> str:
        if isinstance(error, InputError):
            return one_line(str(error))
        if isinstance(error, OSError) and error.errno is not None:
            where = error.filename if error.filename is not None else source
            return one_line(f"{source}: cannot write its outputs ({where}: {error.strerror or error})")
        text = one_line(f"{type(error).__name__}: {error}")[:300]
        return f"{source}: unexpected {text} ({self._record(error, source)})"

    def _record(self, error: BaseException, source: Path) -> str:
        block = (f"--- {datetime.now(timezone.utc).isoformat(timespec='seconds')} {source}\n"
                 + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
        try:
            with open(self.path, "a") as f:       # appended, not atomic: a log, read by people
                f.write(block)
        except OSError as e:
            return f"traceback not saved: {e.strerror or e}"
        self.entries += 1
        return f"traceback in {self.path}"


def is_disk_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_ERRNOS


def stop_for_disk(error: OSError, source: Path, out: Path, report: Path, done: int) -> OutputError:
    """The error that stops a run whose output disk failed (`DISK_ERRNOS`) while writing the outputs of
    `source`, after the report was saved."""
    return OutputError(out, f"stopped: {error.strerror or error} while writing the outputs of {source.name}; "
                            f"{report.name} lists the {done} scans handled so far; rerun with --continue when "
                            "the disk has room")
