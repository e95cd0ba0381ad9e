"""OpenCV's float32 ``INTER_LINEAR`` resize exactly as the official code computed it, on any device.

Both the CPU path (``preprocess``, ``postprocess``) and the fused GPU path (``device_ops``) resize
with this module, so their masks agree to the last bit: a mask pixel near the threshold flips on a
one-ulp difference, and another flavour of bilinear (``torch.nn.functional.interpolate``) moves
probabilities by up to 5e-4. ``resize`` calls OpenCV where OpenCV computes these numerics, and the
torch version, ``resize_linear``, everywhere else.

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

import cv2
import numpy as np
import torch


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W (x C) float32 -> height x width (x C): the official resize, on every platform.

    OpenCV itself where it computes IPP's numerics (its x86-64 wheels, fast); elsewhere (ARM, or
    IPP switched off) the same numerics in torch on the CPU, slower but identical. Measured on the
    parity fixture: the official probabilities are 3.3e-6 from ours with IPP's numerics and 4.6e-5
    with OpenCV's own loop, so IPP's are the official ones.
    """
    if cv2.ipp.useIPP():
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        return resized.reshape(height, width, *image.shape[2:])
    planes = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    planes = planes[None, None] if image.ndim == 2 else planes.permute(2, 0, 1)[None]
    out = resize_linear(planes, height, width)[0]
    return (out[0] if image.ndim == 2 else out.permute(1, 2, 0)).contiguous().numpy()


@functools.cache
def _taps(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPP's left/right source indices and float32 weights of each destination pixel along one axis.

    Computed once per (src, dst, device) on the CPU in float64, as IPP computes them, then moved.
    Kept for the process (a few bytes per pixel of one axis): CUDA graphs that replay a resize
    (``gms_deploy.cuda_graphs``) read them at the addresses they had when captured.
    """
    x = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp(0.0, src - 1.0)
    left = x.floor()
    weight = (x - left).to(torch.float32)
    left = left.to(torch.int64)
    right = (left + 1).clamp(max=src - 1)
    return left.to(device), right.to(device), weight.to(device)


@functools.cache  # kept for the process, as ``_taps``
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
