"""Train a small stand-in for the SD-VAE, so that a demo model can ship in a few megabytes.

GMS freezes a VAE and decodes predicted mask latents through it, so the VAE must reconstruct
masks as well as it reconstructs images; it is trained on both, mixed in every batch. The
architecture is the SD-VAE's (same blocks, mid-block attention, 4 latent channels, factor 8),
only narrower, so everything that loads, exports or runs the real VAE runs this one too.
The network is fully convolutional: it is trained on crops and runs at any multiple of 8.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from diffusers import AutoencoderKL

from gms_deploy.io.outputs import write_atomic
from gms_deploy.progress import progress_bar
from gms_deploy.train.schedule import warmup_cosine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    norm_num_groups: int = 16
    layers_per_block: int = 2
    latent_channels: int = 4
    crop: int = 128
    batch_size: int = 8
    mask_fraction: float = 0.375
    steps: int = 3000
    warmup_steps: int = 100
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0


@dataclass(frozen=True)
class VAEResult:
    path: Path
    steps: int
    seconds: float
    final_loss: float
    image_l1: float
    mask_l1: float


def build_vae(config: VAEConfig) -> AutoencoderKL:
    """An SD-VAE-shaped ``AutoencoderKL`` of the configured width (random weights)."""
    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.crop,
    )


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 or H x W bool -> 3 x H x W in [-1, 1] (masks become three equal channels)."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2).astype(np.float32)
    else:
        array = array.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))) * 2.0 - 1.0


def _batch(
    rng: np.random.Generator, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], config: VAEConfig
) -> tuple[torch.Tensor, int]:
    """Random crops with random flips; the first ``n_masks`` items are masks."""
    n_masks = round(config.batch_size * config.mask_fraction)
    items = []
    for i in range(config.batch_size):
        pool = masks if i < n_masks else images
        array = pool[rng.integers(len(pool))]
        h, w = array.shape[:2]
        c = min(config.crop, h, w)
        y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
        array = array[y : y + c, x : x + c]
        if rng.uniform() < 0.5:
            array = array[:, ::-1]
        items.append(_to_tensor(array))
    return torch.stack(items), n_masks


def train_vae(
    config: VAEConfig,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    out_dir: Path,
    progress: bool = True,
) -> VAEResult:
    """Train on ``images`` (uint8 RGB) and ``masks`` (bool) and save a diffusers folder to ``out_dir``.

    Loss: L1 reconstruction of a posterior sample plus a tiny KL (SD's first stage uses 1e-6),
    which keeps the latent scale near the SD-VAE's so that the usual 0.18215 still fits.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    vae = build_vae(config).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, config.steps)
    start = time.monotonic()
    recent: list[tuple[float, float, float]] = []
    bar = progress_bar(range(config.steps), shown=progress, desc="vae", mininterval=10)
    for step in bar:
        x, n_masks = _batch(rng, images, masks, config)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        error = (recon - x).abs().mean(dim=(1, 2, 3))
        loss = error.mean() + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent.append((loss.item(), error[n_masks:].mean().item(), error[:n_masks].mean().item()))
        recent = recent[-50:]
        if step % 50 == 49 or step == config.steps - 1:
            means = np.mean(recent, axis=0)
            bar.set_postfix(loss=f"{means[0]:.4f}", img=f"{means[1]:.4f}", mask=f"{means[2]:.4f}")
            log.info("vae step %d loss %.4f image_l1 %.4f mask_l1 %.4f", step + 1, *means)
    out_dir = Path(out_dir)
    save_vae(vae.eval(), out_dir)
    means = np.mean(recent, axis=0)
    return VAEResult(out_dir, config.steps, time.monotonic() - start, *map(float, means))


def save_vae(vae: AutoencoderKL, out_dir: Path) -> None:
    """Write a diffusers folder whose every file is whole, ``config.json`` last.

    diffusers writes in place; its files are staged beside ``out_dir`` and each moved in
    atomically. A folder with ``config.json`` counts as a finished VAE (the demo build skips
    training it again), so an interrupted save must leave none.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
        for staged in sorted(Path(staging).iterdir(), key=lambda p: p.name == "config.json"):
            write_atomic(out_dir / staged.name, lambda f, source=staged: _copy_from(source, f))


def _copy_from(source: Path, target: BinaryIO) -> None:
    with source.open("rb") as f:
        shutil.copyfileobj(f, target)
