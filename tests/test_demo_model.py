"""The shipped demo model segments the shipped samples, and its recipe still runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from gms_deploy.bundle import ModelBundle, demo_bundle
from gms_deploy.train import demo_model

SAMPLES = Path(demo_model.__file__).resolve().parents[1] / "data" / "samples"
SAMPLE_NAMES = [f"phantom_{seed}.png" for seed, _ in demo_model.SAMPLES]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_bundle_settings() -> None:
    bundle = demo_bundle()
    assert bundle.name == demo_model.NAME
    assert bundle.settings.image_size == demo_model.DemoRecipe().image_size


def test_shipped_samples_are_reproducible(tmp_path: Path) -> None:
    demo_model.write_samples(tmp_path)
    for name in SAMPLE_NAMES:
        for sub in ("images/", "masks/"):
            shipped = cv2.imread(str(SAMPLES / f"{sub}{name}"), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(shipped, cv2.imread(str(tmp_path / f"{sub}{name}"), cv2.IMREAD_UNCHANGED))


def test_quick_recipe_end_to_end(tmp_path: Path) -> None:
    demo_model.main(["--out", str(tmp_path), "--quick"])
    bundle = ModelBundle.load(tmp_path / "bundle")
    assert bundle.name == demo_model.NAME and bundle.settings.image_size == demo_model.QUICK.image_size
    report = json.loads((tmp_path / "report.json").read_text())
    for family in ("holdout", "second_family"):
        assert 0.0 <= report[f"{family}_lesions"]["dsc"][0] <= 1.0
    assert 0.0 <= report["second_family_lesion_free"] <= 1.0
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == len(SAMPLE_NAMES)
