"""Eager PyTorch: the reference every other backend is measured against."""

from __future__ import annotations

import numpy as np
import torch

from gms_deploy.backends.base import BackendError, Runner
from gms_deploy.bundle import ModelBundle


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, bundle: ModelBundle, device: str = "cpu") -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"--device {device}: PyTorch sees no CUDA GPU here")
        self.settings = bundle.settings
        self.device = torch.device(device)
        self.model = bundle.build().to(self.device)
        self.bundle = bundle

    @property
    def description(self) -> str:
        return f"torch {torch.__version__} eager FP32 on {self.device} ({self.bundle.name})"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        prob = self.model(torch.from_numpy(images).to(self.device))
        return prob[:, 0].float().cpu().numpy()
