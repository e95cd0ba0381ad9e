"""``--device`` read once, for every command and backend: ``auto``, ``cpu`` or ``cuda[:N]``."""

from __future__ import annotations

import torch

from gms_deploy.errors import UsageError


def parse_device(name: str) -> torch.device:
    """``auto`` is the first CUDA GPU where PyTorch sees one, else the CPU; a bare ``cuda`` keeps no
    index (the current GPU). Whether a backend can use the device is the backend's to say."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise UsageError(f"--device {name}: expected auto, cpu or cuda[:N]")
    return torch.device(name)


def torch_device(name: str) -> torch.device:
    """``parse_device``, refused where the device is a GPU that PyTorch cannot use."""
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: PyTorch sees no CUDA GPU here")
    return device
