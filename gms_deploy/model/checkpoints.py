"""Reading checkpoint files into plain state dicts, with errors a person can act on.

Users arrive with `.ckpt`/`.pt`/`.pth` pickles (LDM's ``{"state_dict": ...}``, GMS's
``{"model": ...}``, or a bare dict) and `.safetensors`. Pickles are read with
``weights_only=True``: a checkpoint from a stranger must never run code on a hospital machine.
"""

from __future__ import annotations

import codecs
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from gms_deploy.errors import CheckpointError
from gms_deploy.messages import first_line, preview

WRAPPER_KEYS = ("state_dict", "model", "module")
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"II+\x00", "a TIFF image"),  # BigTIFF
    (b"MM\x00+", "a TIFF image"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"\x1f\x8b", "a gzip file"),
)
"""What people hand over for weights by mistake: a scan, Keras weights, a compressed NIfTI."""
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


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
    except Exception as err:  # torch.load of a damaged file raises almost anything
        raise CheckpointError(path, _why_unreadable(path, err)) from None


def _why_unreadable(path: Path, err: Exception) -> str:
    """What the file is, where its first bytes tell. torch's own text is left out of unpickling
    errors: it advises ``weights_only=False``, which would run the file's code."""
    if (kind := _what_it_is(path)) is not None:
        return f"{kind}, not a checkpoint"
    if not isinstance(err, pickle.UnpicklingError):
        return f"truncated or not a PyTorch checkpoint ({first_line(err)})"
    if not _is_pickle(path):
        return "not a checkpoint"
    found = _GLOBAL.search(str(err))
    return (
        "holds Python objects besides tensors"
        + (f" ({found[1]})" if found else "")
        + ", which would run code to load; re-save just the state dict"
    )


def _what_it_is(path: Path) -> str | None:
    """The kind of a file that is no checkpoint, from its first bytes; None for a pickle, a PyTorch
    zip (perhaps truncated) or anything not recognised."""
    with path.open("rb") as f:
        head = f.read(4096)
    kind = next((kind for signature, kind in SIGNATURES if head.startswith(signature)), None)
    if kind is not None:
        return kind
    if head[128:132] == b"DICM":
        return "a DICOM file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive" if _is_torch_zip(path) is False else None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at 4096 is fine
    except UnicodeDecodeError:
        return None
    if not all(c.isprintable() or c.isspace() for c in text):
        return None
    return "a JSON file" if text.lstrip().startswith(("{", "[")) else "a text file"


def _is_torch_zip(path: Path) -> bool | None:
    """Whether a zip holds ``torch.save``'s pickle; None where it cannot be read (truncated)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return None


def _is_pickle(path: Path) -> bool:
    """``torch.save``'s two formats: a zip with ``data.pkl``, or (legacy) a protocol 2 pickle."""
    with path.open("rb") as f:
        return f.read(1) == b"\x80" or _is_torch_zip(path) is True


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
        keys = preview(str(k) for k in loaded)
        if "optimizer" in loaded:  # the trainer's train_state.pth: what resuming needs, not the weights
            raise CheckpointError(path, f"a training state (keys: {keys}); give best_model.pth")
        raise CheckpointError(path, f"holds no tensors (keys: {keys})")
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
