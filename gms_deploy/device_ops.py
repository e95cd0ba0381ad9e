"""Pre- and postprocessing in torch, on any device, with the CPU path's numerics to the last bit.

The fused GPU pipeline must not drift from ``gms_deploy.preprocess`` / ``gms_deploy.postprocess``: a
mask pixel whose probability sits near the threshold flips on a one-ulp difference, and a bilinear
resize of another flavour (``torch.nn.functional.interpolate``) moves probabilities by up to 5e-4.
So this module reproduces what ``cv2.resize(..., INTER_LINEAR)`` on float32 computes here, not
merely the same formula, and then the GPU and CPU paths give the same masks.

What that is, measured against the installed OpenCV (5.x, x86-64 wheel with Intel IPP): float32
INTER_LINEAR runs in IPP's ``ippiResizeLinear`` (OpenCV's own separable loop only runs where IPP is
off or absent, e.g. on ARM), which computes

- per output column/row the source coordinate ``x = (d + 0.5) * (src / dst) - 0.5`` in double,
  clamped to ``[0, src - 1]`` (border replicate), tap ``i = floor(x)``, weight ``t = float32(x - i)``;
- the horizontal pass, then the vertical one, each as ``fma(t, b - a, a)`` with ``b - a`` rounded
  to float32 first and the multiply-add rounded once (FMA kernels on AVX2/AVX-512 CPUs);
- an equal source and destination size as a plain copy; an exact 2x downscale is no special case
  (IPP takes it before OpenCV's own code could turn it into INTER_AREA).

A source with a single row or column is declined by IPP and goes through OpenCV's own separable loop
instead: coordinate ``float32((d + 0.5) * (1 / (dst / src)) - 0.5)``, weights ``1 - f`` and ``f`` in
float32 (the horizontal ones zeroed past the edges, the vertical ones not), ``a * w0 + b * w1``
rounded twice. That loop's float32 coordinate drifts by up to ~1e-5 at a few hundred pixels, so
the two regimes must not be mixed up.

Bit-exact with cv2 here on every shape tested, 1 channel (probabilities) and 3 channels (frames):
downscale, upscale, exact 2x downscale, very thin frames, single rows and columns; with one bound.
IPP's 3-channel kernel, where 5 or more output columns on a side replicate the border (a width
upscale of more than 9x, i.e. a frame under 25 pixels wide), rounds the vertical step of channels
0 and 1 twice in some of those columns (which ones follows its vector blocking); there the results
differ by up to 2^-24 (6e-8) as measured, 2^-23 at most for data in [0, 1]. IPP picks its kernels
by CPU: these numerics are its FMA ones; on a CPU without FMA cv2 itself would round otherwise.
"""

from __future__ import annotations

import functools

import torch

# uint8 -> float32 / 255, rounded as numpy's (and torch's CPU) float32 division rounds it; a table
# rather than a division because CUDA divides by a scalar as a multiply by its reciprocal.
_UNIT_TABLE = torch.arange(256, dtype=torch.float32) / 255.0


@functools.lru_cache(maxsize=64)
def _taps(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPP's left/right source indices and float32 weights of each destination pixel along one axis.

    Computed once per (src, dst, device) on the CPU in float64, as IPP computes them, then moved.
    """
    x = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp(0.0, src - 1.0)
    left = x.floor()
    weight = (x - left).to(torch.float32)
    left = left.to(torch.int64)
    right = (left + 1).clamp(max=src - 1)
    return left.to(device), right.to(device), weight.to(device)


@functools.lru_cache(maxsize=16)
def _opencv_taps(
    src: int, dst: int, zero_past_edges: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV's own indices and weights (w0, w1) along one axis, with its float32 coordinate.

    Its horizontal weights become (1, 0) past the edges, its vertical ones keep the fraction while
    the rows clamp (``zero_past_edges`` False): that is what its output shows.
    """
    fx = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (1.0 / (dst / src)) - 0.5).to(torch.float32)
    sx = fx.floor()
    fx = fx - sx
    if zero_past_edges:
        fx = torch.where((sx < 0) | (sx >= src - 1), 0.0, fx)
    left = sx.to(torch.int64)
    right = (left + 1).clamp(0, src - 1)
    return left.clamp(0, src - 1).to(device), right.to(device), (1.0 - fx).to(device), fx.to(device)


@functools.lru_cache(maxsize=8)
def _unit_table(device: torch.device) -> torch.Tensor:
    return _UNIT_TABLE.to(device)


def _fma(t: torch.Tensor, d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """float32 ``t * d + a`` rounded once, as a hardware FMA, on any device.

    The float32 product is exact in float64, but the float64 sum rounded again to float32 could
    land on a float32 tie that the exact sum is not on (double rounding). The sum is therefore
    rounded to odd (the float64 neighbour with an odd last bit when inexact, from the exact error
    of a two-sum), which makes the final rounding to float32 the correctly rounded one.
    """
    a64 = a.to(torch.float64)
    p = t.to(torch.float64) * d.to(torch.float64)
    s = a64 + p
    pb = s - a64
    err = (a64 - (s - pb)) + (p - pb)
    bits = s.view(torch.int64)
    step = torch.where((err > 0) == (s > 0), 1, -1)
    bits = torch.where((err != 0) & (bits % 2 == 0), bits + step, bits)
    return bits.view(torch.float64).to(torch.float32)


def _lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _fma(t, b - a, a)


def resize_linear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x C x H x W float32 -> N x C x height x width float32, OpenCV INTER_LINEAR's numerics.

    The input itself is returned where the size does not change, as OpenCV copies it.
    """
    if x.dtype != torch.float32 or x.dim() != 4:
        raise ValueError(f"expected an N x C x H x W float32 tensor, got {x.dtype} {tuple(x.shape)}")
    src_h, src_w = x.shape[-2:]
    if (src_h, src_w) == (height, width):
        return x
    if min(src_h, src_w) == 1:
        return _resize_single_line(x, height, width)
    left, right, tx = _taps(src_w, width, x.device)
    rows = _lerp(x.index_select(3, left), x.index_select(3, right), tx)
    top, bottom, ty = _taps(src_h, height, x.device)
    return _lerp(rows.index_select(2, top), rows.index_select(2, bottom), ty[:, None])


def _resize_single_line(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """OpenCV's own loop, which runs where IPP declines a source with a single row or column."""
    left, right, w0, w1 = _opencv_taps(x.shape[3], width, True, x.device)
    rows = x.index_select(3, left) * w0 + x.index_select(3, right) * w1
    top, bottom, w0, w1 = _opencv_taps(x.shape[2], height, False, x.device)
    return rows.index_select(2, top) * w0[:, None] + rows.index_select(2, bottom) * w1[:, None]


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
