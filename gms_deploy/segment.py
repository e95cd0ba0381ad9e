"""Frames in, masks out: the two ways a batch goes through a runner.

``HostSegmenter`` is the reference path: ``preprocess`` and ``postprocess`` on the CPU around any
runner, numpy in and out. ``FusedSegmenter`` keeps everything between the uint8 frame and the
uint8 mask on the runner's device: frames go up through one pinned staging buffer, are converted,
resized and normalised there (``device_ops``), run through the network, resized back to each
frame's size and thresholded, and only the masks come down. Both resize with ``gms_deploy.resize``,
so both give the same masks; the fused one saves the host work and the copies of float tensors
that the host path spends around a GPU network (how much: ``gms-deploy bench``'s pre and post
columns, not yet measured on a GPU). On a GPU its pre- and postprocessing replay as CUDA graphs
(``gms_deploy.cuda_graphs``), which is what makes exact resizing cheap at small batches.

Both split a batch that does not fit in GPU memory and keep to the size that fitted.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gms_deploy.backends.base import DeviceRunner, Runner
from gms_deploy.cuda_graphs import Graphed
from gms_deploy.device_ops import frame_masks, preprocess_frames
from gms_deploy.postprocess import confidence, to_mask, upsample
from gms_deploy.preprocess import preprocess

log = logging.getLogger(__name__)

ALIGN = 16
TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}


@dataclass
class Segmentation:
    mask: np.ndarray
    """H x W bool at the frame's size."""
    prob: np.ndarray | None
    """S x S float32 at the network's size, where asked for."""
    finite: bool = True
    """False where the network gave NaN or Inf (an FP16 overflow, broken weights): the mask means nothing."""
    confidence: float | None = None
    """The mean probability inside the mask at the network's size; None where the mask is empty."""
    uncertain: float = 0.0
    """The share of the network-size probabilities between 0.3 and 0.7 (``postprocess.UNCERTAIN``)."""


def _segmentations(
    masks: Sequence[np.ndarray], probs: Sequence[np.ndarray | None], finite: Sequence[bool], stats: Any
) -> list[Segmentation]:
    """Each frame's result, with ``confidence``'s three per-frame arrays (on the host)."""
    means, counts, uncertain = (np.asarray(s, dtype=np.float64) for s in stats)
    return [
        Segmentation(mask, prob, bool(ok), float(mean) if count else None, float(share))
        for mask, prob, ok, mean, count, share in zip(
            masks, probs, finite, means, counts, uncertain, strict=True
        )
    ]


class Segmenter(ABC):
    """Three phases a benchmark can time apart: network inputs, the network, masks.

    ``prepare`` runs on the reader thread, one frame at a time; the rest on a batch of prepared frames.
    """

    runner: Runner

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.max_batch: int | None = None

    @abstractmethod
    def prepare(self, pixels: np.ndarray) -> Any:
        """H x W x 3 uint8 RGB -> what ``network_inputs`` takes for this frame."""

    @abstractmethod
    def network_inputs(self, batch: Sequence[Any]) -> Any:
        """Prepared frames -> the runner's B x 3 x S x S input."""

    @abstractmethod
    def network(self, inputs: Any) -> Any:
        """The runner's input -> B x S x S probabilities, where the runner keeps them."""

    @abstractmethod
    def masks(
        self, probs: Any, batch: Sequence[Any], threshold: float, keep_prob: bool
    ) -> list[Segmentation]:
        """Probabilities -> each frame's mask on the host, in order."""

    def segment(self, batch: Sequence[Any], threshold: float, keep_prob: bool = False) -> list[Segmentation]:
        """One batch that fits."""
        with torch.inference_mode():
            return self.masks(self.network(self.network_inputs(batch)), batch, threshold, keep_prob)

    def __call__(self, batch: Sequence[Any], threshold: float, keep_prob: bool = False) -> list[Segmentation]:
        """Segment ``batch`` in order, halving it as often as GPU memory requires."""
        step = min(len(batch), self.max_batch or len(batch))
        done: list[Segmentation] = []
        while len(done) < len(batch):
            chunk = batch[len(done) : len(done) + step]
            try:
                done += self.segment(chunk, threshold, keep_prob)
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise
                torch.cuda.empty_cache()
                failed, step = step, step // 2
                self.max_batch = step
                log.warning("GPU out of memory at batch size %d: going on with batches of %d", failed, step)
        return done


class HostSegmenter(Segmenter):
    """Pre- and postprocessing on the CPU around any runner: the official numerics, by construction."""

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return preprocess(pixels, self.runner.settings.image_size), pixels.shape[:2]

    def network_inputs(self, batch: Sequence[tuple[np.ndarray, tuple[int, int]]]) -> np.ndarray:
        return np.stack([image for image, _ in batch])

    def network(self, inputs: np.ndarray) -> np.ndarray:
        return self.runner(inputs)

    def masks(
        self,
        probs: np.ndarray,
        batch: Sequence[tuple[np.ndarray, tuple[int, int]]],
        threshold: float,
        keep_prob: bool,
    ) -> list[Segmentation]:
        masks = [
            to_mask(upsample(prob, *shape), threshold) for prob, (_, shape) in zip(probs, batch, strict=True)
        ]
        kept = list(probs) if keep_prob else [None] * len(batch)
        finite = [bool(np.isfinite(prob).all()) for prob in probs]
        return _segmentations(masks, kept, finite, confidence(np.asarray(probs), threshold))


class FusedSegmenter(Segmenter):
    """Everything from uint8 frame to uint8 mask on the runner's device."""

    runner: DeviceRunner

    def __init__(self, runner: DeviceRunner) -> None:
        super().__init__(runner)
        self.device = runner.device
        self._staging: dict[str, torch.Tensor] = {}
        self._uploaded: torch.cuda.Event | None = None  # the last copy up from the "frames" buffer
        self._preprocess = Graphed(preprocess_frames)
        self._masks = Graphed(frame_masks)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """uint8, or float32 in [0, 1] for deeper sources: sent to the device as they are."""
        return np.ascontiguousarray(pixels)

    def _host_buffer(self, role: str, size: int) -> torch.Tensor:
        """A reusable (pinned, on a GPU) byte buffer, so copies are asynchronous and allocation-free."""
        buffer = self._staging.get(role)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(max(size, 1 << 20), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._staging[role] = buffer
        return buffer[:size]

    def network_inputs(self, batch: Sequence[np.ndarray]) -> torch.Tensor:
        """One copy up for the whole batch; each frame's bytes start 16-aligned so float32 views work.

        Frames of one size and type (a cart's frames all are) are resized together.
        """
        starts = np.cumsum([0] + [-(-frame.nbytes // ALIGN) * ALIGN for frame in batch])
        if self._uploaded is not None:  # the last copy up may still read the pinned buffer
            self._uploaded.synchronize()
        staging = self._host_buffer("frames", int(starts[-1]))
        host = staging.numpy()
        for frame, start in zip(batch, starts, strict=False):
            host[start : start + frame.nbytes] = frame.reshape(-1).view(np.uint8)
        on_device = staging.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        frames = [
            on_device[start : start + frame.nbytes].view(TORCH_DTYPES[frame.dtype]).view(frame.shape)
            for frame, start in zip(batch, starts, strict=False)
        ]
        size = self.runner.settings.image_size
        images = torch.empty((len(batch), 3, size, size), device=self.device)
        for indices in _alike(batch, with_dtype=True):
            images[_rows(indices)] = self._preprocess(torch.stack([frames[i] for i in indices]), size)
        return images

    def network(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.runner.forward(inputs).float()

    def masks(
        self, probs: torch.Tensor, batch: Sequence[np.ndarray], threshold: float, keep_prob: bool
    ) -> list[Segmentation]:
        masks: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        for indices in _alike(batch, with_dtype=False):  # one replay per size
            height, width = batch[indices[0]].shape[:2]
            group = self._masks(probs[_rows(indices)], height, width, threshold)
            for i, mask in zip(indices, group, strict=True):
                masks[i] = mask.reshape(-1)
        # One byte per frame rides with the masks: whether its probabilities were all finite.
        flat = torch.cat([*masks, torch.isfinite(probs).flatten(1).all(1).to(torch.uint8)])
        staging = self._host_buffer("masks", flat.numel())
        staging.copy_(flat, non_blocking=True)
        stats = torch.stack([s.float() for s in confidence(probs, threshold)]).cpu().numpy()  # synchronises
        kept = probs.cpu().numpy() if keep_prob else [None] * len(batch)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        *pieces, finite = staging.split([mask.numel() for mask in masks] + [len(batch)])
        frames = [
            piece.numpy().reshape(frame.shape[:2]).astype(bool)
            for piece, frame in zip(pieces, batch, strict=True)
        ]
        return _segmentations(frames, list(kept), [bool(ok) for ok in finite.tolist()], stats)


def _alike(batch: Sequence[np.ndarray], with_dtype: bool) -> list[list[int]]:
    """Indices of the batch's frames grouped by shape and type, or by height and width alone.

    In order of first appearance.
    """
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, frame in enumerate(batch):
        groups.setdefault((frame.shape, frame.dtype) if with_dtype else frame.shape[:2], []).append(i)
    return list(groups.values())


def _rows(indices: list[int]) -> slice | list[int]:
    """A slice where the rows are contiguous (a cart's batch always is).

    A list index is copied up from pageable memory on every use; a slice is not.
    """
    if indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0], indices[-1] + 1)
    return indices


def segmenter_for(runner: Runner, fused: bool | None = None) -> Segmenter:
    """The fused path for device runners on a GPU (or where asked, as tests do on a CPU), else the host."""
    if fused is None:
        fused = isinstance(runner, DeviceRunner) and runner.device.type == "cuda"
    if fused and not isinstance(runner, DeviceRunner):
        raise ValueError(f"{runner.name} computes on numpy arrays; the fused pipeline needs a torch runner")
    return FusedSegmenter(runner) if fused else HostSegmenter(runner)
