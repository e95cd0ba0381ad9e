"""Metrics against hand-computed cases, including the empty-mask conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gms_deploy.metrics import dice, hd95, iou


def _masks() -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((6, 6), bool)
    gt = np.zeros((6, 6), bool)
    pred[1:3, 1:4] = True  # 6 pixels
    gt[1:3, 2:5] = True  # 6 pixels, 4 shared
    return pred, gt


def test_dice_and_iou_by_hand() -> None:
    pred, gt = _masks()
    assert dice(pred, gt) == pytest.approx(2 * 4 / (6 + 6))
    assert iou(pred, gt) == pytest.approx(4 / 8)
    assert dice(gt, gt) == 1.0 and iou(gt, gt) == 1.0
    assert dice(pred, ~pred) == 0.0


def test_empty_conventions() -> None:
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    assert dice(empty, empty) == 0.0, "official convention: 0 when the denominator is 0"
    assert iou(empty, empty) == 0.0
    assert dice(empty, empty, empty=1.0) == 1.0 and iou(empty, empty, empty=1.0) == 1.0
    assert dice(empty, full) == 0.0 and iou(full, empty) == 0.0
    assert hd95(empty, empty) == 0.0
    assert math.isinf(hd95(empty, full)) and math.isinf(hd95(full, empty))


def test_hd95_by_hand() -> None:
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    assert hd95(a, a) == 0.0
    shifted = np.roll(a, 3, axis=1)
    # every boundary pixel of one square lies 0 or 3 pixels from the other's boundary; the
    # left/right edges (3 px) dominate the 95th percentile
    assert hd95(a, shifted) == pytest.approx(3.0)
    single = np.zeros((20, 20), bool)
    single[0, 0] = True
    far = np.zeros((20, 20), bool)
    far[0, 4] = True
    assert hd95(single, far) == pytest.approx(4.0)
    assert hd95(a, shifted) == hd95(shifted, a)


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2), bool), np.zeros((3, 3), bool))
