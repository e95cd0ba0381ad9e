"""The comparison layer: criteria as data, one row of the error table per candidate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gms_deploy.compare import Criteria, agree

PROB = Criteria(max_abs=1e-3, min_dice=0.99, judged_coverage=(0.01, 0.99))


def _probs(seed: int, n: int = 3, size: int = 16) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).uniform(0, 1, (n, size, size)).astype(np.float32))


def test_identical_outputs_agree() -> None:
    ref = _probs(0)
    row = agree(ref, [r.copy() for r in ref], PROB)
    assert row.ok and row.finite and row.max_abs == 0.0 and row.max_rel == 0.0
    assert row.dice == row.dice_mean == row.dice_min == 1.0 and row.unjudged == 0


def test_a_nan_anywhere_fails_and_no_difference_is_claimed() -> None:
    ref = _probs(0)
    got = [r.copy() for r in ref]
    got[1][3, 3] = np.nan
    row = agree(got, ref, PROB)
    assert not row.ok and not row.finite and math.isinf(row.max_abs)
    assert row.failures[0] == "NaN/Inf at the output"
    inner = agree(ref, ref, PROB, non_finite="decoder/conv_in")  # seen layer by layer, not at the output
    assert inner.failures == ("NaN/Inf at decoder/conv_in",)


def test_differences_are_judged_against_the_references_scale() -> None:
    latents = [np.full((4, 8, 8), 20.0, np.float32)]
    off = [latents[0] + 0.01]  # 5e-4 of the largest value: within 1e-3 of it
    judged = Criteria(max_abs=1e-3, threshold=None)
    row = agree(off, latents, judged)
    assert row.ok and row.dice is None and row.dice_mean is None and row.unjudged == 0
    assert row.max_abs == pytest.approx(0.01, rel=1e-3) and row.max_rel == pytest.approx(5e-4, rel=1e-3)
    assert agree([latents[0] + 0.05], latents, judged).failures == ("max abs 5.00e-02 > 0.001",)


def test_pooled_dice_leaves_out_degenerate_masks_and_names_the_shortfall() -> None:
    ref = [np.zeros((10, 10), np.float32) for _ in range(3)]
    ref[0][:5] = 1.0  # half covered: judged
    ref[1][:] = 1.0  # all covered: says nothing about a flip
    got = [r.copy() for r in ref]
    got[0][5, :] = 1.0  # one row more: Dice 100 / 110
    got[2][0, 0] = 1.0  # an empty reference, one pixel: per image Dice 0, not judged
    row = agree(got, ref, PROB)
    assert row.unjudged == 2 and row.dice == pytest.approx(100 / 110) and row.dice_min == row.dice
    assert row.dice_mean == pytest.approx((100 / 110 + 1.0 + 0.0) / 3)
    assert "Dice 0.9091 < 0.99" in row.failures and any("max abs" in f for f in row.failures)


def test_masks_of_their_own_are_compared_where_given() -> None:
    """Bench's masks are at each frame's size, the probabilities at the network's."""
    probs = _probs(1, n=2)
    big = [np.ones((40, 30), bool), np.zeros((20, 50), bool)]
    row = agree(probs, probs, Criteria(), (big, [m.copy() for m in big]))
    assert row.dice_mean == row.dice_min == 1.0 and row.ok
    flipped = [~big[0], big[1]]
    assert agree(probs, probs, Criteria(), (flipped, big)).dice_min == 0.0


def test_a_count_mismatch_is_a_bug_not_a_row() -> None:
    with pytest.raises(ValueError, match="2 candidate outputs against 3"):
        agree(_probs(0, n=2), _probs(0), PROB)
