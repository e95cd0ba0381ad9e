"""A training run's settings as data: the paper's defaults, a JSON file, and the flags over both.

Apart from the trainer, so that ``gms-deploy train --help`` shows these defaults without importing
the training code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from gms_deploy.config_types import check_types
from gms_deploy.errors import UsageError
from gms_deploy.io.outputs import write_atomic
from gms_deploy.model.mapper import HEADS, MapperConfig, norm_groups_for
from gms_deploy.settings import SCALE_FACTOR, check_image_size
from gms_deploy.train.losses import SMOOTH


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a run; stored beside the checkpoints so a run documents itself."""

    image_size: int = 224
    epochs: int = 1000
    warmup_epochs: int = 5
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    w_rec: float = 1.0
    w_dice: float = 1.0
    # The Dice term's smoothing: MONAI's 1e-5 as the official code; about one pixel teaches empty frames
    dice_smooth: float = SMOOTH
    rec_heads: tuple[str, ...] = ("level2", "level1", "out")
    # Heads whose decoded mask enters the Dice term. The paper decodes all three; each one costs
    # a decoder forward and backward, the bulk of a CPU step, so a run may decode fewer.
    dice_heads: tuple[str, ...] = ("level2", "level1", "out")
    noise_prob: float = 0.5
    augment: bool = True
    # Encode every image and mask once and train on stored latents; only valid without
    # augmentation, since augmented pixels change every epoch.
    cache_latents: bool = False
    scale_factor: float = SCALE_FACTOR
    mapper_ch: int = 32
    mapper_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    seed: int = 2333
    device: str = "auto"
    num_workers: int = 0
    split_file: str | None = None
    # start from these mapper weights (fine-tuning, or a second stage) instead of random ones
    init_from: str | None = None
    # validation decodes every validation image; on a CPU, doing it every epoch can cost as
    # much as training, so it may be thinned out (the last epoch is always validated)
    val_every: int = 1

    def __post_init__(self) -> None:
        for name in (*self.rec_heads, *self.dice_heads):
            if name not in HEADS:
                raise UsageError(f"unknown head {name!r}; choose from {', '.join(HEADS)}")
        if self.cache_latents and self.augment:
            raise UsageError("cache_latents needs augment off: augmented images have no fixed latent")
        check_image_size(self.image_size)
        if min(self.epochs, self.batch_size, self.val_every) < 1 or self.warmup_epochs < 0:
            raise UsageError("epochs, batch_size and val_every must be >= 1 and warmup_epochs >= 0")

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> TrainConfig:
        """Read a JSON config; ``overrides`` (e.g. CLI flags, None meaning unset) win over the file."""
        try:
            raw = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{path}: not a JSON config ({err})") from None
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: a config must be a JSON object")
        return cls().with_overrides(**raw).with_overrides(**overrides)

    def with_overrides(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied; unknown keys are an error, None values are skipped."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise UsageError(f"unknown training option(s): {', '.join(unknown)}")
        cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None}
        check_types(type(self), cleaned, "training option")
        return replace(self, **cleaned)

    def to_file(self, path: Path) -> None:
        text = json.dumps(asdict(self), indent=1) + "\n"
        write_atomic(Path(path), lambda f: f.write(text.encode()))

    def mapper_config(self) -> MapperConfig:
        """The mapper this run trains, with the group count that shape inference assumes for its width."""
        return MapperConfig(
            ch=self.mapper_ch, ch_mult=self.mapper_ch_mult, norm_groups=norm_groups_for(self.mapper_ch)
        )
