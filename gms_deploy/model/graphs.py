"""The GMS sub-models as graphs to export: each declares its tensors and the eager step it reproduces.

In the spirit of TensorRT's demo/Diffusion ``models.py``, one class per sub-model:

* ``encoder``: image in [-1, 1] -> scaled latent mean (``quant_conv`` sliced to the mean and x scale)
* ``mapper``:  latent -> mask latent (the ``out`` head)
* ``decoder``: mask latent -> probability (/ scale folded into ``post_quant_conv``; channel mean,
  (x + 1) / 2 and clamp inside)
* ``gms``:     image -> probability, the three graphs above joined into one (one-engine deployment)

Each traced module is ``GMSModel``'s own step with its constant scales folded into a convolution's
weights, and ends in the same ``probability`` function; its ``reference`` is the ``GMSModel`` method
that export validation and ``build --validate`` hold the graph to.

GroupNorm is traced twice. For FP16 (and so TensorRT) it exports as InstanceNormalization, the
form TensorRT runs as one normalisation kernel and AutoCast keeps FP32. The FP32 graphs, which
ONNX Runtime's CPU provider runs, get a two-level mean instead (``_two_level_group_norm``):
that provider's InstanceNormalization sums each group (50,176 values at 224 x 224) in one float32
accumulator, a relative error of ~5e-5 at the VAE's first GroupNorm (PyTorch: 1e-7) that the
mapper's attention amplifies (fused FP32 graph against float64 PyTorch on the parity fixture's
frames: 1.19e-3 with InstanceNormalization, 2.4e-5 with the two-level mean).
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from gms_deploy.export_format import BATCH, Latent, TensorSpec
from gms_deploy.model.gms import GMSModel, probability
from gms_deploy.settings import Settings

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)
OPSET = 17


class Graph(ABC):
    """A network to export: its tensors and the eager ``GMSModel`` function it must reproduce."""

    name: ClassVar[str]
    io: ClassVar[tuple[str, str]]
    """The names of its input and output among the tensors below (``image``, ``latent``, ...)."""

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
    def input(self) -> TensorSpec:
        return getattr(self, self.io[0])

    @property
    def output(self) -> TensorSpec:
        return getattr(self, self.io[1])

    @property
    def output_is_probability(self) -> bool:
        return self.io[1] == "prob"


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
            if not log.isEnabledFor(logging.INFO):  # torch's notes on slices it cannot fold: noise but for -v
                warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
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
        return probability(self.decoder(z))


class EncoderGraph(TracedGraph):
    name = "encoder"
    io = ("image", "latent")

    def module(self) -> nn.Module:
        return _Encoder(self.model).eval()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)


class MapperGraph(TracedGraph):
    name = "mapper"
    io = ("latent", "mask_latent")

    def module(self) -> nn.Module:
        return self.model.mapper

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.map(x)


class DecoderGraph(TracedGraph):
    name = "decoder"
    io = ("mask_latent", "prob")

    def module(self) -> nn.Module:
        return _Decoder(self.model).eval()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode(x)


class FusedGraph(Graph):
    """image -> prob in one graph, composed from the three sub-graphs of the same precision.

    Its eager reference is its parts' references chained, which is what ``GMSModel.forward`` does.
    """

    name = "gms"
    io = ("image", "prob")
    parts: ClassVar[tuple[type[TracedGraph], ...]] = (EncoderGraph, MapperGraph, DecoderGraph)

    def compose(self, parts: list[onnx.ModelProto]) -> onnx.ModelProto:
        """Join the part graphs output-to-input; inner names get the part's prefix, I/O keep theirs."""
        import onnx

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
