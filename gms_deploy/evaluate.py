"""Scoring a backend against ground-truth masks, the way the paper did and at the image's own size.

The official protocol compares at 224 x 224: the prediction is the network-size mask and the
ground truth is resized with NEAREST (PIL, grey, >= 0.5 after / 255). A user deploying on a cart
cares about the mask at the frame's own size too, so each image is scored both ways. Any runner
can be scored, so an FP16 engine is checked against FP32 PyTorch on the user's own data.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from gms_deploy.backends.base import Runner
from gms_deploy.io.images import read_image
from gms_deploy.io.outputs import write_atomic
from gms_deploy.metrics import dice, hd95, iou
from gms_deploy.postprocess import to_mask, upsample
from gms_deploy.preprocess import preprocess
from gms_deploy.train.data import find_image, list_names


@dataclass(frozen=True)
class ImageScores:
    name: str
    dsc_224: float
    iou_224: float
    hd95_224: float
    dsc: float
    iou: float
    hd95: float


def _ground_truth(path: Path, size: int | None) -> np.ndarray:
    """The official reading: grey, NEAREST to the network size when asked, then >= 0.5."""
    with Image.open(path) as mask:
        grey = mask.convert("L")
        if size is not None:
            grey = grey.resize((size, size), resample=Image.NEAREST)
        return np.asarray(grey) >= 128


def evaluate(
    data_dir: Path,
    runner: Runner,
    names: Sequence[str] | None = None,
    threshold: float | None = None,
    batch_size: int = 4,
) -> list[ImageScores]:
    """Score every ``images/NAME`` against ``masks/NAME`` (all pairs when ``names`` is None)."""
    data_dir = Path(data_dir)
    names = list_names(data_dir) if names is None else list(names)
    threshold = runner.settings.threshold if threshold is None else threshold
    size = runner.settings.image_size
    scores = []
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        images = [read_image(find_image(data_dir / "images", name)) for name in chunk]
        probs = runner(np.stack([preprocess(image, size) for image in images]))
        for name, image, prob in zip(chunk, images, probs, strict=True):
            mask_file = find_image(data_dir / "masks", name)
            small, native = _ground_truth(mask_file, size), _ground_truth(mask_file, None)
            pred_small = to_mask(prob, threshold)
            pred = to_mask(upsample(prob, *image.shape[:2]), threshold)
            scores.append(
                ImageScores(
                    name,
                    dice(pred_small, small),
                    iou(pred_small, small),
                    hd95(pred_small, small),
                    dice(pred, native),
                    iou(pred, native),
                    hd95(pred, native),
                )
            )
    return scores


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
