"""Backends behind one interface; ``open_runner`` is the only place that chooses between them."""

from __future__ import annotations

from pathlib import Path

from gms_deploy.backends.base import BackendError, Runner
from gms_deploy.bundle import ModelBundle, demo_bundle

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def resolve_bundle(model: Path | None, vae: Path | None, mapper: Path | None) -> ModelBundle:
    """``--model`` or ``--vae``/``--mapper`` (both), else the embedded demo model."""
    if model is not None and (vae is not None or mapper is not None):
        raise BackendError("give either --model or --vae with --mapper, not both")
    if (vae is None) != (mapper is None):
        raise BackendError("--vae and --mapper go together")
    if vae is not None and mapper is not None:
        return ModelBundle(vae, mapper)
    return ModelBundle.load(model) if model is not None else demo_bundle()


def open_runner(
    backend: str,
    model: Path | None = None,
    vae: Path | None = None,
    mapper: Path | None = None,
    device: str = "cpu",
) -> Runner:
    """Build the runner a user asked for; imports each backend only when it is chosen."""
    if backend == "torch":
        from gms_deploy.backends.torch_eager import TorchRunner

        return TorchRunner(resolve_bundle(model, vae, mapper), device)
    if backend == "onnxruntime":
        from gms_deploy.backends.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(_export_dir(backend, model, vae, mapper), device)
    if backend == "tensorrt":
        from gms_deploy.backends.tensorrt import TensorRTRunner

        return TensorRTRunner(_export_dir(backend, model, vae, mapper), device)
    raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def _export_dir(backend: str, model: Path | None, vae: Path | None, mapper: Path | None) -> Path:
    """The backends that run exported graphs or engines take the export folder, never checkpoints."""
    if model is None or vae is not None or mapper is not None:
        raise BackendError(
            f"--backend {backend} runs a `gms-deploy export` folder (and the engines `gms-deploy build` "
            "put there): give it as --model EXPORT_DIR; --vae/--mapper are PyTorch checkpoints"
        )
    return model


__all__ = ["BACKENDS", "BackendError", "Runner", "open_runner", "resolve_bundle"]
