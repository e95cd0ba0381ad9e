"""Train a GMS latent mapper on a frozen VAE: the library behind ``gms-deploy train``.

Defaults are the paper's (batch 8, 1000 epochs, 224 x 224, AdamW lr 2e-3, 5-epoch warm-up then
cosine, deep supervision on level2/level1/out, latent noise with p=0.5, official augmentations).
Checkpoints are written in the official ``{"model": state_dict}`` format (``best_model.pth``,
``last_model.pth``), so they load in the official code, each with its mapper config beside it
(``best_model.json``) so that ``load_mapper`` rebuilds what was trained; what resuming needs
besides the weights (optimizer, scheduler, best score) goes to ``train_state.pth``. Every file is
written to a temporary name and renamed, so a run killed mid-save leaves the previous version.

Randomness is drawn from generators seeded by (seed, epoch), not from a global stream, so a
resumed run makes the same choices as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from gms_deploy.devices import torch_device
from gms_deploy.errors import UsageError
from gms_deploy.io.outputs import write_atomic
from gms_deploy.metrics import dice
from gms_deploy.model.gms import GMSModel
from gms_deploy.model.mapper import (
    LatentMapper,
    load_mapper,
    save_mapper,
)
from gms_deploy.model.vae import load_vae
from gms_deploy.progress import progress_bar
from gms_deploy.train.config import TrainConfig
from gms_deploy.train.data import SegmentationDataset, Split, find_split
from gms_deploy.train.losses import LossTerms, gms_loss
from gms_deploy.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

BEST = "best_model.pth"
LAST = "last_model.pth"
STATE = "train_state.pth"
CONFIG = "train_config.json"


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

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(mean, log-variance, target latent, mask) of the items ``index``, on ``device``."""
        return tuple(t[index].to(device) for t in (self.mean, self.logvar, self.target, self.mask))


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


@dataclass
class _Standing:
    """Where a run is: what ``train_state.pth`` carries across an interruption besides the weights."""

    epoch: int = 0
    best_dice: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float | None]] = field(default_factory=list)

    def add(self, record: dict[str, float | None]) -> bool:
        """Count a finished epoch; True when its validation Dice is the best so far."""
        self.history.append(record)
        self.epoch = int(record["epoch"])
        val_dice = record["val_dice"]
        if val_dice is None or val_dice <= self.best_dice:
            return False
        self.best_dice, self.best_epoch = val_dice, self.epoch
        return True


@dataclass
class _Session:
    """What every epoch of one run shares, built once."""

    config: TrainConfig
    device: torch.device
    model: GMSModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: SegmentationDataset
    val_set: SegmentationDataset
    train_cache: _LatentCache | None
    val_cache: _LatentCache | None

    @property
    def mapper(self) -> LatentMapper:
        return self.model.mapper


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
    device = torch_device(config.device)
    torch.manual_seed(config.seed)
    split = _split(config, data_dir)
    vae = load_vae(vae_path).to(device)
    model = GMSModel(vae, _new_mapper(config).to(device), config.scale_factor)
    optimizer = torch.optim.AdamW(model.mapper.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.warmup_epochs, config.epochs)
    standing = _restore(out_dir, resume, model.mapper, optimizer, scheduler)
    config.to_file(out_dir / CONFIG)
    session = _open_session(config, data_dir, split, device, model, optimizer, scheduler)

    started = time.monotonic()
    end_epoch = config.epochs
    if max_epochs_this_run is not None:
        end_epoch = min(end_epoch, standing.epoch + max_epochs_this_run)
    for epoch in range(standing.epoch, end_epoch):
        improved = standing.add(_run_epoch(session, epoch, progress))
        _save_checkpoints(out_dir, session, standing, improved)
    return TrainResult(
        out_dir,
        standing.best_dice,
        standing.best_epoch,
        len(standing.history),
        time.monotonic() - started,
        standing.history,
    )


def _split(config: TrainConfig, data_dir: Path) -> Split:
    split = find_split(data_dir, Path(config.split_file) if config.split_file else None, config.seed)
    if not split.train or not split.test:
        raise UsageError(f"{data_dir}: the split needs at least one training and one validation image")
    return split


def _new_mapper(config: TrainConfig) -> LatentMapper:
    """Random weights at the config's width, or the mapper ``init_from`` names, fine-tuned with the
    architecture it was trained with (its widths need not be the config's)."""
    if config.init_from:
        return load_mapper(Path(config.init_from))
    return LatentMapper(config.mapper_config())


def _restore(
    out_dir: Path,
    resume: bool,
    mapper: LatentMapper,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> _Standing:
    """Load the last weights and the optimizer, schedule and scores of a run to be resumed."""
    if not resume:
        return _Standing()
    if not (out_dir / STATE).is_file():
        log.warning("%s has no %s: nothing to resume, starting from scratch", out_dir, STATE)
        return _Standing()
    state = torch.load(out_dir / STATE, map_location="cpu", weights_only=True)
    mapper.load_state_dict(torch.load(out_dir / LAST, map_location="cpu", weights_only=True)["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    history = json.loads(state["history"])
    standing = _Standing(state["epoch"], state["best_dice"], state["best_epoch"], history)
    log.info(
        "resumed at epoch %d (best Dice %.4f at epoch %d)",
        standing.epoch,
        standing.best_dice,
        standing.best_epoch,
    )
    return standing


def _open_session(
    config: TrainConfig,
    data_dir: Path,
    split: Split,
    device: torch.device,
    model: GMSModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> _Session:
    """The data sets, and with ``cache_latents`` their latents, encoded once for the whole run."""
    train_set = SegmentationDataset(data_dir, split.train, config.image_size, config.augment, config.seed)
    val_set = SegmentationDataset(data_dir, split.test, config.image_size)
    train_cache = val_cache = None
    if config.cache_latents:
        train_cache = _LatentCache(model, train_set, device, config.batch_size)
        val_cache = _LatentCache(model, val_set, device, config.batch_size)
    return _Session(config, device, model, optimizer, scheduler, train_set, val_set, train_cache, val_cache)


def _run_epoch(session: _Session, epoch: int, progress: bool) -> dict[str, float | None]:
    """Train one epoch, validate when due, and return the epoch's line of history."""
    config = session.config
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    session.mapper.train()
    lr = session.optimizer.param_groups[0]["lr"]
    sums = np.zeros(3)
    batches = _batches(len(session.train_set), config.batch_size, generator, drop_last=True)
    session.train_set.epoch = epoch
    bar = progress_bar(
        _training_batches(session, batches),
        shown=progress,
        total=len(batches),
        desc=f"epoch {epoch + 1}/{config.epochs}",
    )
    for batch in bar:
        terms = _step(session, *batch, generator)
        sums += (terms.total.item(), terms.rec.item(), terms.dice.item())
        bar.set_postfix(loss=f"{terms.total.item():.4f}")
    session.scheduler.step()
    session.mapper.eval()
    val_dice = None
    if (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs:
        val_dice = _validate(
            session.model, session.val_set, session.val_cache, session.device, config.batch_size
        )
    means = sums / max(1, len(batches))
    log.info(
        "epoch %d loss %.4f rec %.4f dice_loss %.4f val_dice %s",
        epoch + 1,
        *means,
        "-" if val_dice is None else f"{val_dice:.4f}",
    )
    return {
        "epoch": epoch + 1,
        "loss": float(means[0]),
        "rec": float(means[1]),
        "dice_loss": float(means[2]),
        "val_dice": val_dice,
        "lr": lr,
    }


def _training_batches(session: _Session, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, ...]]:
    """(mean, log-variance, target latent, mask) per batch: from the cache, or encoded now."""
    if session.train_cache is not None:
        return (session.train_cache.batch(index, session.device) for index in batches)
    loader = DataLoader(
        session.train_set, batch_sampler=[b.tolist() for b in batches], num_workers=session.config.num_workers
    )
    return (_encode_batch(session, image, mask) for image, mask, _names in loader)


def _encode_batch(session: _Session, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    image, mask = image.to(session.device), mask.to(session.device)
    with torch.no_grad():
        mean, logvar = session.model.moments(image)
        target = session.model.encode(_mask_rgb(mask))
    return mean, logvar, target, mask


def _step(
    session: _Session,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
) -> LossTerms:
    """One optimizer step on one batch, the image latent perturbed with probability ``noise_prob``."""
    config = session.config
    latent = mean * config.scale_factor
    if torch.rand((), generator=generator) < config.noise_prob:
        # as the official train.py: the std is not multiplied by the scale factor
        noise = torch.randn(latent.shape, generator=generator).to(session.device)
        latent = latent + torch.exp(0.5 * logvar) * noise
    terms = gms_loss(
        session.mapper.forward_heads(latent),
        target,
        mask,
        session.model.decode,
        config.rec_heads,
        config.dice_heads,
        config.w_rec,
        config.w_dice,
        config.dice_smooth,
    )
    session.optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    session.optimizer.step()
    return terms


def _save_checkpoints(out_dir: Path, session: _Session, standing: _Standing, improved: bool) -> None:
    """The best weights when they improved, the last weights, then what resuming needs."""
    if improved:
        save_mapper(session.mapper, out_dir / BEST)
    save_mapper(session.mapper, out_dir / LAST)
    state = {
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "epoch": standing.epoch,
        "best_dice": standing.best_dice,
        "best_epoch": standing.best_epoch,
        "history": json.dumps(standing.history),
    }
    write_atomic(out_dir / STATE, lambda f: torch.save(state, f))
