"""Errors as one line: the tool promises one line per failed file, whatever a library raised.

Libraries append tracebacks, advice and C++ frames to their messages; the first line names the
problem, and the exception's type says which layer raised it.
"""

from __future__ import annotations


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (the type alone where the message is empty)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def shown(path: object) -> str:
    """A path as one line of valid UTF-8, for messages and results.csv.

    Control characters (a newline in a file name) and undecodable bytes (a Latin-1 name on a UTF-8
    system, which Python keeps as lone surrogates) are written as backslash escapes.
    """
    text = str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def os_reason(err: OSError) -> str:
    """``path: what the system said`` (``afile: Not a directory``), not ``[Errno 20] ...: 'afile'``."""
    if not err.strerror:  # no errno: a message of its own, such as one of this package's
        lines = str(err).strip().splitlines()
        return lines[0] if lines else type(err).__name__
    return f"{shown(err.filename)}: {err.strerror}" if err.filename is not None else err.strerror
