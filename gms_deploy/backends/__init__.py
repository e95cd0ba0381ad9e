"""Backends behind one interface; ``open_runner`` is the only place that chooses between them."""

from __future__ import annotations

from pathlib import Path

from gms_deploy.backends.base import EXPORT_MANIFEST, BackendError, DeviceRunner, Runner
from gms_deploy.bundle import ModelBundle, demo_bundle

BACKENDS = ("auto", "torch", "torch-compiled", "onnxruntime", "tensorrt")
AUTO_ORDER = ("tensorrt", "torch-compiled", "onnxruntime", "torch")
GPU_ONLY = ("tensorrt", "torch-compiled")
EXPORT_BACKENDS = ("onnxruntime", "tensorrt")


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
    precision: str | None = None,
) -> Runner:
    """Build the runner a user asked for; imports each backend only when it is chosen.

    ``precision`` None is each backend's own default: FP32 for eager torch and for ONNX Runtime on a
    CPU, FP16 for TensorRT and for the GPU paths. ``auto`` leaves the choice to ``open_auto``.
    """
    if backend == "auto":
        return open_auto(model, vae, mapper, device, precision)[0]
    device = resolve_device(device)
    if backend == "torch":
        from gms_deploy.backends.torch_eager import TorchRunner

        return TorchRunner(resolve_bundle(model, vae, mapper), device, precision)
    if backend == "torch-compiled":
        from gms_deploy.backends.torch_compiled import TorchCompiledRunner

        return TorchCompiledRunner(resolve_bundle(model, vae, mapper), device, precision)
    if backend == "onnxruntime":
        from gms_deploy.backends.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(_export_dir(backend, model, vae, mapper), device, precision)
    if backend == "tensorrt":
        from gms_deploy.backends.tensorrt import TensorRTRunner

        return TensorRTRunner(_export_dir(backend, model, vae, mapper), device, precision)
    raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def resolve_device(device: str) -> str:
    """``auto``: the first CUDA GPU where PyTorch sees one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_auto(
    model: Path | None = None,
    vae: Path | None = None,
    mapper: Path | None = None,
    device: str = "auto",
    precision: str | None = None,
) -> tuple[Runner, str]:
    """The fastest backend that opens here, and one line saying which and why the faster ones did not.

    Tried in ``AUTO_ORDER``; the export-folder backends only for an export folder, the PyTorch ones
    only for weights, the GPU-only ones only on a GPU. ONNX Runtime falls back to its CPU provider
    where it has no CUDA one. A candidate that fails to open is passed over with its own reason,
    except for a broken model (``CheckpointError``): every backend would read the same files, so
    it is raised as it is rather than buried at the end of the list of backends passed over.
    """
    chosen = resolve_device(device)
    exported = model is not None and (model / EXPORT_MANIFEST).is_file()
    passed: list[str] = []
    for backend in AUTO_ORDER:
        if backend in GPU_ONLY and not chosen.startswith("cuda"):
            passed.append(f"{backend}: needs a CUDA GPU, device is {chosen}")
            continue
        if (backend in EXPORT_BACKENDS) != exported:
            passed.append(
                f"{backend}: runs {'an export folder' if backend in EXPORT_BACKENDS else 'weights'}"
            )
            continue
        for where in dict.fromkeys((chosen, "cpu") if backend == "onnxruntime" else (chosen,)):
            try:
                runner = open_runner(backend, model, vae, mapper, where, precision)
            except (BackendError, ImportError) as err:
                passed.append(f"{backend} on {where}: {err}")
                continue
            why = f"; passed over {'; '.join(passed)}" if passed else ""
            return runner, f"auto chose {backend} on {where}{why}"
    raise BackendError(f"no backend can run this model here: {'; '.join(passed)}")


def _export_dir(backend: str, model: Path | None, vae: Path | None, mapper: Path | None) -> Path:
    """The backends that run exported graphs or engines take the export folder, never checkpoints."""
    if model is None or vae is not None or mapper is not None:
        raise BackendError(
            f"--backend {backend} runs a `gms-deploy export` folder (and the engines `gms-deploy build` "
            "put there): give it as --model EXPORT_DIR; --vae/--mapper are PyTorch checkpoints"
        )
    return model


__all__ = [
    "BACKENDS",
    "BackendError",
    "DeviceRunner",
    "Runner",
    "open_auto",
    "open_runner",
    "resolve_bundle",
    "resolve_device",
]
