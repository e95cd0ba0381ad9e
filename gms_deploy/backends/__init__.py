"""Backends behind one interface, in one table: every command and the benchmark open runners from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gms_deploy.backends.base import BackendError, DeviceRunner, Runner
from gms_deploy.backends.source import ModelSource
from gms_deploy.bundle import ModelBundle
from gms_deploy.devices import parse_device


def _torch(model: Any, device: str, precision: str | None) -> Runner:
    from gms_deploy.backends.torch_eager import TorchRunner

    return TorchRunner(model, device, precision)


def _torch_compiled(model: Any, device: str, precision: str | None) -> Runner:
    from gms_deploy.backends.torch_compiled import TorchCompiledRunner

    return TorchCompiledRunner(model, device, precision)


def _onnxruntime(model: Any, device: str, precision: str | None) -> Runner:
    from gms_deploy.backends.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, device, precision)


def _tensorrt(model: Any, device: str, precision: str | None) -> Runner:
    from gms_deploy.backends.tensorrt import TensorRTRunner

    return TensorRTRunner(model, device, precision)


@dataclass(frozen=True)
class BackendSpec:
    """One backend: what it runs, where, and how to build it (imported only when it is chosen)."""

    name: str
    runs: Literal["weights", "export"]
    """A model's weights (a ``ModelBundle``, built at any image size) or an export folder as it is."""
    factory: Callable[[Any, str, str | None], Runner]
    """``(bundle or export folder, device, precision or None: the backend's default) -> Runner``."""
    gpu_only: bool = False
    auto_on_cpu: bool = True
    """Whether ``auto`` tries it on a CPU: compiling there costs about a minute per batch size."""
    cpu_fallback: bool = False
    """Whether ``auto`` tries it on the CPU where it cannot run on the GPU asked for."""


# The fastest first: the order ``auto`` tries them in.
BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("tensorrt", "export", _tensorrt, gpu_only=True, auto_on_cpu=False),
    BackendSpec("torch-compiled", "weights", _torch_compiled, auto_on_cpu=False),
    BackendSpec("onnxruntime", "export", _onnxruntime, cpu_fallback=True),
    BackendSpec("torch", "weights", _torch),
)
NAMES = tuple(spec.name for spec in BACKENDS)
CHOICES = ("auto", *NAMES)
"""What ``--backend`` takes."""


def backend_spec(name: str) -> BackendSpec:
    for spec in BACKENDS:
        if spec.name == name:
            return spec
    raise BackendError(f"unknown backend {name!r}; choose from {', '.join(CHOICES)}")


def open_runner(
    backend: str,
    source: ModelSource | ModelBundle | Path | None = None,
    device: str = "cpu",
    precision: str | None = None,
) -> Runner:
    """The runner a user asked for; ``auto`` leaves the choice to ``open_auto``.

    ``precision`` None is each backend's own default: FP32 for eager torch and for ONNX Runtime on a
    CPU, FP16 for TensorRT and for the GPU paths.
    """
    if backend == "auto":
        return open_auto(source, device, precision)[0]
    spec, source = backend_spec(backend), ModelSource.of(source)
    model = source.weights(f"--backend {backend}") if spec.runs == "weights" else source.export_dir(backend)
    chosen = parse_device(device)
    if spec.gpu_only and chosen.type != "cuda":
        raise BackendError(f"--backend {backend} needs a CUDA GPU (--device cuda), not --device {device}")
    return spec.factory(model, str(chosen), precision)


def open_auto(
    source: ModelSource | ModelBundle | Path | None = None, device: str = "auto", precision: str | None = None
) -> tuple[Runner, str]:
    """The fastest backend that opens here, and one line saying which and why the faster ones did not.

    Tried in ``BACKENDS`` order; the export-folder backends only for an export folder, the PyTorch
    ones only for weights, the GPU-only ones only on a GPU. A candidate that fails to open is passed
    over with its own reason, except for a broken model (``CheckpointError``): every backend would
    read the same files, so it is raised as it is rather than buried in the list passed over.
    """
    source = ModelSource.of(source)
    chosen = str(parse_device(device))
    on_gpu = chosen.startswith("cuda")
    passed: list[str] = []
    for spec in BACKENDS:
        if not on_gpu and (spec.gpu_only or not spec.auto_on_cpu):
            passed.append(f"{spec.name}: needs a CUDA GPU, device is {chosen}")
            continue
        if (spec.runs == "export") != source.exported:
            passed.append(f"{spec.name}: runs {'an export folder' if spec.runs == 'export' else 'weights'}")
            continue
        for where in dict.fromkeys((chosen, "cpu") if spec.cpu_fallback else (chosen,)):
            try:
                runner = open_runner(spec.name, source, where, precision)
            except (BackendError, ImportError) as err:
                passed.append(f"{spec.name} on {where}: {err}")
                continue
            why = f"; passed over {'; '.join(passed)}" if passed else ""
            return runner, f"auto chose {spec.name} on {where}{why}"
    raise BackendError(f"no backend can run this model here: {'; '.join(passed)}")


__all__ = [
    "BACKENDS",
    "CHOICES",
    "BackendError",
    "BackendSpec",
    "DeviceRunner",
    "ModelSource",
    "Runner",
    "backend_spec",
    "open_auto",
    "open_runner",
]
