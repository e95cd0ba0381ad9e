"""The one interface every backend implements.

As in polygraphy, a runner is built from a lazy loader and then called on batches; what it runs
(eager PyTorch, ONNX Runtime, a TensorRT engine) is its own business. Input and output handling,
batching and writing live in the driver and are shared by all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from gms_deploy.bundle import Settings


class BackendError(Exception):
    """A backend that cannot run here or cannot load its model; ``str()`` is one line."""


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
