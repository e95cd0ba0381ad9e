"""Values read from JSON (configs, manifests) checked against the dataclass fields they fill.

JSON has no types beyond numbers, strings, lists and objects, and a hand-edited file can put any
of them anywhere; checked here, a wrong one fails in one line naming the field, rather than as a
TypeError deep in whatever first uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

from gms_deploy.errors import UsageError


def check_types(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Raise ``ValueError`` ("{what} {field}: expected {type}, got {value}") for the first misfit."""
    hints = get_type_hints(cls)
    for name, value in values.items():
        if not _conforms(value, hints[name]):
            raise UsageError(f"{what} {name}: expected {_type_name(hints[name])}, got {value!r}")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a value fits a field's annotation (an int where a float goes, as JSON writes 1.0)."""
    if get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_conforms(v, get_args(hint)[0]) for v in value)
    if get_origin(hint) is UnionType:
        return any(_conforms(value, option) for option in get_args(hint))
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint)) if get_origin(hint) is None else str(hint)
