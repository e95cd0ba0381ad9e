"""Preprocessing equals the official recipe; postprocessing's ROI and area rules."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from gms_deploy.io.dicom import iter_dicom_frames
from gms_deploy.io.frames import UltrasoundRegion
from gms_deploy.postprocess import Area, area_mm2, paste, roi_box, to_mask, upsample
from gms_deploy.preprocess import preprocess, to_unit_float


def _region(
    x0: int, y0: int, x1: int, y1: int, fmt: int = 1, units: int = 3, delta: float = 0.01, distrust: str = ""
) -> UltrasoundRegion:
    return UltrasoundRegion(x0, y0, x1, y1, fmt, units, units, delta, -delta, distrust)


def test_preprocess_is_the_official_recipe_bit_for_bit() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    official = cv2.resize(rgb.astype(np.float32) / 255.0, (224, 224), interpolation=cv2.INTER_LINEAR) * 2 - 1
    ours = preprocess(rgb, 224)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.array_equal(ours, official.transpose(2, 0, 1))


def test_deep_pixels_pass_through_unscaled() -> None:
    deep = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, 2, 3)
    assert to_unit_float(deep) is deep
    assert to_unit_float(np.full((1, 1, 3), 255, np.uint8)).max() == 1.0


def test_threshold_is_strict_and_upsampling_keeps_the_frame_size() -> None:
    prob = np.array([[0.5, 0.5001], [0.2, 0.9]], dtype=np.float32)
    assert to_mask(prob, 0.5).tolist() == [[False, True], [False, True]]
    assert upsample(prob, 2, 2) is prob
    assert upsample(prob, 7, 5).shape == (7, 5)


def test_roi_is_the_largest_tissue_region() -> None:
    regions = [_region(0, 0, 100, 100, fmt=3), _region(10, 10, 50, 40), _region(0, 0, 30, 30)]
    assert roi_box(regions) == (10, 10, 50, 40)
    assert roi_box([_region(0, 0, 9, 9, fmt=4)]) is None
    assert roi_box([_region(0, 0, 90, 90, distrust="overruns"), _region(10, 10, 50, 40)]) == (10, 10, 50, 40)
    assert roi_box([_region(0, 0, 90, 90, distrust="overruns")]) is None
    full = paste(np.ones((30, 40), bool), (10, 10, 50, 40), 60, 70)
    assert full.sum() == 1200 and full[10:40, 10:50].all()


def test_area_counts_calibrated_tissue_pixels_once() -> None:
    mask = np.ones((100, 100), bool)
    assert area_mm2(mask, []) == Area(None)
    assert area_mm2(mask, [_region(0, 0, 10, 10, units=4)]) == Area(None)  # not in cm
    assert area_mm2(mask, [_region(0, 0, 10, 10, fmt=3)]) == Area(None)  # spectral Doppler has no area
    one = area_mm2(mask, [_region(0, 0, 10, 10, delta=0.01)])
    assert one.mm2 == pytest.approx(100 * 0.01 * 0.01 * 100) and one.why == ""
    overlapping = area_mm2(mask, [_region(0, 0, 10, 10, delta=0.01), _region(5, 0, 15, 10, delta=0.02)])
    assert overlapping.mm2 == pytest.approx(100 * 0.01 + 50 * 0.04)


def test_no_area_from_a_file_with_a_distrusted_calibrated_region() -> None:
    mask = np.ones((100, 100), bool)
    fits, overruns = _region(0, 0, 10, 10), _region(20, 20, 100, 100, distrust="region 2 overruns")
    assert area_mm2(mask, [fits, overruns]) == Area(None, "region 2 overruns; no area")
    doppler = _region(20, 20, 100, 100, fmt=3, distrust="region 2 overruns")  # claims no area anyway
    assert area_mm2(mask, [fits, doppler]).mm2 == pytest.approx(100 * 0.01 * 0.01 * 100)


@pytest.mark.parametrize(
    ("name", "size", "box"),
    [
        ("examples_ybr_color.dcm", "320 x 240", "(84,31)-(595,414)"),
        ("examples_palette.dcm", "800 x 350", "(120,60)-(800,518)"),
    ],
)
def test_pydicoms_rescaled_and_cropped_ultrasound_gives_no_area_and_no_crop(
    name: str, size: str, box: str
) -> None:
    """Their tissue regions overrun the image: the cine was halved after calibration (an area from it
    would be 4x too small), the palette frame cropped or rescaled."""
    _, pixels, regions = next(iter_dicom_frames(Path(get_testdata_file(name))))
    mask = np.ones(pixels.shape[:2], bool)
    assert area_mm2(mask, regions) == Area(
        None,
        f"ultrasound region 1 {box} overruns the {size} image: "
        "its box and spacing describe other pixels; no area",
    )
    assert roi_box(regions) is None
