"""ONNX Runtime: runs the fused graph of a ``gms-deploy export`` directory, with no PyTorch checkpoint.

The fused ``gms`` graph is run rather than the three sub-graphs: one session, one call per batch
and no latent copied between sessions; the sub-graphs exist for per-stage engines and checks.
Everything in an export directory is verified against its manifest before ONNX Runtime sees it
(format version, SHA-256, tensor names and shapes, opset), so a bad directory ends in one line
naming the file and the problem rather than a stack trace from inside onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from gms_deploy.backends.base import Runner
from gms_deploy.export_format import MANIFEST, BackendError, ExportManifest, GraphFile, sha256
from gms_deploy.messages import one_line

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_file(manifest: ExportManifest, entry: GraphFile) -> Path:
    """Opset, hash, ONNX structure and tensor shapes of one graph against its manifest entry."""
    newest = onnx.defs.onnx_opset_version()
    if manifest.opset > newest:
        raise BackendError(
            f"{manifest.path}: needs ONNX opset {manifest.opset}, the installed onnx {onnx.__version__} "
            f"reads up to {newest}"
        )
    path = manifest.folder / entry.file
    for name in (entry.file, *entry.external_data):
        if not (manifest.folder / name).is_file():
            raise BackendError(f"{manifest.folder / name}: missing (listed in {MANIFEST})")
    if sha256(path) != entry.sha256:
        raise BackendError(f"{path}: SHA-256 does not match {MANIFEST}; the file changed after export")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, onnx raises its own; both mean corrupt
        raise BackendError(f"{path}: corrupt ONNX ({type(err).__name__})") from None
    actual = {v.name: _dims(v) for v in (*model.graph.input, *model.graph.output)}
    for tensor in (*entry.inputs, *entry.outputs):
        if actual.get(tensor.name) != list(tensor.shape):
            raise BackendError(
                f"{path}: tensor {tensor.name} is {actual.get(tensor.name)}, "
                f"{MANIFEST} says {list(tensor.shape)}"
            )
    size = manifest.settings.image_size
    for tensor in entry.inputs:
        if tensor.name == "image" and tensor.shape[2:] != (size, size):
            raise BackendError(
                f"{path}: takes {tensor.shape[2]} x {tensor.shape[3]} images, but the model's "
                f"image size is {size}"
            )
    return path


def providers_for(device: str) -> list[Any]:
    """ONNX Runtime providers for ``cpu`` or ``cuda[:N]``; CUDA needs ``onnxruntime-gpu``."""
    import onnxruntime as ort

    index = device.partition(":")[2]
    if device == "cpu":
        return [CPU]
    if device.partition(":")[0] == "cuda" and (index == "" or index.isdigit()):
        if CUDA not in ort.get_available_providers():
            raise BackendError(
                f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu "
                "instead of onnxruntime)"
            )
        return [(CUDA, {"device_id": int(index or 0)}), CPU]
    raise BackendError(f"--device {device}: expected cpu or cuda[:N]")


def open_session(
    manifest: ExportManifest, entry: GraphFile, providers: list[Any], all_outputs: bool = False
) -> Any:
    """A verified ``InferenceSession`` for one graph of ``manifest``.

    ``all_outputs`` also returns every intermediate tensor (the layer-by-layer check in validation).
    """
    import onnxruntime as ort

    path = _check_file(manifest, entry)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # One thread budget for every backend in the process, so that a benchmark compares like with like.
    options.intra_op_num_threads = torch.get_num_threads()
    source: str | bytes = str(path)
    if all_outputs:
        from polygraphy import constants
        from polygraphy.backend.onnx import modify_outputs

        model = onnx.load(str(path))
        # Shapes recorded by converters can be stale; ORT trusts declared output shapes, so infer anew.
        del model.graph.value_info[:]
        source = modify_outputs(model, outputs=constants.MARK_ALL).SerializeToString()
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
        raise BackendError(f"{path}: onnxruntime cannot load it: {one_line(err)}") from None
    # A provider whose libraries do not load (CUDA, cuDNN) is dropped with a warning that the log
    # level above hides, and the session runs on the CPU: what was asked for must be what runs.
    asked = [p if isinstance(p, str) else p[0] for p in providers]
    missing = [p for p in asked if p not in session.get_providers()]
    if missing:
        raise BackendError(
            f"{path}: onnxruntime did not load {', '.join(missing)} (its CUDA or cuDNN libraries are "
            f"missing or do not match) and would run on {session.get_providers()[0]}; use --device cpu "
            "or fix the onnxruntime-gpu install"
        )
    return session


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, export_dir: Path, device: str = "cpu", precision: str | None = None) -> None:
        """``precision`` None is FP32 on the CPU (FP16 only adds casts there) and FP16 on CUDA."""
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        manifest = ExportManifest.read(self.export_dir)
        self.settings = manifest.settings
        self.model_name = manifest.model
        if precision is None:
            precision = "fp16" if device.startswith("cuda") else "fp32"
            available = {g.precision for g in manifest.graphs if g.graph == "gms"}
            if precision not in available and available:
                precision = sorted(available)[0]
        self.precision = precision
        providers = providers_for(device)
        entry = manifest.graph("gms", precision)
        self.session = open_session(manifest, entry, providers)
        self.provider = self.session.get_providers()[0]
        self.input_name = entry.inputs[0].name
        self.version = ort.__version__

    @property
    def description(self) -> str:
        return (
            f"onnxruntime {self.version} {self.precision.upper()} fused graph on {self.provider} "
            f"({self.model_name}, {self.export_dir})"
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        size = self.settings.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise BackendError(
                f"{self.export_dir}: expects B x 3 x {size} x {size} images, got {images.shape}"
            )
        (prob,) = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})
        return prob[:, 0]
