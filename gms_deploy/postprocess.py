"""Probability map -> mask at the frame's own size, and the mask's area.

The network sees a square ``image_size`` input whatever the frame's shape; the probability map is
resized back bilinearly (the same resize as preprocessing) and only then thresholded, so a mask
edge falls where the probability crosses the threshold, not on the 224 grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gms_deploy.io.frames import UltrasoundRegion
from gms_deploy.resize import resize

Box = tuple[int, int, int, int]


def upsample(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    if prob.shape == (height, width):
        return prob
    return resize(prob.astype(np.float32, copy=False), height, width)


def to_mask(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Strictly greater, as the official ``np.where(x > 0.5, 1, 0)``."""
    return prob > threshold


UNCERTAIN = (0.3, 0.7)
"""Probabilities this close to neither answer count as uncertain."""


def confidence(probs: Any, threshold: float) -> tuple[Any, Any, Any]:
    """Per frame of a B x S x S batch of probabilities (numpy or torch, on any device, so the fused
    path computes it where its probabilities are): the mean probability inside the mask, the mask's
    pixel count (the mean means nothing where it is 0), and the share of uncertain pixels.

    A frame the model knows gives a confident mask (a mean near 1) over few uncertain pixels; a
    frame unlike its training data tends to give many pixels near the threshold instead.
    """
    inside = probs > threshold
    count = inside.sum((1, 2))
    mean_inside = (probs * inside).sum((1, 2)) / count.clip(min=1)
    low, high = UNCERTAIN
    uncertain = (((probs >= low) & (probs <= high)) * 1.0).mean((1, 2))
    return mean_inside, count, uncertain


def roi_box(regions: Sequence[UltrasoundRegion]) -> Box | None:
    """The ultrasound image to segment: the largest 2D tissue region, ignoring Doppler and M-mode.

    A distrusted region gives no crop either: it overran the image because the pixels were rescaled
    or cropped after it was written, so its box sits elsewhere than the tissue (pydicom's halved
    examples_ybr_color.dcm would lose a quarter of its sector). Segmenting the whole frame instead
    loses nothing.
    """
    tissue = [r for r in regions if r.spatial_format == 1 and not r.distrust]
    if not tissue:
        return None
    best = max(tissue, key=lambda r: (r.x1 - r.x0) * (r.y1 - r.y0))
    return best.x0, best.y0, best.x1, best.y1


def paste(mask: np.ndarray, box: Box, height: int, width: int) -> np.ndarray:
    """Place a mask computed on a crop back into the full frame."""
    x0, y0, x1, y1 = box
    full = np.zeros((height, width), dtype=bool)
    full[y0:y1, x0:x1] = mask
    return full


@dataclass(frozen=True)
class Area:
    """A mask's physical area; ``mm2`` None where there is none, and ``why`` (one line) where the file
    claimed a physical size that cannot be trusted, so a blank area is not mistaken for no calibration.
    """

    mm2: float | None
    why: str = ""


def area_mm2(mask: np.ndarray, regions: Sequence[UltrasoundRegion]) -> Area:
    """Mask area in mm^2, counting only pixels inside 2D tissue regions calibrated in cm.

    A pixel inside two regions counts once, with the first region's spacing (DICOM lists regions
    in no particular order, but overlapping calibrated regions do not occur in practice). No area
    where no calibrated region exists: an area in pixels must never pass for one in mm^2. Nor where
    any calibrated region is distrusted: whatever rescaled or cropped the pixels under it may have
    moved or rescaled those under the others, nothing tells which, and an area that may be 4x wrong
    is worse than none.
    """
    calibrated = [r for r in regions if r.is_tissue_2d_cm]
    if not calibrated:
        return Area(None)
    if distrusted := next((r for r in calibrated if r.distrust), None):
        return Area(None, f"{distrusted.distrust}; no area")
    counted = np.zeros(mask.shape, dtype=bool)
    total = 0.0
    for region in calibrated:
        window = np.s_[region.y0 : region.y1, region.x0 : region.x1]
        inside = mask[window] & ~counted[window]
        total += float(inside.sum()) * region.mm2_per_pixel
        counted[window] = True
    return Area(total)
