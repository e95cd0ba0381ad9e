"""Pre- and postprocessing in torch on the GPU (any device), with the CPU path's numerics to the last bit.

The fused GPU pipeline must not drift from ``gms_deploy.preprocess`` / ``gms_deploy.postprocess``: a
mask pixel whose probability sits near the threshold flips on a one-ulp difference. So both paths
resize with ``gms_deploy.resize`` (OpenCV's float32 INTER_LINEAR as IPP computes it, reproduced in
torch), and the /255 and the threshold round as numpy does.
"""

from __future__ import annotations

import functools

import torch

from gms_deploy.resize import resize_linear

# uint8 -> float32 / 255, rounded as numpy's (and torch's CPU) float32 division rounds it; a table
# rather than a division because CUDA divides by a scalar as a multiply by its reciprocal.
_UNIT_TABLE = torch.arange(256, dtype=torch.float32) / 255.0


@functools.cache  # kept for the process: CUDA graphs read it where it was when they were captured
def _unit_table(device: torch.device) -> torch.Tensor:
    return _UNIT_TABLE.to(device)


def preprocess_frames(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """... x H x W x 3 uint8 (or float32 in [0, 1]) -> ... x 3 x size x size float32 in [-1, 1].

    The same numerics as ``gms_deploy.preprocess.preprocess``: /255 in float32, the resize, 2x - 1.
    Leading axes batch frames of one size into one resize, so a batch costs the kernels of a frame.
    """
    if pixels.dtype == torch.uint8:
        unit = _unit_table(pixels.device)[pixels.to(torch.int64)]
    else:
        unit = pixels.to(torch.float32)
    planes = unit.reshape(-1, *unit.shape[-3:]).permute(0, 3, 1, 2)
    resized = resize_linear(planes, size, size).reshape(*unit.shape[:-3], 3, size, size)
    return (2.0 * resized - 1.0).contiguous()


def upsample_probs(prob: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """... x S x S float32 probabilities -> ... x height x width, as ``gms_deploy.postprocess.upsample``.

    The map itself where it already has that size, as the CPU path returns it unchanged.
    """
    if tuple(prob.shape[-2:]) == (height, width):
        return prob
    planes = prob.to(torch.float32).reshape(-1, 1, *prob.shape[-2:])
    return resize_linear(planes, height, width).reshape(*prob.shape[:-2], height, width)


def masks_from_probs(prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask, strictly greater than the threshold, as ``gms_deploy.postprocess.to_mask``.

    A Python float threshold is compared in the map's dtype by torch as by numpy 2, so a pixel equal
    to float32(threshold) is background on both paths.
    """
    return prob > threshold


def frame_masks(prob: torch.Tensor, height: int, width: int, threshold: float) -> torch.Tensor:
    """... x S x S probabilities -> ... x height x width uint8 (0/1) masks: the fused postprocessing."""
    return masks_from_probs(upsample_probs(prob, height, width), threshold).to(torch.uint8)
