"""ONNX Runtime: runs the fused graph of a ``gms-deploy export`` directory, with no PyTorch checkpoint.

The fused ``gms`` graph is run rather than the three sub-graphs: one session, one call per batch
and no latent copied between sessions; the sub-graphs exist for per-stage engines and checks.
Everything in an export directory is verified against its manifest before ONNX Runtime sees it
(format version, SHA-256, tensor names and shapes, opset), so a bad directory ends in one line
naming the file and the problem rather than a stack trace from inside onnxruntime.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from gms_deploy.backends.base import BackendError, Runner
from gms_deploy.bundle import Settings
from gms_deploy.messages import one_line
from gms_deploy.onnx_export import FORMAT, FORMAT_VERSION, MANIFEST, sha256

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """The export's ``manifest.json``, checked to be one this version of gms-deploy can read."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise BackendError(f"{path}: missing; is {export_dir} a gms-deploy export directory?")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BackendError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BackendError(f"{path}: not a gms-deploy ONNX export manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise BackendError(
            f"{path}: written in export format version {data.get('format_version')!r}, this gms-deploy "
            f"reads version {FORMAT_VERSION}; export the model again"
        )
    opset = data.get("opset")
    if not isinstance(opset, int) or opset > onnx.defs.onnx_opset_version():
        raise BackendError(
            f"{path}: needs ONNX opset {opset}, the installed onnx {onnx.__version__} reads up to "
            f"{onnx.defs.onnx_opset_version()}"
        )
    _check_fields(data, path)
    if not data.get("validation", {}).get("ok", True):
        raise BackendError(f"{path}: this export failed validation against PyTorch (see its 'validation')")
    try:
        data["settings"] = Settings(**data["settings"])
    except (KeyError, TypeError, ValueError) as err:
        raise BackendError(f"{path}: invalid settings ({err})") from None
    return data


# What every reader of a manifest takes for granted, field by field, so that a hand-edited or
# damaged manifest ends in one line here instead of a TypeError deep in a backend or the builder.
GRAPH_FIELDS = {"graph": str, "precision": str, "file": str, "sha256": str, "inputs": list, "outputs": list,
                "external_data": list}  # fmt: skip
TENSOR_FIELDS = {"name": str, "shape": list}
ENGINE_FIELDS = {"graph": str, "precision": str, "file": str, "sha256": str, "flavour": str, "version": str,
                 "targets": list, "gpu": (dict, type(None)), "profile": dict, "onnx_sha256": str}  # fmt: skip
FILE_NAME = re.compile(r"[\w.+-]+")


def _check_fields(data: dict[str, Any], path: Path) -> None:
    """Types of the entries each reader uses, and file names that stay inside the export folder."""
    if not isinstance(data.get("validation", {}), dict):
        raise BackendError(f"{path}: 'validation' is not an object")
    for key, fields in (("graphs", GRAPH_FIELDS), ("engines", ENGINE_FIELDS)):
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise BackendError(f"{path}: '{key}' is not a list")
        for i, entry in enumerate(entries):
            where = f"{path}: {key}[{i}]"
            _check_types(entry, fields, where)
            if key == "graphs":
                for j, tensor in enumerate((*entry["inputs"], *entry["outputs"])):
                    _check_types(tensor, TENSOR_FIELDS, f"{where} tensor {j}")
            elif not all(isinstance(target, str) for target in entry["targets"]):
                raise BackendError(f"{where}: 'targets' holds a non-string")
            for name in (entry["file"], *entry.get("external_data", [])):
                if not (isinstance(name, str) and FILE_NAME.fullmatch(name) and name.strip(".")):
                    raise BackendError(f"{where}: {name!r} is not the name of a file in the export folder")


def _check_types(entry: object, fields: dict[str, type | tuple[type, ...]], where: str) -> None:
    if not isinstance(entry, dict):
        raise BackendError(f"{where} is not an object")
    for field, kind in fields.items():
        if not isinstance(entry.get(field), kind):
            raise BackendError(f"{where}: '{field}' is missing or of the wrong type")


def graph_entry(manifest: dict[str, Any], export_dir: Path, graph: str, precision: str) -> dict[str, Any]:
    for entry in manifest.get("graphs", []):
        if entry.get("graph") == graph and entry.get("precision") == precision:
            return entry
    present = ", ".join(f"{e.get('graph')} {e.get('precision')}" for e in manifest.get("graphs", []))
    raise BackendError(
        f"{Path(export_dir) / MANIFEST}: lists no {graph} graph in {precision} (it has: {present or 'none'})"
    )


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_file(export_dir: Path, entry: dict[str, Any], settings: Settings) -> Path:
    """Hash, ONNX structure and tensor shapes of one graph against its manifest entry."""
    path = Path(export_dir) / entry["file"]
    for name in (entry["file"], *entry.get("external_data", [])):
        if not (Path(export_dir) / name).is_file():
            raise BackendError(f"{Path(export_dir) / name}: missing (listed in {MANIFEST})")
    if sha256(path) != entry["sha256"]:
        raise BackendError(f"{path}: SHA-256 does not match {MANIFEST}; the file changed after export")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, onnx raises its own; both mean corrupt
        raise BackendError(f"{path}: corrupt ONNX ({type(err).__name__})") from None
    actual = {v.name: _dims(v) for v in (*model.graph.input, *model.graph.output)}
    for tensor in (*entry["inputs"], *entry["outputs"]):
        if actual.get(tensor["name"]) != tensor["shape"]:
            raise BackendError(
                f"{path}: tensor {tensor['name']} is {actual.get(tensor['name'])}, "
                f"{MANIFEST} says {tensor['shape']}"
            )
    size = settings.image_size
    for tensor in entry["inputs"]:
        if tensor["name"] == "image" and tensor["shape"][2:] != [size, size]:
            raise BackendError(
                f"{path}: takes {tensor['shape'][2]} x {tensor['shape'][3]} images, but the model's "
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
    export_dir: Path,
    entry: dict[str, Any],
    settings: Settings,
    providers: list[Any],
    all_outputs: bool = False,
) -> Any:
    """A verified ``InferenceSession`` for one manifest entry.

    ``all_outputs`` also returns every intermediate tensor (the layer-by-layer check in validation).
    """
    import onnxruntime as ort

    path = _check_file(export_dir, entry, settings)
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
        manifest = read_manifest(self.export_dir)
        self.settings = manifest["settings"]
        self.model_name = str(manifest.get("model", self.export_dir.name))
        if precision is None:
            precision = "fp16" if device.startswith("cuda") else "fp32"
            available = {e.get("precision") for e in manifest.get("graphs", []) if e.get("graph") == "gms"}
            if precision not in available and available:
                precision = sorted(available)[0]
        self.precision = precision
        providers = providers_for(device)
        entry = graph_entry(manifest, self.export_dir, "gms", precision)
        self.session = open_session(self.export_dir, entry, self.settings, providers)
        self.provider = self.session.get_providers()[0]
        self.input_name = entry["inputs"][0]["name"]
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
