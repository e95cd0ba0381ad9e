"""A folder that appears whole or not at all: a bundle or an export is filled beside its destination
and renamed into place when complete, so that Ctrl-C, a crash or a bad input never leaves a folder
that looks like one but is not (or an empty ``--out`` that was not there before)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gms_deploy.errors import UsageError


@contextmanager
def staged_folder(
    target: Path, marker: str, what: str, replace: bool = False, hint: str = " (--overwrite replaces it)"
) -> Iterator[Path]:
    """A fresh folder beside ``target`` to fill; renamed to ``target`` when the block ends without error.

    ``marker`` is the file that makes a folder ``what`` (its manifest): an existing ``what`` is
    replaced only with ``replace`` (``hint`` says how, where a command can), and a folder holding
    anything else is never touched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: cannot be written: a file, not a folder")
    if (target / marker).exists() and not replace:
        raise UsageError(f"{target}: already holds {what}{hint}")
    if target.is_dir() and not (target / marker).exists() and any(target.iterdir()):
        raise UsageError(f"{target}: a folder of other files, not {what}: give a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
