"""GMS -> ONNX graphs that a strongly typed TensorRT builder accepts, FP32 and FP16, with a manifest.

Each sub-model is a class that declares its tensors (dynamic batch, static spatial size) and the
eager PyTorch function it must reproduce, in the spirit of TensorRT's demo/Diffusion ``models.py``:

* ``encoder``: image in [-1, 1] -> scaled latent mean (``quant_conv`` sliced to the mean and x scale)
* ``mapper``:  latent -> mask latent (the ``out`` head)
* ``decoder``: mask latent -> probability (/ scale folded into ``post_quant_conv``; channel mean,
  (x + 1) / 2 and clamp inside)
* ``gms``:     image -> probability, the three graphs above joined into one (one-engine deployment)

The pipeline is: trace FP32 once with the legacy exporter (tracing a half model on the CPU takes
minutes per graph), fold constants with polygraphy, then let ModelOpt AutoCast write the FP16
graph. AutoCast is used because its output puts an explicit Cast at every precision boundary,
which a strongly typed builder needs; onnxconverter-common's output is refused by one (GMS.md).
The fused graph is composed from the sub-graphs rather than traced again, so it holds exactly the
same nodes and precision choices as the parts and costs no second trace or conversion.

GroupNorm is traced twice. For FP16 (and so TensorRT) it exports as InstanceNormalization, the
form TensorRT runs as one normalisation kernel and AutoCast keeps FP32. The FP32 graphs, which
ONNX Runtime's CPU provider runs, get a two-level mean instead (``_two_level_group_norm``):
that provider's InstanceNormalization sums each group (50,176 values at 224 x 224) in one float32
accumulator, a relative error of ~5e-5 at the VAE's first GroupNorm (PyTorch: 1e-7) that the
mapper's attention amplifies. Measured on the parity fixture's real frames, fused FP32 graph
against float64 PyTorch: 1.19e-3 with InstanceNormalization, 2.4e-5 with the two-level mean
(PyTorch FP32 itself: 2.0e-5).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import torch
from torch import nn

from gms_deploy.bundle import ModelBundle, Settings
from gms_deploy.errors import GmsError
from gms_deploy.export_format import (
    BATCH,
    MANIFEST,
    ExportManifest,
    Fp16Conversion,
    GraphFile,
    Latent,
    TensorSpec,
    ValidationReport,
    sha256,
)
from gms_deploy.model.gms import GMSModel
from gms_deploy.preprocess import preprocess
from gms_deploy.versions import installed

log = logging.getLogger(__name__)

OPSET = 17
PRECISIONS = ("fp32", "fp16")
# protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# Kept FP32 whatever the data range: normalisation statistics (GroupNorm is exported as
# InstanceNormalization), softmax and the output's channel mean. The rest is AutoCast's call.
FP32_OP_TYPES = ("InstanceNormalization", "Softmax", "ReduceMean")
# Real ultrasound frames that ship inside pydicom: the default calibration and validation images.
PYDICOM_ULTRASOUND = ("examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm")
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


class Graph(ABC):
    """A network to export: its tensors and the eager ``GMSModel`` function it must reproduce."""

    name: ClassVar[str]
    output_is_probability: ClassVar[bool] = False

    def __init__(self, model: GMSModel, image_size: int) -> None:
        config = model.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        self.model = model
        self.latent_dims = Latent(config.latent_channels, image_size // factor)
        self.image = TensorSpec.batched("image", 3, image_size)
        self.latent = TensorSpec.batched("latent", self.latent_dims.channels, self.latent_dims.size)
        self.mask_latent = TensorSpec.batched("mask_latent", self.latent_dims.channels, self.latent_dims.size)
        self.prob = TensorSpec.batched("prob", 1, image_size)

    @property
    @abstractmethod
    def input(self) -> TensorSpec: ...

    @property
    @abstractmethod
    def output(self) -> TensorSpec: ...


class TracedGraph(Graph):
    """A graph traced from a PyTorch module of its own."""

    @abstractmethod
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The eager ``GMSModel`` result the exported graph is validated against."""

    @abstractmethod
    def module(self) -> nn.Module:
        """What gets traced: the eager function with constants folded into the weights."""

    def export_fp32(self, path: Path, precise_norm: bool) -> None:
        """Trace to ``path``; ``precise_norm``: GroupNorm as a two-level mean, for the FP32 graphs."""
        sample = torch.zeros((1, *self.input.shape[1:]))
        module = self.module()
        with (
            torch.inference_mode(False),
            torch.no_grad(),
            warnings.catch_warnings(),
            _group_norms_as_two_level_means(module, precise_norm),
        ):
            # diffusers' Up/Downsample2D assert their channels, and Upsample2D branches on the batch
            # (a .contiguous() from 64 images, chunking past 2**31 elements): none changes the result.
            warnings.filterwarnings(
                "ignore", category=torch.jit.TracerWarning, module=r"diffusers\.models\.(up|down)sampling"
            )
            # The two-level GroupNorm reads the group size, which the static spatial size fixes.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=__name__)
            torch.onnx.export(
                module,
                (sample,),
                str(path),
                input_names=[self.input.name],
                output_names=[self.output.name],
                dynamic_axes={self.input.name: {0: BATCH}, self.output.name: {0: BATCH}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )


def _two_level_group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` with each group's statistics as a mean of row means: short float32 sums in ONNX.

    A group of n values is viewed as rows x columns (the divisor of n nearest its square root), so
    no ReduceMean sums more than a few hundred values; mean and variance are two-pass (centred).
    """
    n = x[0].numel() // norm.num_groups
    columns = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    groups = x.reshape(-1, norm.num_groups, n // columns, columns)
    centred = groups - groups.mean(3, keepdim=True).mean(2, keepdim=True)
    variance = (centred * centred).mean(3, keepdim=True).mean(2, keepdim=True)
    normalised = (centred / torch.sqrt(variance + norm.eps)).reshape(-1, *x.shape[1:])
    if not norm.affine:
        return normalised
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return normalised * norm.weight.reshape(shape) + norm.bias.reshape(shape)


@contextmanager
def _group_norms_as_two_level_means(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Every GroupNorm in ``module`` computes ``_two_level_group_norm`` while the block runs."""
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)] if enabled else []
    for norm in norms:
        norm.forward = partial(_two_level_group_norm, norm)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def _scaled_conv(conv: nn.Conv2d, scale: float, out_channels: int | None = None) -> nn.Conv2d:
    """``conv(x)[:, :out_channels] * scale`` as one smaller conv: no slice or Mul left in the graph."""
    out_channels = out_channels or conv.out_channels
    folded = nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        folded.weight.copy_(conv.weight[:out_channels] * scale)
        folded.bias.copy_(conv.bias[:out_channels] * scale)
    return folded


def _input_scaled_conv(conv: nn.Conv2d, scale: float) -> nn.Conv2d:
    """``conv(x * scale)`` as one conv (a 1 x 1 conv, as ``post_quant_conv`` is, or zero padding)."""
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale)
        folded.bias.copy_(conv.bias)
    return folded


class _Encoder(nn.Module):
    def __init__(self, model: GMSModel) -> None:
        super().__init__()
        self.encoder = model.vae.encoder
        channels = model.vae.config.latent_channels
        quant = model.vae.quant_conv
        # Without quant_conv the encoder's first ``channels`` outputs are the mean already.
        self.head = _scaled_conv(quant, model.scale_factor, channels) if quant is not None else None
        self.channels = channels
        self.scale = model.scale_factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.encoder(image)
        return self.head(h) if self.head is not None else h[:, : self.channels] * self.scale


class _Decoder(nn.Module):
    def __init__(self, model: GMSModel) -> None:
        super().__init__()
        post = model.vae.post_quant_conv
        self.head = _input_scaled_conv(post, 1.0 / model.scale_factor) if post is not None else None
        self.decoder = model.vae.decoder
        self.scale = model.scale_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = self.head(latent) if self.head is not None else latent / self.scale
        rgb = self.decoder(z)
        return torch.clamp((rgb.mean(dim=1, keepdim=True) + 1.0) / 2.0, 0.0, 1.0)


class EncoderGraph(TracedGraph):
    name = "encoder"

    @property
    def input(self) -> TensorSpec:
        return self.image

    @property
    def output(self) -> TensorSpec:
        return self.latent

    def module(self) -> nn.Module:
        return _Encoder(self.model).eval()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)


class MapperGraph(TracedGraph):
    name = "mapper"

    @property
    def input(self) -> TensorSpec:
        return self.latent

    @property
    def output(self) -> TensorSpec:
        return self.mask_latent

    def module(self) -> nn.Module:
        return self.model.mapper

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.map(x)


class DecoderGraph(TracedGraph):
    name = "decoder"
    output_is_probability = True

    @property
    def input(self) -> TensorSpec:
        return self.mask_latent

    @property
    def output(self) -> TensorSpec:
        return self.prob

    def module(self) -> nn.Module:
        return _Decoder(self.model).eval()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode(x)


class FusedGraph(Graph):
    """image -> prob in one graph, composed from the three sub-graphs of the same precision.

    Its eager reference is its parts' references chained, which is what ``GMSModel.forward`` does.
    """

    name = "gms"
    output_is_probability = True
    parts: ClassVar[tuple[type[TracedGraph], ...]] = (EncoderGraph, MapperGraph, DecoderGraph)

    @property
    def input(self) -> TensorSpec:
        return self.image

    @property
    def output(self) -> TensorSpec:
        return self.prob

    def compose(self, parts: list[onnx.ModelProto]) -> onnx.ModelProto:
        """Join the part graphs output-to-input; inner names get the part's prefix, I/O keep theirs."""
        prefixed = [
            onnx.compose.add_prefix(part, f"{cls.name}/") for cls, part in zip(self.parts, parts, strict=True)
        ]
        fused = prefixed[0]
        for part in prefixed[1:]:
            link = (fused.graph.output[0].name, part.graph.input[0].name)
            fused = onnx.compose.merge_models(fused, part, io_map=[link])
        _rename(fused.graph, fused.graph.input[0].name, self.input.name)
        _rename(fused.graph, fused.graph.output[0].name, self.output.name)
        fused.graph.name = self.name
        return fused


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


GRAPHS: tuple[type[Graph], ...] = (EncoderGraph, MapperGraph, DecoderGraph, FusedGraph)


def graph_specs(model: GMSModel, settings: Settings) -> dict[str, Graph]:
    return {cls.name: cls(model, settings.image_size) for cls in GRAPHS}


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
    manifest: Path
    graphs: tuple[GraphFile, ...]
    seconds: dict[str, float]
    model: GMSModel = field(repr=False)
    """The eager model the graphs were traced from."""
    frames: list[np.ndarray] = field(repr=False)
    """The real frames (H x W x 3) that calibrated FP16."""
    validation: ValidationReport | None = None


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

    # AutoCast logs every node it keeps FP32 at INFO; show its warnings only, unless debugging.
    level = logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING
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


def default_image_paths() -> list[Path]:
    """Real ultrasound DICOMs that ship inside pydicom: calibration and validation need no user data."""
    from pydicom.data import get_testdata_file

    return [Path(str(get_testdata_file(name))) for name in PYDICOM_ULTRASOUND]


def real_images(paths: Sequence[Path] | None = None, limit: int = 4) -> list[np.ndarray]:
    """H x W x 3 RGB frames for calibration and validation: the first frame of each file, ``limit`` files.

    Defaults to ``default_image_paths()``.
    """
    from gms_deploy.io.inputs import discover, read_frames

    dicom_log = logging.getLogger("gms_deploy.io.dicom")
    level = dicom_log.level
    # Ultrasound regions play no part here; pydicom's examples overhang their images and say so.
    dicom_log.setLevel(logging.ERROR)
    try:
        sources, errors = discover(paths or default_image_paths())
        if errors:
            raise ExportError(str(errors[0]))
        return [next(read_frames(source)).pixels for source in sources[:limit]]
    finally:
        dicom_log.setLevel(level)


def image_batch(images: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack([preprocess(pixels, size) for pixels in images])


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
    """Export every graph in every precision to ``out_dir`` and write its manifest; not validated.

    The manifest is written after every graph, so an interrupted export leaves no directory that
    looks complete. ``validate.run_export`` is the export command: this, then validation.
    """
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not options.overwrite:
        raise ExportError(f"{out_dir}: already holds an export (overwrite replaces it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)

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
    return ExportResult(out_dir, manifest.path, graphs, seconds, model, frames)
