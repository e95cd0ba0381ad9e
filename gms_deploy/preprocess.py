"""Frame pixels -> network input, with the official numerics.

The official path is PIL RGB -> float32 / 255 -> ``cv2.resize(..., INTER_LINEAR)`` (albumentations'
``Resize``) -> 2x - 1. The resize is ``gms_deploy.resize.resize``: OpenCV itself where OpenCV
computes the official numerics (Intel IPP's, on x86-64), the same numerics in torch elsewhere, so
the network input is the official one bit for bit on every platform.
"""

from __future__ import annotations

import numpy as np

from gms_deploy.resize import resize


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 / 255 (the official ``ToFloat``); float input is already in [0, 1]."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    return pixels.astype(np.float32, copy=False)


def preprocess(pixels: np.ndarray, size: int) -> np.ndarray:
    """H x W x 3 RGB -> 3 x size x size float32 in [-1, 1]."""
    resized = resize(to_unit_float(pixels), size, size)
    return np.ascontiguousarray((2.0 * resized - 1.0).transpose(2, 0, 1), dtype=np.float32)
