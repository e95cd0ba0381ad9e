"""Reading checkpoint files into plain state dicts, with errors a person can act on.

Users arrive with `.ckpt`/`.pt`/`.pth` pickles (LDM's ``{"state_dict": ...}``, GMS's
``{"model": ...}``, or a bare dict) and `.safetensors`. Pickles are read with
``weights_only=True``: a checkpoint from a stranger must never run code on a hospital machine.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from gms_deploy.errors import CheckpointError
from gms_deploy.messages import first_line, preview

WRAPPER_KEYS = ("state_dict", "model", "module")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from any supported file, unwrapping the training frameworks' containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "file is empty")
    if path.suffix == ".safetensors":
        loaded: object = _read_safetensors(path)
    else:
        loaded = _read_pickle(path)
    return _unwrap(path, loaded)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"not a readable safetensors file ({first_line(err)})") from None


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            path,
            "holds Python objects besides tensors, which would run code to load; "
            f"re-save just the state dict ({first_line(err)})",
        ) from None
    except Exception as err:  # torch.load of a damaged file raises almost anything
        raise CheckpointError(path, f"truncated or not a PyTorch checkpoint ({first_line(err)})") from None


def _unwrap(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    while isinstance(loaded, Mapping):
        wrapped = [k for k in WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)]
        if not wrapped:
            break
        loaded = loaded[wrapped[0]]
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(path, "does not contain a state dict of tensors")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "does not contain any tensors")
    return tensors


def check_keys(
    path: Path,
    expected: Mapping[str, torch.Size],
    found: Mapping[str, torch.Tensor],
    what: str,
) -> None:
    """Fail with the first few missing, unexpected or misshapen keys, in the file's own names."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshapen = [
        f"{k} {tuple(found[k].shape)} != {tuple(expected[k])}"
        for k in expected
        if k in found and found[k].shape != expected[k]
    ]
    problems = [
        f"{label} {len(keys)} key(s): {preview(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape for", misshapen))
        if keys
    ]
    if problems:
        raise CheckpointError(path, f"not a matching {what} checkpoint: " + "; ".join(problems))


def check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or Inf (a diverged training run): such a model gives no masks.

    ``tensors`` are the ones the model uses, under its own names (an LDM VAE's after renaming).
    """
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(path, f"NaN or Inf in {len(broken)} tensor(s): {preview(broken)}")
