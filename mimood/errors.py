"""The one exception type users see: a bad input file, reported as `<file>: <problem>`."""
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
