"""The base of every error a user can cause and mend, so that the CLI handles them in one place.

A ``GmsError`` is said in one line and ends the command with exit 2. Anything else that escapes a
command is a bug in gms-deploy and keeps its traceback, so that it is reported rather than read as
a problem with the user's files.
"""

from __future__ import annotations

from pathlib import Path


class GmsError(Exception):
    """A problem with the user's files, options or machine, in one line that names what to fix."""

    details: str | None = None
    """Lines shown before that one (a validation table), or None."""


class UsageError(GmsError, ValueError):
    """Options or settings that cannot work (a ``ValueError`` too, for callers of the library)."""


class BackendError(GmsError):
    """A backend that cannot run here or cannot load its model (most often read off an export folder)."""


class CheckpointError(GmsError):
    """A checkpoint that cannot be used. ``str()`` is one line naming the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
