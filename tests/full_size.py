"""The released architecture with random weights: the real model's cost, for full-size tests and benchmarks.

Speed and graph structure do not depend on the weights, and the machines that measure them (a lent
GPU, CI) have none. ``benchmarks/gpu_check.sh`` runs it as a script to make its bundle:

    python tests/full_size.py SRC_DIR BUNDLE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from gms_deploy.bundle import ModelBundle, Settings
from gms_deploy.model.mapper import LatentMapper, MapperConfig, save_mapper

# Stable Diffusion's VAE, the architecture every released GMS model uses (83.65 M parameters).
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}


def random_full_size(root: Path, image_size: int = 224, seed: int = 0) -> ModelBundle:
    """Written under ``root``; ``.save()`` makes it a bundle."""
    torch.manual_seed(seed)
    AutoencoderKL(**SD_VAE).save_pretrained(root / "vae")
    save_mapper(LatentMapper(MapperConfig()), root / "mapper.pth")
    return ModelBundle(root / "vae", root / "mapper.pth", Settings(image_size=image_size), "random-full-size")


if __name__ == "__main__":
    random_full_size(Path(sys.argv[1])).save(Path(sys.argv[2]))
