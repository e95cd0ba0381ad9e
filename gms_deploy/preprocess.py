"""Frame pixels -> network input, with the official numerics.

The official path is PIL RGB -> float32 / 255 -> ``cv2.resize(..., INTER_LINEAR)`` (albumentations'
``Resize``) -> 2x - 1. The CPU path below calls the same OpenCV function on the same float32
values, so it is bit-exact with the official code, not merely close. (On x86-64 OpenCV computes
float32 INTER_LINEAR in Intel IPP; ``device_ops`` reproduces those numerics on the GPU bit for bit.)
"""

from __future__ import annotations

import cv2
import numpy as np


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 / 255 (the official ``ToFloat``); float input is already in [0, 1]."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    return pixels.astype(np.float32, copy=False)


def preprocess(pixels: np.ndarray, size: int) -> np.ndarray:
    """H x W x 3 RGB -> 3 x size x size float32 in [-1, 1]."""
    resized = cv2.resize(to_unit_float(pixels), (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray((2.0 * resized - 1.0).transpose(2, 0, 1), dtype=np.float32)
