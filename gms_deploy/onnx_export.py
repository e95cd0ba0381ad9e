"""GMS -> ONNX graphs that a strongly typed TensorRT builder accepts, FP32 and FP16, with a manifest.

The graphs and what they reproduce are declared in ``model/graphs.py``; this is how they are made.
Trace FP32 once with the legacy exporter (tracing a half model on the CPU takes minutes per graph),
fold constants with polygraphy, then let ModelOpt AutoCast write the FP16 graph. AutoCast is used
because its output puts an explicit Cast at every precision boundary, which a strongly typed
builder needs; onnxconverter-common's output is refused by one (GMS.md). The fused graph is
composed from the sub-graphs rather than traced again, so it holds exactly the same nodes and
precision choices as the parts and costs no second trace or conversion.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch

from gms_deploy.bundle import ModelBundle
from gms_deploy.errors import GmsError
from gms_deploy.export_format import (
    BATCH,
    MANIFEST,
    ExportManifest,
    Fp16Conversion,
    GraphFile,
    ValidationReport,
    sha256,
)
from gms_deploy.io.calibration import image_batch, real_images
from gms_deploy.model.gms import GMSModel
from gms_deploy.model.graphs import OPSET, FusedGraph, Graph, TracedGraph, graph_specs
from gms_deploy.versions import installed

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# Kept FP32 whatever the data range: normalisation statistics (GroupNorm is exported as
# InstanceNormalization), softmax and the output's channel mean. The rest is AutoCast's call.
FP32_OP_TYPES = ("InstanceNormalization", "Softmax", "ReduceMean")
VERSIONED_PACKAGES = (
    "gms-deploy",
    "torch",
    "diffusers",
    "onnx",
    "onnxruntime",
    "nvidia-modelopt",
    "polygraphy",
)


class ExportError(GmsError):
    """An export that cannot be written or that fails validation; ``str()`` is one line."""


def file_name(graph: str, precision: str) -> str:
    return f"{graph}_{precision}.onnx"


@dataclass(frozen=True)
class ExportOptions:
    """How to export; the defaults are ``gms-deploy export`` without flags.

    ``calibration``: image or DICOM files whose first frames calibrate AutoCast and join the
    validation (None: pydicom's ultrasound examples). ``data_max``: AutoCast keeps a node FP32 when
    a calibration value at it exceeds this (512 is AutoCast's default: FP16's step there is 0.5).
    """

    precisions: tuple[str, ...] = PRECISIONS
    calibration: Sequence[Path] | None = None
    data_max: float = 512.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown or not self.precisions:
            raise ExportError(
                f"precisions must be among {', '.join(PRECISIONS)}, got {', '.join(self.precisions)}"
            )


@dataclass
class ExportResult:
    """What an export wrote, and what it was made from: validation compares the two."""

    out_dir: Path
    graphs: tuple[GraphFile, ...]
    seconds: dict[str, float]
    model: GMSModel = field(repr=False)
    """The eager model the graphs were traced from."""
    frames: list[np.ndarray] = field(repr=False)
    """The real frames (H x W x 3) that calibrated FP16."""
    validation: ValidationReport | None = None

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_graph(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write ``model``; past protobuf's 2 GB limit the weights go to ``<name>.data`` (logged, never silent).

    Returns the names of the external data files written (none for a self-contained graph).
    """
    if _weight_bytes(model) < EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return []
    data = f"{path.name}.data"
    log.warning("%s: weights exceed 2 GB, writing them to %s (ONNX external data)", path.name, data)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    return [data]


def _sanitise(path: Path) -> None:
    """Fold constants (shape arithmetic, weight transposes) and drop dead nodes, in place.

    Shape inference names the output's batch axis after the upsampling arithmetic
    (``floor(1.0*batch)``); it is renamed ``batch`` so that inputs and outputs share one symbol.
    """
    import onnxruntime as ort
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    ort.set_default_logger_severity(3)  # folding runs ORT, whose optimiser warns about each Unsqueeze
    with G_LOGGER.verbosity(G_LOGGER.INFO if log.isEnabledFor(logging.DEBUG) else G_LOGGER.WARNING):
        model = fold_constants(onnx.load(str(path)), num_passes=3, do_shape_inference=True)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH
    save_graph(model, path)


def _to_fp16(fp32_path: Path, calibration: np.ndarray, data_max: float) -> onnx.ModelProto:
    """FP16 mixed precision by ModelOpt AutoCast, its data-range rule fed real images.

    FP32 I/O (``keep_io_types``), so the graph is a drop-in for the FP32 one.
    """
    from modelopt.onnx.autocast import convert_to_mixed_precision

    # AutoCast logs every node it keeps FP32 at INFO, and warns of inputs it cannot type and tiny
    # weights it rounds on every export: its warnings with -v, all of it when debugging.
    level = logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    if not log.isEnabledFor(logging.INFO):
        level = logging.ERROR
    for name in ("modelopt.onnx", "modelopt.onnx.autocast"):
        logging.getLogger(name).setLevel(level)
    model = onnx.load(str(fp32_path), load_external_data=False)
    converted = convert_to_mixed_precision(
        onnx_path=str(fp32_path),
        low_precision_type="fp16",
        op_types_to_exclude=list(FP32_OP_TYPES),
        data_max=data_max,
        keep_io_types=True,
        calibration_data={model.graph.input[0].name: calibration},
        providers=["cpu"],
        opset=OPSET,
    )
    # AutoCast leaves stale shapes in value_info (attention MatMuls keep a pre-transpose shape);
    # ONNX Runtime trusts them and fails at run time, so they are inferred anew.
    del converted.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(converted)


def package_versions() -> dict[str, str | None]:
    return {name: installed(name) for name in VERSIONED_PACKAGES}


def _record(graph: Graph, precision: str, path: Path, external: list[str]) -> GraphFile:
    return GraphFile(
        graph=graph.name,
        precision=precision,
        file=path.name,
        sha256=sha256(path),
        bytes=path.stat().st_size,
        inputs=(graph.input,),
        outputs=(graph.output,),
        external_data=tuple(external),
    )


def export_model(bundle: ModelBundle, out_dir: Path, options: ExportOptions | None = None) -> ExportResult:
    """Export every graph in every precision into the new or empty folder ``out_dir``, with its manifest.

    Not validated, and not staged: ``validate.run_export``, the export command, fills a folder beside
    the destination with this and its validation, and renames it into place when both are done.
    """
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = bundle.build()
    settings = bundle.settings
    specs = graph_specs(model, settings)
    frames = real_images(options.calibration)
    images = image_batch(frames, settings.image_size)
    seconds: dict[str, float] = {}
    written: dict[str, list[GraphFile]] = {p: [] for p in options.precisions}
    inputs = {"encoder": torch.from_numpy(images)}
    with torch.inference_mode():
        inputs["mapper"] = model.encode(inputs["encoder"])
        inputs["decoder"] = model.map(inputs["mapper"])

    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as scratch:
        for spec in specs.values():
            if not isinstance(spec, TracedGraph):
                continue
            for precision in options.precisions:
                tick = time.perf_counter()
                traced = Path(scratch) / f"{spec.name}_{precision}_traced.onnx"
                spec.export_fp32(traced, precise_norm=precision == "fp32")
                _sanitise(traced)
                if precision == "fp32":
                    graph = onnx.load(str(traced))
                else:
                    graph = _to_fp16(traced, inputs[spec.name].numpy(), options.data_max)
                seconds[f"{spec.name} {precision}"] = time.perf_counter() - tick
                target = out_dir / file_name(spec.name, precision)
                written[precision].append(_record(spec, precision, target, save_graph(graph, target)))
    fused = specs["gms"]
    assert isinstance(fused, FusedGraph)
    for precision in options.precisions:
        parts = [onnx.load(str(out_dir / f.file)) for f in written[precision]]
        target = out_dir / file_name(fused.name, precision)
        external = save_graph(fused.compose(parts), target)
        onnx.checker.check_model(str(target))
        written[precision].append(_record(fused, precision, target, external))
    seconds["export"] = time.perf_counter() - started

    graphs = tuple(g for precision in options.precisions for g in written[precision])
    fp16 = Fp16Conversion(
        converter="modelopt.onnx.autocast",
        keep_io_types=True,
        op_types_kept_fp32=FP32_OP_TYPES,
        data_max=options.data_max,
        calibration_images=len(frames),
    )
    manifest = ExportManifest(
        folder=out_dir,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=bundle.name,
        settings=settings,
        latent=specs["encoder"].latent_dims,
        opset=OPSET,
        versions=package_versions(),
        graphs=graphs,
        fp16=fp16 if "fp16" in options.precisions else None,
    )
    manifest.write()
    return ExportResult(out_dir, graphs, seconds, model, frames)
