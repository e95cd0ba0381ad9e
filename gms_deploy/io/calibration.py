"""The real frames that calibrate FP16 and validate an export: a user's files, or pydicom's ultrasound.

pydicom ships real ultrasound DICOMs, so an export is calibrated and checked on ultrasound with no
user data and no download.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gms_deploy.io.inputs import discover, read_frames
from gms_deploy.preprocess import preprocess

PYDICOM_ULTRASOUND = ("examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm")


def default_image_paths() -> list[Path]:
    from pydicom.data import get_testdata_file

    return [Path(str(get_testdata_file(name))) for name in PYDICOM_ULTRASOUND]


def real_images(paths: Sequence[Path] | None = None, limit: int = 4) -> list[np.ndarray]:
    """H x W x 3 RGB frames: the first frame of each file, ``limit`` files (None: ``default_image_paths``).

    Raises the first file's ``InputError`` where one cannot be read: a calibration set with a hole
    in it would calibrate on other images than the user named.
    """
    dicom_log = logging.getLogger("gms_deploy.io.dicom")
    level = dicom_log.level
    # Ultrasound regions play no part here; pydicom's examples overhang their images and say so.
    dicom_log.setLevel(logging.ERROR)
    try:
        sources, errors = discover(paths or default_image_paths())
        if errors:
            raise errors[0]
        return [next(read_frames(source)).pixels for source in sources[:limit]]
    finally:
        dicom_log.setLevel(level)


def image_batch(images: list[np.ndarray], size: int) -> np.ndarray:
    """The frames as the network sees them: B x 3 x size x size in [-1, 1]."""
    return np.stack([preprocess(pixels, size) for pixels in images])
