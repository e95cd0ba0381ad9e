"""The one interface every backend implements.

As in polygraphy, a runner is built from a lazy loader and then called on batches; what it runs
(eager PyTorch, ONNX Runtime, a TensorRT engine) is its own business. Input and output handling,
batching and writing live in the driver and are shared by all of them.

Runners that compute on torch tensors are ``DeviceRunner``s as well: the fused pipeline hands them
device-resident batches and takes device-resident probabilities back, so that on a GPU nothing but
uint8 frames goes up and uint8 masks come down.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from gms_deploy.errors import BackendError

if TYPE_CHECKING:
    from gms_deploy.settings import Settings

__all__ = ["BackendError", "DeviceRunner", "Runner"]


class Runner(ABC):
    """Batch of preprocessed images -> batch of probability maps at the network's size."""

    name: ClassVar[str]
    settings: Settings

    @abstractmethod
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """B x 3 x S x S float32 in [-1, 1] -> B x S x S float32 in [0, 1]."""

    @property
    def description(self) -> str:
        """What runs, on what: printed once so a user knows which path their frames took."""
        return self.name


class DeviceRunner(Runner):
    """A runner whose batches live on ``device`` as torch tensors."""

    device: torch.device

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S float32 on ``device`` -> B x S x S float32 on ``device``, not yet synchronised."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.forward(torch.from_numpy(images).to(self.device)).float().cpu().numpy()

    def stages(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """``encoder``, ``mapper`` and ``decoder`` as separate calls, chaining to ``forward``'s result.

        Only a benchmark's per-stage breakdown uses them; empty where the backend runs one fused graph.
        """
        return {}
