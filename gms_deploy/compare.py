"""How far a candidate's outputs are from a reference's on the same inputs, judged by criteria given as data.

As Polygraphy keeps comparison apart from its runners, so here: export validation (each ONNX graph
against eager PyTorch), ``build --validate`` (each engine against eager PyTorch) and bench's
accuracy columns (each backend against eager FP32) all make their rows of the error table here,
so a Dice, a difference or a NaN means the same thing in all three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gms_deploy.metrics import dice


@dataclass(frozen=True)
class Criteria:
    """What a candidate must meet; None leaves that figure unjudged (it is still measured)."""

    max_abs: float | None = None
    """Largest absolute difference allowed, relative to the reference's own largest value where
    that is above 1 (latents), absolute for probabilities."""
    min_dice: float | None = None
    """Smallest mask Dice allowed, pooled over the judged images (every pixel counts the same)."""
    threshold: float | None = 0.5
    """Where probabilities become masks, when the caller gives no masks of its own; None where the
    outputs are no probabilities (latents): no masks, no Dice."""
    judged_coverage: tuple[float, float] = (0.0, 1.0)
    """Images whose reference mask covers less or more of the image than this stay out of the pooled
    Dice: an all-empty or all-full mask says nothing about a threshold flip."""


@dataclass(frozen=True)
class Agreement:
    """One row of the error table."""

    max_abs: float
    """``inf`` where the candidate held NaN or Inf."""
    max_rel: float
    dice: float | None
    """Pooled over the judged images; None where no image was judged (or no masks)."""
    dice_mean: float | None
    """Per image, every image, two empty masks agreeing (Dice 1)."""
    dice_min: float | None
    unjudged: int
    """Images left out of the pooled Dice by ``judged_coverage``."""
    finite: bool
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def agree(
    candidate: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    criteria: Criteria,
    masks: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    non_finite: str = "",
) -> Agreement:
    """Compare per image; ``masks`` (candidate's, reference's) where they are not the thresholded
    outputs (bench's, at each frame's own size); ``non_finite`` names a tensor that held NaN or Inf
    before the output (validation runs graphs layer by layer), empty where none did."""
    if len(candidate) != len(reference):
        raise ValueError(f"{len(candidate)} candidate outputs against {len(reference)} reference outputs")
    finite = not non_finite and all(np.isfinite(c).all() for c in candidate)
    ref_max = max(float(np.abs(r).max()) for r in reference)
    max_abs = (
        max(float(np.abs(c.astype(np.float64) - r).max()) for c, r in zip(candidate, reference, strict=True))
        if finite
        else math.inf
    )
    if masks is None and criteria.threshold is not None:
        masks = ([c > criteria.threshold for c in candidate], [r > criteria.threshold for r in reference])
    mine, theirs = masks or ((), ())
    scores = [dice(a, b, empty=1.0) for a, b in zip(mine, theirs, strict=True)]
    low, high = criteria.judged_coverage
    judged = [i for i, b in enumerate(theirs) if low <= float(np.mean(b)) <= high]
    pooled = _pooled_dice([mine[i] for i in judged], [theirs[i] for i in judged]) if judged else None
    failures = []
    if not finite:
        failures.append(f"NaN/Inf at {non_finite or 'the output'}")
    elif criteria.max_abs is not None and max_abs > criteria.max_abs * max(1.0, ref_max):
        failures.append(f"max abs {max_abs:.2e} > {criteria.max_abs:g}")
    if criteria.min_dice is not None and pooled is not None and pooled < criteria.min_dice:
        failures.append(f"Dice {pooled:.4f} < {criteria.min_dice}")
    return Agreement(
        max_abs=max_abs,
        max_rel=max_abs / max(ref_max, 1e-12),
        dice=pooled,
        dice_mean=float(np.mean(scores)) if scores else None,
        dice_min=float(min(scores[i] for i in judged)) if judged else None,
        unjudged=len(theirs) - len(judged),
        finite=finite,
        failures=tuple(failures),
    )


def _pooled_dice(mine: Sequence[np.ndarray], theirs: Sequence[np.ndarray]) -> float:
    """One Dice over all the images' pixels together: a flipped pixel weighs the same in any image."""
    return dice(np.concatenate([m.ravel() for m in mine]), np.concatenate([t.ravel() for t in theirs]), 1.0)
