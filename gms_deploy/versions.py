"""Installed package versions, for the records that must say what produced them (manifests, bench JSON)."""

from __future__ import annotations

from importlib import metadata


def installed(distribution: str) -> str | None:
    """None where the distribution is not installed (a checkout on ``PYTHONPATH``, a missing extra)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
