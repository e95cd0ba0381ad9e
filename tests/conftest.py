"""Shared fixtures: the official parity files (from ../shared, skipped without it) and tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import torch
from diffusers import AutoencoderKL

from gms_deploy.bundle import ModelBundle, Settings
from gms_deploy.model.mapper import LatentMapper, MapperConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PARITY = SHARED / "fixtures" / "official_parity"
REFERENCE = SHARED / "reference"

# Tests that compare gms_deploy.resize with cv2.resize itself: without IPP (switched off, or an ARM
# wheel) OpenCV runs its own loop, whose float32 coordinates round otherwise (up to ~1e-5).
cv2_with_ipp = pytest.mark.skipif(
    not cv2.ipp.useIPP(), reason="this OpenCV resizes without IPP, whose numerics device_ops reproduces"
)

TINY_VAE = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests skip without CUDA; ``pytest -m gpu`` runs just them on a GPU machine."""
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared fixtures exist only beside the project's own checkout")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return _need(PARITY)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


def make_tiny_bundle(root: Path, image_size: int = 32, seed: int = 0) -> ModelBundle:
    """A random-weight bundle small enough to run hundreds of frames in a test."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    vae.save_pretrained(root / "src" / "vae")
    mapper = LatentMapper(MapperConfig(ch=16, ch_mult=(1, 1, 2, 2)))
    torch.save({"model": mapper.state_dict()}, root / "src" / "mapper.pth")
    # Random weights leave every probability near 0.5: no frame is like their (absent) training data,
    # so the warning that says so is off here and tested on the demo model.
    settings = Settings(image_size=image_size, uncertain_limit=1.0)
    bundle = ModelBundle(root / "src" / "vae", root / "src" / "mapper.pth", settings, "tiny")
    return bundle.save(root / "bundle")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FP32 export of ``tiny_bundle`` (unvalidated: the export tests validate)."""
    from gms_deploy.onnx_export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("tiny-onnx")
    export_model(tiny_bundle, out, ExportOptions(precisions=("fp32",)))
    return out


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run ~10x faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
