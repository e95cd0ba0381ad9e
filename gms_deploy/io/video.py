"""Video files in and out through PyAV (FFmpeg): clips from a cart become frames, masks become video.

Frames are decoded one at a time, as a DICOM cine's are, so a long clip never sits in memory
whole. Each keeps its presentation timestamp in the stream's own time base, so the mask video is
written at the input's timestamps exactly, not at a rounded frame rate. Masks go into FFV1 (lossless,
grey) in Matroska, so a mask read back from ``clip_mask.mkv`` is the mask; the overlay, for people,
is H.264 in MP4. Each video is written to a temporary name and renamed once closed, so a video
output is complete or absent. PyAV is the ``video`` extra; without it a video input fails in one
line that says how to install it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from gms_deploy.io.frames import InputError, Timestamp
from gms_deploy.messages import reason

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"})
INSTALL = "pip install 'gms-deploy[video]'"


def _av() -> Any:
    try:
        import av
    except ImportError:
        return None
    return av


def _open(path: Path) -> Any:
    av = _av()
    if av is None:
        raise InputError(path, f"a video, and reading video needs PyAV: {INSTALL}")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise InputError(path, f"cannot open video: {reason(err)}") from None
    if not container.streams.video:
        container.close()
        raise InputError(path, "holds no video stream")
    return container


def video_frame_count(path: Path) -> int | None:
    """The frames the container says its video stream holds; None where it does not say."""
    try:
        container = _open(path)
    except InputError:
        return None
    with container:
        return container.streams.video[0].frames or None


def iter_video_frames(path: Path) -> Iterator[tuple[int, np.ndarray, Timestamp]]:
    """(index, H x W x 3 uint8 RGB, timestamp) for every frame of the first video stream, in order."""
    av = _av()
    container = _open(path)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = stream.time_base or Fraction(1, 90_000)
        rate = stream.average_rate
        index = 0
        try:
            for frame in container.decode(stream):
                pts = frame.pts if frame.pts is not None else index
                yield index, frame.to_ndarray(format="rgb24"), Timestamp(pts, time_base, rate)
                index += 1
        except av.error.FFmpegError as err:
            raise InputError(path, f"cannot decode frame {index}: {reason(err)}") from None


class VideoWriter:
    """One output video, frames added in order with their source timestamps, renamed into place on
    ``close``. ``kind`` ``mask`` is grey FFV1 in Matroska; ``overlay`` is RGB as H.264 in MP4."""

    def __init__(self, path: Path, kind: str, first: Timestamp, height: int, width: int) -> None:
        av = _av()
        if av is None:
            raise InputError(path, f"writing video needs PyAV: {INSTALL}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        self._kind = kind
        self._container = av.open(str(self._temp), "w", format="matroska" if kind == "mask" else "mp4")
        rate = first.rate or Fraction(25)
        codec, pixel_format = ("ffv1", "gray") if kind == "mask" else ("libx264", "yuv420p")
        self._stream = self._container.add_stream(codec, rate=rate)
        even = kind != "mask"  # H.264 in 4:2:0 needs even sides
        self._stream.width = width + (width % 2 if even else 0)
        self._stream.height = height + (height % 2 if even else 0)
        self._stream.pix_fmt = pixel_format
        self._stream.time_base = first.time_base
        self._last_pts: int | None = None

    def add(self, image: np.ndarray, when: Timestamp) -> None:
        """A bool mask (written 0/255) or an RGB uint8 overlay, at ``when``."""
        av = _av()
        if self._kind == "mask":
            frame = av.VideoFrame.from_ndarray(np.asarray(image, dtype=np.uint8) * 255, format="gray")
        else:  # to even sides, the last row or column repeated
            height, width = self._stream.height, self._stream.width
            padded = np.pad(
                image, ((0, height - image.shape[0]), (0, width - image.shape[1]), (0, 0)), "edge"
            )
            frame = av.VideoFrame.from_ndarray(padded, format="rgb24")
        pts = when.pts if self._last_pts is None or when.pts > self._last_pts else self._last_pts + 1
        frame.pts, frame.time_base = pts, when.time_base
        self._last_pts = pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Flush, finish the file and rename it into place."""
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        os.replace(self._temp, self.path)

    def abort(self) -> None:
        """Drop a video that will not be finished (a failed write)."""
        try:
            self._container.close()
        finally:
            self._temp.unlink(missing_ok=True)
