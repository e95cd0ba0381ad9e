"""Eager PyTorch: the reference every other backend is measured against."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gms_deploy.backends.base import BackendError, DeviceRunner
from gms_deploy.bundle import ModelBundle
from gms_deploy.devices import torch_device

Stage = Callable[[torch.Tensor], torch.Tensor]


class TorchRunner(DeviceRunner):
    """FP32, or FP16 autocast on a GPU: the eager baseline a compiler or TensorRT has to beat."""

    name = "torch"
    kind = "eager"

    def __init__(self, bundle: ModelBundle, device: str = "cpu", precision: str | None = None) -> None:
        self.device = torch_device(device)
        self.precision = precision or self.default_precision()
        if self.precision not in ("fp32", "fp16"):
            raise BackendError(f"precision {self.precision!r}: choose from fp32, fp16")
        if self.precision == "fp16" and self.device.type != "cuda":
            raise BackendError(f"{self.name} FP16 needs a CUDA GPU; on a CPU it runs FP32")
        if self.device.type == "cuda" and self.precision == "fp32":
            # FP32 means FP32: PyTorch lets cuDNN convolve in TF32 by default (about 1e-3 off).
            # torch >= 2.9 has fp32_precision, and inductor raises where it is mixed with allow_tf32.
            if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
                torch.backends.cuda.matmul.fp32_precision = "ieee"
                torch.backends.cudnn.conv.fp32_precision = "ieee"
            else:
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        self.settings = bundle.settings
        self.bundle = bundle
        self.model = self._place(bundle.build())
        self._forward = self._wrap(self.model)
        self._stages: dict[str, Stage] = {}

    def default_precision(self) -> str:
        return "fp32"

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def _wrap(self, fn: Stage) -> Stage:
        """``fn`` under inference mode and, in FP16, autocast; FP32 out either way."""

        def run(x: torch.Tensor) -> torch.Tensor:
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, torch.float16, enabled=self.precision == "fp16"),
            ):
                return fn(x).float()

        return run

    @property
    def description(self) -> str:
        return (
            f"torch {torch.__version__} {self.kind} {self.precision.upper()} on {self.device} "
            f"({self.bundle.name})"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(images)[:, 0]

    def stages(self) -> dict[str, Stage]:
        """Wrapped once, on first use: a benchmark asks for them, inference never does."""
        if not self._stages:
            decode = self._wrap(self.model.decode)
            self._stages = {
                "encoder": self._wrap(self.model.encode),
                "mapper": self._wrap(self.model.map),
                "decoder": lambda latent: decode(latent)[:, 0],
            }
        return self._stages
