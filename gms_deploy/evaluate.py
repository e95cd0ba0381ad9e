"""Scoring a backend against ground-truth masks, the way the paper did and at the image's own size.

The official protocol compares at 224 x 224: the prediction is the network-size mask and the
ground truth is resized with NEAREST (PIL, grey, >= 0.5 after / 255). A user deploying on a cart
cares about the mask at the frame's own size too, so each image is scored both ways. Any runner
can be scored, so an FP16 engine is checked against FP32 PyTorch on the user's own data.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from gms_deploy.backends.base import Runner
from gms_deploy.errors import UsageError
from gms_deploy.io.frames import InputError
from gms_deploy.io.images import read_image
from gms_deploy.io.outputs import write_atomic
from gms_deploy.messages import reason, shown
from gms_deploy.metrics import dice, hd95, iou
from gms_deploy.postprocess import to_mask, upsample
from gms_deploy.preprocess import preprocess
from gms_deploy.train.data import find_image, list_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageScores:
    name: str
    dsc_224: float
    iou_224: float
    hd95_224: float
    dsc: float
    iou: float
    hd95: float


@dataclass(frozen=True)
class Evaluation:
    """The scores of every pair that could be scored, and one line for each that could not."""

    scores: list[ImageScores]
    failures: list[str]


@dataclass(frozen=True)
class _Pair:
    name: str
    image_file: Path
    image: np.ndarray
    mask: Image.Image
    """The ground truth as the official code reads it: grey ("L"), not yet resized."""


def _ground_truth(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The official reading: NEAREST to ``size`` (width, height), then >= 0.5."""
    if mask.size != size:
        mask = mask.resize(size, resample=Image.NEAREST)
    return np.asarray(mask) >= 128


def _read_pair(data_dir: Path, name: str) -> _Pair:
    """The image and its grey mask, each decoded once."""
    image_file = find_image(data_dir / "images", name)
    image = read_image(image_file)
    mask_file = find_image(data_dir / "masks", name)
    try:
        with Image.open(mask_file) as mask:
            grey = mask.convert("L")
    except Exception as err:  # PIL raises many types for a broken file; it is this pair's failure
        raise InputError(mask_file, f"cannot read the mask: {reason(err)}") from None
    if grey.size != (image.shape[1], image.shape[0]):  # the official code resizes both to 224 apart
        log.warning(
            "%s: mask is %d x %d, its image %d x %d: resized to the image (NEAREST) for the own-size scores",
            shown(mask_file),
            *grey.size,
            image.shape[1],
            image.shape[0],
        )
    return _Pair(name, image_file, image, grey)


def evaluate(
    data_dir: Path,
    runner: Runner,
    names: Sequence[str] | None = None,
    threshold: float | None = None,
    batch_size: int = 4,
) -> Evaluation:
    """Score every ``images/NAME`` against ``masks/NAME`` (all pairs when ``names`` is None).

    A pair that cannot be read fails alone, in one line; the rest is scored.
    """
    data_dir = Path(data_dir)
    names = list_names(data_dir) if names is None else list(names)
    if not names:
        raise UsageError(
            f"{shown(data_dir)}: no image with a mask of the same name (images/NAME.*, masks/NAME.*)"
        )
    threshold = runner.settings.threshold if threshold is None else threshold
    size = runner.settings.image_size
    result = Evaluation([], [])
    pairs: list[_Pair] = []
    for index, name in enumerate(names):
        try:
            pairs.append(_read_pair(data_dir, name))
        except (InputError, FileNotFoundError) as err:
            result.failures.append(str(err))
        if len(pairs) < batch_size and index < len(names) - 1:
            continue
        probs = runner(np.stack([preprocess(pair.image, size) for pair in pairs])) if pairs else []
        for pair, prob in zip(pairs, probs, strict=True):
            if not np.isfinite(prob).all():
                result.failures.append(
                    f"{shown(pair.image_file)}: {runner.name} gave NaN or Inf probabilities"
                )
                continue
            height, width = pair.image.shape[:2]
            small, native = _ground_truth(pair.mask, (size, size)), _ground_truth(pair.mask, (width, height))
            pred_small = to_mask(prob, threshold)
            pred = to_mask(upsample(prob, height, width), threshold)
            result.scores.append(
                ImageScores(
                    pair.name,
                    dice(pred_small, small),
                    iou(pred_small, small),
                    hd95(pred_small, small),
                    dice(pred, native),
                    iou(pred, native),
                    hd95(pred, native),
                )
            )
        pairs.clear()
    return result


def summarise(scores: Sequence[ImageScores]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation (ddof=1, as the official code) of each metric.

    HD95 is averaged over the images where it is finite (both masks non-empty).
    """
    summary = {}
    for field in fields(ImageScores)[1:]:
        values = np.array([getattr(s, field.name) for s in scores], dtype=np.float64)
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if values.size else float("nan")
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        summary[field.name] = (mean, std)
    return summary


def write_scores(path: Path, scores: Sequence[ImageScores]) -> None:
    """Per-image rows, then ``Avg`` and ``Std`` rows as in the official results.csv."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([f.name for f in fields(ImageScores)])
    writer.writerows(astuple(s) for s in scores)
    summary = summarise(scores)
    writer.writerow(["Avg", *(mean for mean, _ in summary.values())])
    writer.writerow(["Std", *(std for _, std in summary.values())])
    data = text.getvalue().encode("utf-8")
    write_atomic(Path(path), lambda f: f.write(data))
