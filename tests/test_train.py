"""The mapper trainer on tiny data: splits, augmentation, loss decrease, checkpoints, resume."""

from __future__ import annotations

import itertools
import json
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gms_deploy.bundle import ModelBundle, demo_bundle
from gms_deploy.cli import app
from gms_deploy.model.mapper import config_path, load_mapper
from gms_deploy.model.vae import load_vae
from gms_deploy.train import vae_trainer
from gms_deploy.train.data import SplitError, augment, default_split, find_split, read_split
from gms_deploy.train.phantom import write_dataset
from gms_deploy.train.schedule import warmup_cosine_factor
from gms_deploy.train.trainer import BEST, LAST, STATE, TrainConfig, train_mapper
from gms_deploy.train.vae_trainer import VAEConfig, build_vae, save_vae

TINY = TrainConfig(
    image_size=32,
    epochs=4,
    warmup_epochs=1,
    batch_size=4,
    mapper_ch=16,
    seed=0,
    augment=False,
    cache_latents=True,
    device="cpu",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """12 phantoms (10 train, 2 test) and a random 8/8-wide VAE."""
    root = tmp_path_factory.mktemp("tiny")
    write_dataset(root / "data", 12, seed=0, size=(48, 48))
    torch.manual_seed(0)
    build_vae(VAEConfig(block_out_channels=(8, 8), norm_num_groups=8)).save_pretrained(root / "vae")
    return root / "data", root / "vae"


def _official_pkl(path: Path, train: list[str], test: list[str]) -> None:
    path.write_bytes(pickle.dumps({"train": {"name_list": train}, "test": {"name_list": test}}))


def test_official_pickle_split(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = tiny
    names = sorted(p.stem for p in (data / "images").iterdir())
    _official_pkl(tmp_path / "x_train_test_names.pkl", names[:9], names[9:])
    split = read_split(tmp_path / "x_train_test_names.pkl")
    assert split.train == names[:9] and split.test == names[9:]
    assert find_split(data, tmp_path / "x_train_test_names.pkl").test == names[9:]


def test_pickle_with_objects_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil_train_test_names.pkl"
    path.write_bytes(pickle.dumps(OrderedDict(train={"name_list": []}, test={"name_list": []})))
    with pytest.raises(SplitError, match="only dicts"):
        read_split(path)


def test_json_split_and_bad_names(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = tiny
    assert len(find_split(data).test) == 2  # the split.json written beside the data
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": {"name_list": ["nope"]}, "test": {"name_list": []}}))
    with pytest.raises(SplitError, match="without image"):
        find_split(data, bad)
    bad.write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(SplitError):
        read_split(bad)


def test_default_split_is_seeded_80_20() -> None:
    names = [f"n{i:02d}" for i in range(20)]
    a, b = default_split(names, seed=1), default_split(names, seed=1)
    assert a == b and len(a.test) == 4 and sorted(a.train + a.test) == names
    assert default_split(names, seed=2) != a


def test_augment_keeps_image_and_mask_aligned() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:20, 8:30] = True
    image = np.repeat(mask[..., None], 3, axis=2).astype(np.float32)
    for seed in range(30):
        out_image, out_mask = augment(np.random.default_rng(seed), image, mask)
        assert out_image.shape == (40, 40, 3) and out_mask.dtype == bool
        assert np.mean((out_image[..., 0] > 0.5) == out_mask) > 0.97


def test_schedule_warmup_then_cosine() -> None:
    factors = [warmup_cosine_factor(e, 5, 100) for e in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == 1.0 and all(a >= b for a, b in itertools.pairwise(factors[5:]))
    assert 0.0 < factors[-1] < 0.01


def test_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"epochs": 7, "dice_heads": ["out"], "lr": 1e-3}))
    config = TrainConfig.from_file(path, lr=5e-4, batch_size=None)
    assert (config.epochs, config.dice_heads, config.lr, config.batch_size) == (7, ("out",), 5e-4, 8)
    with pytest.raises(ValueError, match="unknown"):
        config.with_overrides(learning_rate=1.0)
    assert config.with_overrides(lr=1).lr == 1  # JSON writes 1.0 as 1: an int goes where a float does
    with pytest.raises(ValueError, match="cache_latents"):
        TrainConfig(augment=True, cache_latents=True)
    with pytest.raises(ValueError, match="head"):
        TrainConfig(dice_heads=("middle",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"train.json: not a JSON config \(Expecting property name"),
        ("[]", "train.json: a config must be a JSON object"),
        ('{"epochs": "x"}', "training option epochs: expected int, got 'x'"),
        ('{"batch_size": 1.5}', "training option batch_size: expected int, got 1.5"),
        ('{"warmup_epochs": true}', "training option warmup_epochs: expected int, got True"),
        ('{"lr": "fast"}', "training option lr: expected float, got 'fast'"),
        ('{"dice_heads": 5}', r"training option dice_heads: expected tuple\[str, ...\], got 5"),
        ('{"split_file": 3}', r"training option split_file: expected str \| None, got 3"),
    ],
)
def test_a_bad_config_file_is_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_file(path)


def test_loss_goes_down_and_checkpoints_load(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, vae = tiny
    result = train_mapper(TINY.with_overrides(epochs=6, lr=5e-3), data, tmp_path, vae, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    for name in (BEST, LAST):
        raw = torch.load(tmp_path / name, weights_only=True)
        assert set(raw) == {"model"}, "official checkpoint format"
        mapper = load_mapper(tmp_path / name)
        assert mapper.config.ch == 16
    last = torch.load(tmp_path / LAST, weights_only=True)["model"]
    assert all(torch.equal(v, last[k]) for k, v in load_mapper(tmp_path / LAST).state_dict().items())
    assert json.loads((tmp_path / "train_config.json").read_text())["epochs"] == 6


def test_resume_continues_exactly(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, vae = tiny
    whole = train_mapper(TINY, data, tmp_path / "whole", vae, progress=False)
    first = train_mapper(TINY, data, tmp_path / "pieces", vae, progress=False, max_epochs_this_run=2)
    assert first.last_epoch == 2
    rest = train_mapper(TINY, data, tmp_path / "pieces", vae, progress=False, resume=True)
    assert [h["epoch"] for h in rest.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in rest.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-5)
    a = torch.load(tmp_path / "whole" / LAST, weights_only=True)["model"]
    b = torch.load(tmp_path / "pieces" / LAST, weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_augmented_uncached_training_runs(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, vae = tiny
    config = TINY.with_overrides(augment=True, cache_latents=False, epochs=1, dice_heads=("out",))
    result = train_mapper(config, data, tmp_path, vae, progress=False)
    assert result.last_epoch == 1 and np.isfinite(result.history[0]["loss"])


def test_init_from_and_val_every(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, vae = tiny
    first = train_mapper(TINY.with_overrides(epochs=1), data, tmp_path / "a", vae, progress=False)
    config = TINY.with_overrides(epochs=3, val_every=2, lr=0.0, init_from=str(first.last_path))
    second = train_mapper(config, data, tmp_path / "b", vae, progress=False)
    assert [h["val_dice"] is None for h in second.history] == [True, False, False]
    a = torch.load(first.last_path, weights_only=True)["model"]
    b = torch.load(second.last_path, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "lr 0 keeps the initial weights"


def test_cli_train_then_resume_then_evaluate(tmp_path: Path) -> None:
    """The commands a user runs: train on the demo VAE, continue the run, score the result."""
    write_dataset(tmp_path / "data", 8, 3, (80, 80))
    cli = CliRunner()
    args = [
        "train",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--no-augment",
        "--cache-latents",
    ]
    first = cli.invoke(app, [*args, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    assert "\r" not in first.output  # no progress bar's carriage returns in a log
    assert "best validation Dice" in first.output and (tmp_path / "run" / "best_model.pth").is_file()
    again = cli.invoke(app, [*args, "--epochs", "2", "--resume"])
    assert again.exit_code == 0, again.output
    bundle = ModelBundle(demo_bundle().vae, tmp_path / "run" / "last_model.pth").with_settings(image_size=32)
    bundle.save(tmp_path / "bundle")
    scores = ["--out", str(tmp_path / "scores.csv")]
    scored = cli.invoke(
        app, ["evaluate", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "bundle"), *scores]
    )
    assert scored.exit_code == 0, scored.output
    assert "dsc_224" in scored.output
    both = cli.invoke(app, [*args, "--vae", str(demo_bundle().vae), "--model", str(tmp_path / "bundle")])
    assert both.exit_code == 2 and "not both" in both.output


@pytest.mark.parametrize("ch", [8, 24])
def test_a_mapper_whose_width_is_no_multiple_of_16_loads_back(
    tiny: tuple[Path, Path], tmp_path: Path, ch: int
) -> None:
    data, vae = tiny
    config = TINY.with_overrides(epochs=1, mapper_ch=ch)
    result = train_mapper(config, data, tmp_path / "run", vae, progress=False)
    trained = config.mapper_config()
    assert trained.norm_groups == ch, "16 groups do not divide this width"
    for path in (result.best_path, result.last_path):
        assert set(torch.load(path, weights_only=True)) == {"model"}, "official checkpoint format"
        assert config_path(path).is_file()
        assert load_mapper(path).config == trained
    assert ModelBundle(vae, result.best_path).build().mapper.config == trained  # what infer --mapper opens
    ModelBundle(vae, result.best_path).with_settings(image_size=32).save(tmp_path / "bundle")
    assert ModelBundle.load(tmp_path / "bundle").build().mapper.config == trained, "the config is bundled"
    config_path(result.best_path).unlink()
    assert load_mapper(result.best_path).config == trained, "without the config, the shapes say the same"


def test_cli_trains_a_24_wide_mapper_and_infers_with_it(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, vae = tiny
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"mapper_ch": 24}))
    cli = CliRunner()
    args = ["--data", str(data), "--out", str(tmp_path / "run"), "--vae", str(vae), "--config", str(config)]
    options = ["--epochs", "1", "--batch-size", "4", "--image-size", "32", "--no-augment", "--cache-latents"]
    trained = cli.invoke(app, ["train", *args, *options])
    assert trained.exit_code == 0, trained.output
    image = next((data / "images").iterdir())
    mapper = tmp_path / "run" / BEST
    flags = ["--vae", str(vae), "--mapper", str(mapper), "--backend", "torch", "--device", "cpu"]
    inferred = cli.invoke(app, ["infer", str(image), "--out", str(tmp_path / "masks"), *flags])
    assert inferred.exit_code == 0, inferred.output
    assert len(list((tmp_path / "masks").rglob("*_mask.png"))) == 1


def test_an_interrupted_save_keeps_the_previous_checkpoints(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, vae = tiny
    train_mapper(TINY.with_overrides(epochs=1), data, tmp_path, vae, progress=False)
    saved = {name: (tmp_path / name).read_bytes() for name in (BEST, LAST, STATE)}

    def dies_halfway(obj: object, f: BinaryIO, *args: object, **kwargs: object) -> None:
        f.write(b"half a checkpoint")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(RuntimeError, match="killed"):
        train_mapper(TINY.with_overrides(epochs=2), data, tmp_path, vae, progress=False, resume=True)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved
    assert not list(tmp_path.glob(".*.part")), "the temporary file is removed"
    load_mapper(tmp_path / LAST)


def test_vae_save_writes_config_json_last_and_leaves_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = build_vae(VAEConfig(block_out_channels=(8, 8), norm_num_groups=8))
    save_vae(vae, tmp_path / "vae")
    load_vae(tmp_path / "vae")
    written = []

    def killed(path: Path, write: object) -> None:
        written.append(path.name)
        raise RuntimeError("killed")

    monkeypatch.setattr(vae_trainer, "write_atomic", killed)
    with pytest.raises(RuntimeError, match="killed"):
        save_vae(vae, tmp_path / "again")
    assert written == ["diffusion_pytorch_model.safetensors"], "weights first: config.json marks a whole VAE"
    assert not (tmp_path / "again" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "vae"], "the staging folder is removed"
