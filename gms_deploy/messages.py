"""Errors as one line: the tool promises one line per failed file, whatever a library raised.

Libraries append tracebacks, advice and C++ frames to their messages; the first line names the
problem, and the exception's type says which layer raised it.
"""

from __future__ import annotations

from collections.abc import Iterable


def first_line(err: BaseException) -> str:
    """The message's first line (the type's name where it is empty).

    A DataLoader worker's error arrives as ``Caught OSError in DataLoader worker process 0.`` with
    the worker's traceback below: its last line is the error itself, naming the file.
    """
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].strip()
    return lines[0]


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (the type alone where the message is empty)."""
    return f"{type(err).__name__}: {first_line(err)}" if str(err).strip() else type(err).__name__


def reason(err: BaseException) -> str:
    """What went wrong, for a message that already names the file: the system's words where it gave
    some, else the exception's first line (with its type where that alone says nothing: a KeyError's
    key, or no message at all, as ``struct.error()`` raises)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if not str(err).strip():
        return type(err).__name__
    return f"{type(err).__name__} {first_line(err)}" if isinstance(err, KeyError) else first_line(err)


def os_reason(err: OSError) -> str:
    """``path: what the system said`` (``afile: Not a directory``), not ``[Errno 20] ...: 'afile'``."""
    if not err.strerror:  # no errno: a message of its own, such as one of this package's
        return first_line(err)
    return f"{shown(err.filename)}: {err.strerror}" if err.filename is not None else err.strerror


def preview(items: Iterable[str], limit: int = 3) -> str:
    """The first few of a list, with how many more: one line however long the list."""
    items = list(items)
    listed = ", ".join(items[:limit])
    return listed + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def shown(path: object) -> str:
    """A path as one line of valid UTF-8, for messages and results.csv.

    Control characters (a newline in a file name) and undecodable bytes (a Latin-1 name on a UTF-8
    system, which Python keeps as lone surrogates) are written as backslash escapes.
    """
    text = str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
