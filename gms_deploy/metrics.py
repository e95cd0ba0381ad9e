"""Per-image segmentation metrics on boolean masks, with the official code's conventions.

The official evaluation computes DSC = 2TP / (2TP + FP + FN) and IoU = TP / (TP + FP + FN) per
image and averages over images. When both masks are empty the denominator is 0; the official
code then scores 0 (an image with no lesion can never score), and so do these functions by
default, so that numbers compare with the paper. Pass ``empty=1.0`` to score a correctly empty
prediction as perfect instead (what most later work does); either way, say which you used.

HD95 is in pixels: the 95th percentile of the distances from each mask's boundary pixels to the
other mask's boundary, both directions pooled (MedPy's ``hd95``). It is 0 when both masks are
empty and ``inf`` when exactly one is: no finite distance exists. Distances come from OpenCV's
exact Euclidean distance transform, so no SciPy is needed.
"""

from __future__ import annotations

import cv2
import numpy as np


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray, empty: float = 0.0) -> float:
    """2TP / (2TP + FP + FN); ``empty`` when both masks are empty."""
    pred, gt = _pair(pred, gt)
    tp = np.count_nonzero(pred & gt)
    denominator = np.count_nonzero(pred) + np.count_nonzero(gt)
    return empty if denominator == 0 else 2.0 * tp / denominator


def iou(pred: np.ndarray, gt: np.ndarray, empty: float = 0.0) -> float:
    """TP / (TP + FP + FN); ``empty`` when both masks are empty."""
    pred, gt = _pair(pred, gt)
    union = np.count_nonzero(pred | gt)
    return empty if union == 0 else np.count_nonzero(pred & gt) / union


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the image edge counts as outside)."""
    padded = np.pad(mask, 1).astype(np.uint8)
    eroded = cv2.erode(padded, np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8))[1:-1, 1:-1]
    return mask & ~eroded.astype(bool)


def _distances_to(boundary: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest pixel of ``boundary``."""
    source = np.where(boundary, 0, 255).astype(np.uint8)
    return cv2.distanceTransform(source, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels (2-D masks)."""
    pred, gt = _pair(pred, gt)
    if pred.ndim != 2:
        raise ValueError(f"hd95 takes 2-D masks, got shape {pred.shape}")
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return float("inf")
    pred_edge, gt_edge = _boundary(pred), _boundary(gt)
    pooled = np.concatenate([_distances_to(gt_edge)[pred_edge], _distances_to(pred_edge)[gt_edge]])
    return float(np.percentile(pooled, 95))
