"""Train a GMS latent mapper on a frozen VAE: the library behind ``gms-deploy train``.

Defaults are the paper's (batch 8, 1000 epochs, 224 x 224, AdamW lr 2e-3, 5-epoch warm-up then
cosine, deep supervision on level2/level1/out, latent noise with p=0.5, official augmentations).
Checkpoints are written in the official ``{"model": state_dict}`` format (``best_model.pth``,
``last_model.pth``), so they load in the official code and in ``load_mapper``; what resuming
needs besides the weights (optimizer, scheduler, best score) goes to ``train_state.pth``.

Randomness is drawn from generators seeded by (seed, epoch), not from a global stream, so a
resumed run makes the same choices as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from gms_deploy.config_types import check_types
from gms_deploy.metrics import dice
from gms_deploy.model.gms import SCALE_FACTOR, GMSModel, check_image_size
from gms_deploy.model.mapper import HEADS, LatentMapper, MapperConfig, load_mapper
from gms_deploy.model.vae import load_vae
from gms_deploy.train.data import SegmentationDataset, find_split
from gms_deploy.train.losses import gms_loss
from gms_deploy.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

BEST = "best_model.pth"
LAST = "last_model.pth"
STATE = "train_state.pth"
CONFIG = "train_config.json"


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
                raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEADS)}")
        if self.cache_latents and self.augment:
            raise ValueError("cache_latents needs augment off: augmented images have no fixed latent")
        check_image_size(self.image_size)
        if min(self.epochs, self.batch_size, self.val_every) < 1 or self.warmup_epochs < 0:
            raise ValueError("epochs, batch_size and val_every must be >= 1 and warmup_epochs >= 0")

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> TrainConfig:
        """Read a JSON config; ``overrides`` (e.g. CLI flags, None meaning unset) win over the file."""
        try:
            raw = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a JSON config ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config must be a JSON object")
        return cls().with_overrides(**raw).with_overrides(**overrides)

    def with_overrides(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied; unknown keys are an error, None values are skipped."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None}
        check_types(type(self), cleaned, "training option")
        return replace(self, **cleaned)

    def to_file(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


@dataclass
class TrainResult:
    out_dir: Path
    best_dice: float
    best_epoch: int
    last_epoch: int
    seconds: float
    history: list[dict[str, float | None]] = field(default_factory=list)

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST

    @property
    def last_path(self) -> Path:
        return self.out_dir / LAST


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _mask_rgb(mask: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W {0, 1} -> the three-channel [-1, 1] image the VAE encodes masks as."""
    return (mask * 2.0 - 1.0).expand(-1, 3, -1, -1)


class _LatentCache:
    """Posterior mean/log-variance of each image and mean latent of each mask, encoded once."""

    def __init__(
        self, model: GMSModel, dataset: SegmentationDataset, device: torch.device, batch: int
    ) -> None:
        means, logvars, targets, masks = [], [], [], []
        loader = DataLoader(dataset, batch_size=batch, shuffle=False)
        with torch.no_grad():
            for image, mask, _ in loader:
                mean, logvar = model.moments(image.to(device))
                means.append(mean.cpu())
                logvars.append(logvar.cpu())
                targets.append(model.encode(_mask_rgb(mask).to(device)).cpu())
                masks.append(mask)
        self.mean, self.logvar = torch.cat(means), torch.cat(logvars)
        self.target, self.mask = torch.cat(targets), torch.cat(masks)


def _batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def _validate(
    model: GMSModel,
    dataset: SegmentationDataset,
    cache: _LatentCache | None,
    device: torch.device,
    batch_size: int,
) -> float:
    """Mean per-image Dice of the thresholded ``out`` head at training resolution (official
    convention: an empty ground truth with an empty prediction scores 0)."""
    scores = []
    with torch.no_grad():
        if cache is not None:
            chunks = [
                (cache.mean[i : i + batch_size] * model.scale_factor, cache.mask[i : i + batch_size])
                for i in range(0, len(cache.mean), batch_size)
            ]
        else:
            chunks = (
                (model.encode(image.to(device)), mask)
                for image, mask, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False)
            )
        for latent, mask in chunks:
            prob = model.decode(model.map(latent.to(device))).cpu()
            for p, m in zip(prob[:, 0].numpy() > 0.5, mask[:, 0].numpy() > 0.5, strict=True):
                scores.append(dice(p, m))
    return float(np.mean(scores)) if scores else 0.0


def train_mapper(
    config: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    vae_path: Path,
    resume: bool = False,
    progress: bool = True,
    max_epochs_this_run: int | None = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue) a mapper; returns the best validation Dice and history.

    The split's ``test`` part is the validation set, as in the official code.
    ``max_epochs_this_run`` stops early without changing the schedule, so a long run can be
    done in pieces (and tests can interrupt one).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    split = find_split(data_dir, Path(config.split_file) if config.split_file else None, config.seed)
    if not split.train or not split.test:
        raise ValueError(f"{data_dir}: the split needs at least one training and one validation image")

    vae = load_vae(vae_path).to(device)
    # 16 groups as the official mapper, or one per channel for a mapper narrower than that
    groups = 16 if config.mapper_ch % 16 == 0 else config.mapper_ch
    mapper_config = MapperConfig(ch=config.mapper_ch, ch_mult=config.mapper_ch_mult, norm_groups=groups)
    mapper = LatentMapper(mapper_config)
    if config.init_from:
        mapper.load_state_dict(load_mapper(Path(config.init_from)).state_dict())
    mapper = mapper.to(device)
    model = GMSModel(vae, mapper, config.scale_factor)
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.warmup_epochs, config.epochs)
    start_epoch, best_dice, best_epoch, history = 0, -1.0, 0, []
    if resume and (out_dir / STATE).is_file():
        state = torch.load(out_dir / STATE, map_location="cpu", weights_only=True)
        mapper.load_state_dict(torch.load(out_dir / LAST, map_location="cpu", weights_only=True)["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_dice, best_epoch = state["epoch"], state["best_dice"], state["best_epoch"]
        history = json.loads(state["history"])
        log.info("resumed at epoch %d (best Dice %.4f at epoch %d)", start_epoch, best_dice, best_epoch)
    elif resume:
        log.warning("%s has no %s: nothing to resume, starting from scratch", out_dir, STATE)
    config.to_file(out_dir / CONFIG)

    train_set = SegmentationDataset(data_dir, split.train, config.image_size, config.augment, config.seed)
    val_set = SegmentationDataset(data_dir, split.test, config.image_size)
    train_cache = val_cache = None
    if config.cache_latents:
        train_cache = _LatentCache(model, train_set, device, config.batch_size)
        val_cache = _LatentCache(model, val_set, device, config.batch_size)

    started = time.monotonic()
    end_epoch = config.epochs
    if max_epochs_this_run is not None:
        end_epoch = min(end_epoch, start_epoch + max_epochs_this_run)
    for epoch in range(start_epoch, end_epoch):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        mapper.train()
        lr = optimizer.param_groups[0]["lr"]
        sums = np.zeros(3)
        batches = _batches(len(train_set), config.batch_size, generator, drop_last=True)
        train_set.epoch = epoch
        if train_cache is not None:
            source = iter(batches)
        else:
            source = iter(
                DataLoader(
                    train_set, batch_sampler=[b.tolist() for b in batches], num_workers=config.num_workers
                )
            )
        bar = tqdm(
            range(len(batches)), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False
        )
        for _ in bar:
            if train_cache is not None:
                index = next(source)
                mean, logvar = train_cache.mean[index].to(device), train_cache.logvar[index].to(device)
                target, mask = train_cache.target[index].to(device), train_cache.mask[index].to(device)
            else:
                image, mask, _names = next(source)
                image, mask = image.to(device), mask.to(device)
                with torch.no_grad():
                    mean, logvar = model.moments(image)
                    target = model.encode(_mask_rgb(mask))
            latent = mean * config.scale_factor
            if torch.rand((), generator=generator) < config.noise_prob:
                # as the official train.py: the std is not multiplied by the scale factor
                noise = torch.randn(latent.shape, generator=generator).to(device)
                latent = latent + torch.exp(0.5 * logvar) * noise
            terms = gms_loss(
                mapper.forward_heads(latent),
                target,
                mask,
                model.decode,
                config.rec_heads,
                config.dice_heads,
                config.w_rec,
                config.w_dice,
            )
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            sums += (terms.total.item(), terms.rec.item(), terms.dice.item())
            bar.set_postfix(loss=f"{terms.total.item():.4f}")
        scheduler.step()
        mapper.eval()
        val_dice = None
        if (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs:
            val_dice = _validate(model, val_set, val_cache, device, config.batch_size)
        means = sums / max(1, len(batches))
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(means[0]),
                "rec": float(means[1]),
                "dice_loss": float(means[2]),
                "val_dice": val_dice,
                "lr": lr,
            }
        )
        log.info(
            "epoch %d loss %.4f rec %.4f dice_loss %.4f val_dice %s",
            epoch + 1,
            *means,
            "-" if val_dice is None else f"{val_dice:.4f}",
        )
        state_dict = {k: v.detach().cpu() for k, v in mapper.state_dict().items()}
        if val_dice is not None and val_dice > best_dice:
            best_dice, best_epoch = val_dice, epoch + 1
            torch.save({"model": state_dict}, out_dir / BEST)
        torch.save({"model": state_dict}, out_dir / LAST)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "best_dice": best_dice,
                "best_epoch": best_epoch,
                "history": json.dumps(history),
            },
            out_dir / STATE,
        )
    return TrainResult(out_dir, best_dice, best_epoch, len(history), time.monotonic() - started, history)
