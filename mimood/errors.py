"""The exceptions users see, each a one-line `<file>: <problem>`, and the exit status of every command."""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """A file that cannot be used, with the reason. `str()` is the one-line message users see."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputWarning(UserWarning):
    """A file that can be used but holds something the user should know (trailing data, a repaired header),
    as `<file>: <problem>`. Raised through `warnings.warn`, so a batch run can collect it per scan."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputError(Exception):
    """The output folder or its disk cannot take the outputs (not a folder, read-only, full): the run cannot go on,
    whatever the scans. `str()` is the one line users see, `<folder or file>: <problem>`."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# Exit status of every command (README "Exit status"): distinct for "some scans failed" (the run finished, the
# report lists them) and "could not run at all" (nothing was done, or the run stopped).
EXIT_OK = 0             # everything done
EXIT_FAILED = 1         # the run finished, some inputs failed (each a row of the report); an export that fails
                        # its validation
EXIT_USAGE = 2          # bad arguments, an unusable input or export folder: nothing done
EXIT_OUTPUT = 3         # the output folder or disk cannot be written (not a folder, read-only, full, I/O error):
                        # nothing done, or the run stopped; the last complete report is kept
