"""Progress bars for every command: live on a terminal, absent from logs.

A bar redraws itself with carriage returns, which a log file or CI console keeps as one endless
line; tqdm's ``disable=None`` turns it off wherever stderr is not a terminal, so every command's
bar comes from here and none writes them into a log.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T] | None = None, *, shown: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on a terminal (``shown`` False: never), gone once done; ``options`` are tqdm's."""
    return tqdm(iterable, disable=None if shown else True, leave=False, dynamic_ncols=True, **options)
