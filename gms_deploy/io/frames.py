"""What the readers hand to the pipeline: one decoded frame with where it came from.

Readers never import a model or a backend; the pipeline never looks at a file format. This module
is the whole contract between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from gms_deploy.errors import GmsError
from gms_deploy.messages import shown


class InputError(GmsError):
    """A file that cannot be turned into frames. ``str()`` is one line naming the file and why."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = " ".join(problem.split())  # decoder messages may span lines; logs and CSV need one
        super().__init__(f"{shown(self.path)}: {self.problem}")


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of DICOM ``SequenceOfUltrasoundRegions``, its box already clipped to the image.

    ``x1``/``y1`` are exclusive (Python slice bounds), unlike DICOM's inclusive Max values.
    ``distrust`` says why neither the box nor the spacing fit these pixels (the file was rescaled
    or cropped after its regions were written: the region overran the image), empty when they do;
    such a region still tells that the file claimed a physical size, so its absence can be explained.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    spatial_format: int
    units_x: int
    units_y: int
    delta_x: float
    delta_y: float
    distrust: str = ""

    @property
    def is_tissue_2d_cm(self) -> bool:
        """Only a 2D tissue region calibrated in cm gives a physical area (PS3.3 C.8.5.5.1)."""
        return (
            self.spatial_format == 1
            and self.units_x == 3
            and self.units_y == 3
            and self.delta_x != 0
            and self.delta_y != 0
        )

    @property
    def mm2_per_pixel(self) -> float:
        return abs(self.delta_x) * abs(self.delta_y) * 100.0


@dataclass(frozen=True)
class Timestamp:
    """Where a video frame sits in its stream: ``pts`` in units of ``time_base`` seconds."""

    pts: int
    time_base: Fraction
    rate: Fraction | None
    """The stream's average frame rate, where it states one."""

    @property
    def seconds(self) -> float:
        return float(self.pts * self.time_base)


@dataclass(frozen=True)
class Frame:
    """One image to segment.

    ``pixels`` is H x W x 3 RGB: ``uint8`` for 8-bit sources (the official path's input, kept
    exact), or ``float32`` in [0, 1] for deeper sources, scaled by their stated bit depth.
    ``rel`` is the source's path relative to the input the user named (that input's own name
    first for a folder), so outputs can mirror the input tree.
    """

    source: Path
    rel: Path
    index: int | None
    pixels: np.ndarray
    regions: tuple[UltrasoundRegion, ...] = field(default=())
    timestamp: Timestamp | None = None
    """A video frame's; its outputs go into videos at the same timestamps."""

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])
