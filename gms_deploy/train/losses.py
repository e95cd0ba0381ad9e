"""The GMS objective: latent MSE plus Dice on decoded masks, both deep-supervised.

Matching latents alone lets small latent errors turn into large mask errors once decoded; the
Dice term on the decoder's output puts the error where it is measured. The Dice here equals
MONAI's ``DiceLoss()`` defaults that the official code uses (per sample, smooth 1e-5 on both
sides, mean over the batch), so loss values compare with the official logs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SMOOTH = 1e-5


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """1 - (2 sum(p t) + s) / (sum p + sum t + s), per sample and channel, averaged.

    With MONAI's tiny ``s`` an empty target's loss stays near 1 for any non-empty prediction and its
    gradient vanishes, so the term teaches nothing about frames without a lesion; an ``s`` of about
    one pixel (the demo model's) makes drawing nothing there the way to a low loss.
    """
    dims = tuple(range(2, prob.ndim))
    intersection = (prob * target).sum(dims)
    denominator = prob.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    rec: torch.Tensor
    dice: torch.Tensor


def gms_loss(
    heads: dict[str, torch.Tensor],
    target_latent: torch.Tensor,
    target_mask: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    rec_heads: Sequence[str],
    dice_heads: Sequence[str],
    w_rec: float = 1.0,
    w_dice: float = 1.0,
    dice_smooth: float = SMOOTH,
) -> LossTerms:
    """Sum over heads of MSE to the mask latent, plus the Dice of each decoded head.

    The decoded heads go through the decoder as one batch: one pass instead of one per head.
    """
    rec = sum(F.mse_loss(heads[name], target_latent) for name in rec_heads)
    dice = torch.zeros((), device=target_latent.device)
    if dice_heads:
        probs = decode(torch.cat([heads[name] for name in dice_heads]))
        for prob in probs.chunk(len(dice_heads)):
            dice = dice + soft_dice_loss(prob, target_mask, dice_smooth)
    rec_t = torch.as_tensor(rec, device=target_latent.device)
    return LossTerms(w_rec * rec_t + w_dice * dice, rec_t.detach(), dice.detach())
