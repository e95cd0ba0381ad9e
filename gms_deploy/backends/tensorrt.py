"""TensorRT: runs the fused ``gms`` engine that ``gms-deploy build`` put in an export directory.

The fused engine rather than the three per-stage ones, for the reasons the ONNX Runtime runner
gives: one context and one launch (one CUDA graph) per batch, no latent handed between engines,
and TensorRT can fuse across the encoder/mapper/decoder seams. The per-stage engines, chained on
device tensors, are ``stages()``: ``gms-deploy bench`` times both, so its ``network`` column
against the sum of its encoder, mapper and decoder columns says which is faster on a given GPU.
Everything that can be checked without a GPU (manifest, TensorRT version, engine hash) is checked
by ``gms_deploy.engines.check_engine`` before TensorRT sees the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gms_deploy.backends.base import DeviceRunner
from gms_deploy.devices import parse_device
from gms_deploy.export_format import BackendError, ExportManifest, GpuInfo

if TYPE_CHECKING:
    from gms_deploy.trt.engine import Engine
    from gms_deploy.trt.flavour import Flavour

GRAPH = "gms"


def load_engine(
    export_dir: Path, graph: str, flavour: Flavour, precision: str, gpu: GpuInfo | None, device: torch.device
) -> Engine:
    """One checked engine of an export, with its runtime cache beside it: what the runner and
    ``build --validate`` run."""
    from gms_deploy.engines import check_engine
    from gms_deploy.trt.engine import Engine, EngineLoadError

    path = check_engine(export_dir, graph, flavour, precision, gpu)
    try:
        # TensorRT for RTX's just-in-time kernels, kept beside the engine for the next process.
        return Engine(flavour, path, device, path.with_suffix(".runtime-cache"))
    except EngineLoadError as err:
        raise BackendError(f"{err}; run `gms-deploy build {export_dir} --rebuild`") from None


def run_sliced(engine: Engine, inputs: torch.Tensor) -> torch.Tensor:
    """Batches beyond the engine's profile run in slices rather than failing."""
    low, high = engine.profile_batches()
    pieces = []
    for chunk in inputs.split(high):
        if len(chunk) < low:
            raise BackendError(f"{engine.path}: the engine needs batches of at least {low}")
        (out,) = engine({engine.inputs[0]: chunk.float()}).values()
        pieces.append(out.float().clone())  # the engine reuses its output buffer
    return torch.cat(pieces)


class TensorRTRunner(DeviceRunner):
    name = "tensorrt"

    def __init__(self, export_dir: Path, device: str = "cuda", precision: str | None = None) -> None:
        precision = precision or "fp16"
        if precision != "fp16":
            raise BackendError(f"--backend tensorrt builds FP16 engines only, not {precision}")
        from gms_deploy.engines import current_gpu
        from gms_deploy.trt import TrtUnavailable, find_flavour

        self.export_dir = Path(export_dir)
        manifest = ExportManifest.read(self.export_dir)
        self.settings = manifest.settings
        self.model_name = manifest.model
        if not torch.cuda.is_available():
            raise BackendError("--backend tensorrt needs a CUDA GPU, and PyTorch sees no GPU here")
        self.device = torch.device("cuda", parse_device(device).index or 0)  # open_runner refused a CPU
        entry = manifest.find_engine(GRAPH, precision)
        try:
            flavour = find_flavour(entry.flavour if entry else "auto")
        except TrtUnavailable as err:
            raise BackendError(str(err)) from None
        self.flavour, self.precision = flavour, precision
        self.gpu = current_gpu(self.device.index or 0)
        self.engine = self._load(GRAPH)
        self._stages: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        where = self.gpu.name if self.gpu else self.device
        self.label = f"{flavour.label} {precision.upper()} fused engine on {where}"

    def _load(self, graph: str) -> Engine:
        return load_engine(self.export_dir, graph, self.flavour, self.precision, self.gpu, self.device)

    @property
    def description(self) -> str:
        return f"{self.label} ({self.model_name}, {self.export_dir})"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.settings.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise BackendError(
                f"{self.export_dir}: expects B x 3 x {size} x {size} images, got {tuple(images.shape)}"
            )
        return run_sliced(self.engine, images)[:, 0]

    def stages(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The per-stage engines chained on device tensors: the fused engine's alternative, timed apart.

        Loaded on first use (a benchmark asks; inference never does), so an export built with the
        fused engine alone still runs.
        """
        if not self._stages:
            engines = {graph: self._load(graph) for graph in ("encoder", "mapper", "decoder")}
            self._stages = {
                "encoder": lambda x: run_sliced(engines["encoder"], x),
                "mapper": lambda z: run_sliced(engines["mapper"], z),
                "decoder": lambda z: run_sliced(engines["decoder"], z)[:, 0],
            }
        return self._stages
