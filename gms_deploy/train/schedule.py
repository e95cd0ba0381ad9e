"""Linear warm-up then cosine decay, the learning-rate shape GMS trains with.

The official scheduler starts its warm-up at lr 0, so its first epoch is wasted; here epoch
``e`` of the warm-up already uses ``base * (e + 1) / warmup``. After the warm-up the rate follows
a half cosine from ``base`` towards ``eta_min``, reached one epoch after the last (so that the
last epoch still learns).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(epoch: int, warmup: int, total: int, eta_min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for 0-based ``epoch`` of ``total``."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (epoch - warmup) / span)
    return eta_min_ratio + (1.0 - eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup: int, total: int, eta_min_ratio: float = 0.0) -> LambdaLR:
    """A scheduler stepped once per epoch (or per step, if ``warmup`` and ``total`` count steps)."""
    return LambdaLR(optimizer, lambda e: warmup_cosine_factor(e, warmup, total, eta_min_ratio))
