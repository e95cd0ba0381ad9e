"""The model: official numerics, every checkpoint format users have, and clear refusals."""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from io_corpus import dicom_dataset, write_dicom
from PIL import Image
from safetensors.torch import save_file, save_model

from gms_deploy.backends import ModelSource
from gms_deploy.bundle import ModelBundle
from gms_deploy.errors import UsageError
from gms_deploy.model.checkpoints import CheckpointError, read_state_dict
from gms_deploy.model.gms import GMSModel
from gms_deploy.model.mapper import (
    LatentMapper,
    MapperConfig,
    config_from_state_dict,
    config_path,
    load_mapper,
    norm_groups_for,
    save_mapper,
)
from gms_deploy.model.vae import load_vae
from gms_deploy.preprocess import preprocess
from gms_deploy.train.phantom import write_dataset
from gms_deploy.train.trainer import TrainConfig, train_mapper
from gms_deploy.train.vae_trainer import VAEConfig, build_vae


def _reference_shapes(tsv: Path) -> dict[str, list[int]]:
    rows = (line.split("\t") for line in tsv.read_text().splitlines() if line.strip())
    return {name: json.loads(shape) for name, shape in rows}


def _run(model: GMSModel, image: np.ndarray, size: int = 224) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(preprocess(image, size))[None])[0, 0].numpy()


@pytest.fixture(scope="module")
def parity_model(parity_dir: Path) -> GMSModel:
    return GMSModel(load_vae(parity_dir / "vae_ldm.ckpt"), load_mapper(parity_dir / "mapper.pth")).eval()


def test_reproduces_official_output(parity_dir: Path, parity_model: GMSModel) -> None:
    image = np.asarray(Image.open(parity_dir / "input.png").convert("RGB"))
    prob = _run(parity_model, image)
    official = np.load(parity_dir / "prob224.npy")
    assert prob.shape == official.shape == (224, 224)
    assert np.abs(prob - official).max() <= 2e-5  # the issue asks for 2e-3; OpenCV's resize makes it exact
    assert np.array_equal(prob > 0.5, official > 0.5)


def test_narrow_vae_architecture_is_read_from_tensors(parity_dir: Path) -> None:
    vae = load_vae(parity_dir / "vae_ldm.ckpt")
    assert tuple(vae.config.block_out_channels) == (32, 64, 128, 128)
    assert vae.config.latent_channels == 4 and vae.config.layers_per_block == 2


def test_ldm_renaming_matches_diffusers_converter(parity_dir: Path) -> None:
    ldm = read_state_dict(parity_dir / "vae_ldm.ckpt")
    vae = load_vae(parity_dir / "vae_ldm.ckpt")
    theirs = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    ours = vae.state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor.reshape(ours[key].shape)), key


def test_full_size_official_layouts_load(reference_dir: Path, tmp_path: Path) -> None:
    """Random tensors with every name and shape of the released checkpoints load strictly."""
    torch.manual_seed(0)
    vae_state = {
        k: torch.randn(s) * 0.02
        for k, s in _reference_shapes(reference_dir / "sd_vae_ldm_state_dict.tsv").items()
    }
    torch.save({"state_dict": vae_state}, tmp_path / "768-v-ema-first-stage-VAE.ckpt")
    vae = load_vae(tmp_path / "768-v-ema-first-stage-VAE.ckpt")
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert sum(p.numel() for p in vae.parameters()) == sum(t.numel() for t in vae_state.values())

    mapper_shapes = _reference_shapes(reference_dir / "gms_mapper_state_dict.tsv")
    reference = LatentMapper()
    assert {k: list(v.shape) for k, v in reference.state_dict().items()} == mapper_shapes
    torch.save({"model": reference.state_dict()}, tmp_path / "best_model.pth")
    loaded = load_mapper(tmp_path / "best_model.pth")
    assert abs(sum(p.numel() for p in loaded.parameters()) / 1e6 - 1.565) < 0.001

    model = GMSModel(vae, loaded).eval()
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize(
    "form", ["sd_full", "safetensors_ldm", "bare_dict", "diffusers_folder", "diffusers_file"]
)
def test_vae_formats_round_trip(form: str, parity_dir: Path, parity_model: GMSModel, tmp_path: Path) -> None:
    ldm = read_state_dict(parity_dir / "vae_ldm.ckpt")
    if form == "sd_full":  # a whole SD checkpoint: VAE under a prefix, beside loss and EMA tensors
        state = {f"first_stage_model.{k}": v for k, v in ldm.items()}
        state |= {
            "loss.logvar": torch.zeros(()),
            "model_ema.decay": torch.tensor(0.999),
            "model.diffusion_model.x.weight": torch.ones(2),
        }
        torch.save({"state_dict": state, "global_step": 7}, path := tmp_path / "sd.ckpt")
    elif form == "safetensors_ldm":
        save_file({k: v.contiguous() for k, v in ldm.items()}, path := tmp_path / "vae.safetensors")
    elif form == "bare_dict":
        torch.save(ldm, path := tmp_path / "vae.pt")
    elif form == "diffusers_folder":
        parity_model.vae.save_pretrained(path := tmp_path / "vae")
    else:
        save_file(parity_model.vae.state_dict(), path := tmp_path / "diffusion_pytorch_model.safetensors")
    vae = load_vae(path)
    for key, tensor in parity_model.vae.state_dict().items():
        assert torch.equal(vae.state_dict()[key], tensor), key


def test_mapper_prelu_twins_and_deduplicated_file(parity_dir: Path, tmp_path: Path) -> None:
    official = torch.load(parity_dir / "mapper.pth", weights_only=True)["model"]
    assert torch.equal(official["conv1_0.resblock.act1.weight"], official["conv1_0.resblock.conv1.1.weight"])
    mapper = load_mapper(parity_dir / "mapper.pth")
    assert set(mapper.state_dict()) == set(official)  # saved back in the official layout
    save_model(mapper, str(tmp_path / "mapper.safetensors"))  # drops one name of each shared tensor
    again = load_mapper(tmp_path / "mapper.safetensors")
    for key, tensor in mapper.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_mapper_heads(parity_dir: Path) -> None:
    mapper = load_mapper(parity_dir / "mapper.pth")
    x = torch.randn(2, 4, 28, 28)
    with torch.inference_mode():
        heads = mapper.forward_heads(x)
        assert set(heads) == {"level3", "level2", "level1", "out"}
        assert torch.equal(heads["out"], mapper(x))
        assert all(h.shape == (2, 4, 28, 28) for h in heads.values())


def _truncate(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def test_bad_checkpoints_name_the_file_and_problem(parity_dir: Path, tmp_path: Path) -> None:
    ldm = read_state_dict(parity_dir / "vae_ldm.ckpt")
    mapper = torch.load(parity_dir / "mapper.pth", weights_only=True)["model"]
    cases = {
        "missing": (load_vae, tmp_path / "nope.ckpt", "no such file"),
        "empty": (load_vae, tmp_path / "empty.ckpt", "empty"),
        "truncated": (load_vae, _truncate(parity_dir / "vae_ldm.ckpt", tmp_path / "half.ckpt"), "truncated"),
        "text": (load_mapper, tmp_path / "notes.pth", "a text file, not a checkpoint"),
        "mapper_as_vae": (load_vae, parity_dir / "mapper.pth", "no VAE tensors"),
        "vae_as_mapper": (load_mapper, parity_dir / "vae_ldm.ckpt", "not a GMS mapper"),
        "vae_missing_key": (
            load_vae,
            tmp_path / "holey.ckpt",
            "missing 1 key(s): decoder.up_blocks.0.resnets.1",
        ),
        "mapper_extra_key": (load_mapper, tmp_path / "extra.pth", "unexpected 1 key(s): bonus.weight"),
        "mapper_wrong_shape": (
            load_mapper,
            tmp_path / "shape.pth",
            "wrong shape for 1 key(s): conv1_0.attention.q",
        ),
        "pickled_code": (load_mapper, tmp_path / "lightning.pth", "Python objects besides tensors"),
        "no_config": (load_vae, tmp_path / "folder", "no config.json"),
        "mapper_nan": (load_mapper, tmp_path / "nan.pth", "NaN or Inf in 1 tensor(s): convds0.0.bias"),
        "vae_inf": (
            load_vae,
            tmp_path / "inf.safetensors",
            "NaN or Inf in 1 tensor(s): encoder.conv_in.weight",
        ),
    }
    (tmp_path / "empty.ckpt").touch()
    (tmp_path / "notes.pth").write_text("hello")
    torch.save(
        {"state_dict": {k: v for k, v in ldm.items() if k != "decoder.up.3.block.1.conv2.bias"}},
        tmp_path / "holey.ckpt",
    )
    torch.save({"model": mapper | {"bonus.weight": torch.ones(1)}}, tmp_path / "extra.pth")
    torch.save({"model": mapper | {"conv1_0.attention.q.bias": torch.ones(3)}}, tmp_path / "shape.pth")
    torch.save({"model": mapper, "config": Path("x")}, tmp_path / "lightning.pth")
    (tmp_path / "folder").mkdir()
    torch.save(
        {"model": mapper | {"convds0.0.bias": torch.full_like(mapper["convds0.0.bias"], torch.nan)}},
        tmp_path / "nan.pth",
    )
    diverged = dict(ldm)
    diverged["encoder.conv_in.weight"] = diverged["encoder.conv_in.weight"].clone()
    diverged["encoder.conv_in.weight"][0, 0, 0, 0] = torch.inf
    save_file(diverged, tmp_path / "inf.safetensors")
    for name, (loader, path, expected) in cases.items():
        with pytest.raises(CheckpointError) as caught:
            loader(path)
        message = str(caught.value)
        assert message.startswith(str(path)), name
        assert expected in message, (name, message)
        assert "\n" not in message, name


def _trained_run(root: Path) -> Path:
    """A real one-epoch training run: its folder holds the weights beside ``train_state.pth``."""
    write_dataset(root / "data", 4, seed=0, size=(32, 32))
    build_vae(VAEConfig(block_out_channels=(8, 8), norm_num_groups=8)).save_pretrained(root / "vae")
    config = TrainConfig(image_size=32, epochs=1, warmup_epochs=0, batch_size=4, mapper_ch=8, device="cpu")
    train_mapper(config, root / "data", root / "run", root / "vae", progress=False)
    return root / "run"


def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path: Path) -> None:
    """An image, archive, text or training state given for the weights is named, and no message
    passes on PyTorch's advice to load with ``weights_only=False``, which would run the file's code."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    Image.fromarray(pixels).save(tmp_path / "scan.jpg")
    tifffile.imwrite(tmp_path / "scan.tif", pixels)
    write_dicom(tmp_path / "scan.dcm", dicom_dataset(pixels[..., 0]))
    with zipfile.ZipFile(tmp_path / "weights.zip", "w") as archive:
        archive.writestr("weights/readme.txt", "unzip me")
    (tmp_path / "gms.json").write_text(json.dumps({"format": "gms-deploy-bundle"}))
    (tmp_path / "notes.pth").write_text("hello")
    save_mapper(LatentMapper(NARROW), tmp_path / "mapper.pth")
    mapper = torch.load(tmp_path / "mapper.pth", weights_only=True)["model"]
    hparams = argparse.Namespace(lr=1e-4)  # what Lightning pickles beside the weights
    torch.save({"model": mapper, "hparams": hparams}, tmp_path / "lightning.pth")
    legacy = {"_use_new_zipfile_serialization": False}
    torch.save({"model": mapper, "hparams": hparams}, tmp_path / "old.pth", **legacy)
    torch.save({"epoch": 3, "notes": "hello"}, tmp_path / "scalars.pth")
    run = _trained_run(tmp_path / "train")
    pickled_code = (
        "holds Python objects besides tensors (argparse.Namespace), which would run code to load; "
        "re-save just the state dict"
    )
    cases = {
        "scan.png": (load_vae, "a PNG image, not a checkpoint"),
        "scan.jpg": (load_vae, "a JPEG image, not a checkpoint"),
        "scan.tif": (load_vae, "a TIFF image, not a checkpoint"),
        "scan.dcm": (load_mapper, "a DICOM file, not a checkpoint"),
        "weights.zip": (load_mapper, "a zip archive, not a checkpoint"),
        "gms.json": (load_vae, "a JSON file, not a checkpoint"),
        "notes.pth": (load_mapper, "a text file, not a checkpoint"),
        "lightning.pth": (load_mapper, pickled_code),
        "old.pth": (load_mapper, pickled_code),
        "scalars.pth": (load_mapper, "holds no tensors (keys: epoch, notes)"),
        "train/run/train_state.pth": (
            load_mapper,
            "a training state (keys: optimizer, scheduler, epoch, ... (+3)); give best_model.pth",
        ),
    }
    for name, (loader, expected) in cases.items():
        with pytest.raises(CheckpointError) as caught:
            loader(tmp_path / name)
        assert str(caught.value) == f"{tmp_path / name}: {expected}", name
    assert load_mapper(run / "best_model.pth").config.ch == 8


def test_bundle_round_trip_and_bad_manifests(parity_dir: Path, tmp_path: Path) -> None:
    saved = ModelBundle(parity_dir / "vae_ldm.ckpt", parity_dir / "mapper.pth", name="parity").save(
        tmp_path / "b"
    )
    assert saved.name == "parity" and saved.vae.parent == tmp_path / "b"
    assert ModelBundle.load(tmp_path / "b" / "gms.json") == saved
    with pytest.raises(UsageError, match=r"already holds a bundle$"):
        saved.save(tmp_path / "b")
    manifest = tmp_path / "b" / "gms.json"
    data = json.loads(manifest.read_text())
    for broken, expected in [
        ({**data, "version": 99}, "bundle version 99"),
        ({**data, "settings": {"image_size": 100}}, "multiple of 8"),
        ({**data, "settings": {"image_size": 10**9}}, "from 8 to 2048, got 1000000000"),
        ({**data, "settings": {"image_size": "big"}}, "multiple of 8 from 8 to 2048, got 'big'"),
        ({**data, "settings": {"threshold": "high"}}, "setting threshold: expected float, got 'high'"),
        ({**data, "mapper": "gone.pth"}, "gone.pth, which is not in the bundle"),
        ({"format": "other"}, "format is 'other'"),
    ]:
        manifest.write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=expected):
            ModelBundle.load(tmp_path / "b")
    with pytest.raises(CheckpointError, match="not a model bundle"):
        ModelBundle.load(tmp_path)


def test_a_model_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    """A mistyped ``--model`` is not "a folder without gms.json": the folder is not there at all."""
    for gone in (tmp_path / "nope", tmp_path / "nope" / "gms.json"):
        for load in (ModelBundle.load, lambda path: ModelSource.of(path).weights("--backend torch")):
            with pytest.raises(CheckpointError) as caught:
                load(gone)
            assert str(caught.value) == f"{gone}: no such file or folder"


def test_tiny_models_are_fully_convolutional(tiny_bundle: ModelBundle) -> None:
    model = tiny_bundle.build()
    assert isinstance(model.vae, AutoencoderKL)
    with torch.inference_mode():
        prob = model(torch.zeros(3, 3, 48, 40))
    assert prob.shape == (3, 1, 48, 40)
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0


NARROW = MapperConfig(ch=8, ch_mult=(1, 1, 2, 2), norm_groups=8)


def test_saved_mapper_carries_its_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mapper = LatentMapper(NARROW)
    save_mapper(mapper, tmp_path / "best_model.pth")
    assert set(torch.load(tmp_path / "best_model.pth", weights_only=True)) == {"model"}
    saved = json.loads((tmp_path / "best_model.json").read_text())
    assert saved == {
        "format": "gms-mapper-config",
        "version": 1,
        "mapper": {"in_channels": 4, "out_channels": 4, "ch": 8, "ch_mult": [1, 1, 2, 2], "norm_groups": 8},
    }
    loaded = load_mapper(tmp_path / "best_model.pth")
    assert loaded.config == NARROW
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in mapper.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.json", "best_model.pth"]


@pytest.mark.parametrize(("ch", "groups"), [(32, 16), (16, 16), (48, 16), (8, 8), (24, 24), (40, 40)])
def test_one_group_rule_for_training_and_shape_inference(ch: int, groups: int) -> None:
    assert norm_groups_for(ch) == groups
    config = MapperConfig(ch=ch, norm_groups=norm_groups_for(ch))
    assert config_from_state_dict(LatentMapper(config).state_dict()) == config


def _mapper_fields(**changes: object) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda saved: saved | {"mapper": saved["mapper"] | changes}


@pytest.mark.parametrize(
    ("edit", "named", "expected"),
    [
        (lambda saved: "{", "m.json", "not a GMS mapper config (Expecting property name"),
        (lambda saved: saved | {"format": "other"}, "m.json", "format is not 'gms-mapper-config'"),
        (lambda saved: saved | {"version": 2}, "m.json", "version 2; this gms-deploy reads 1"),
        (lambda saved: saved | {"mapper": {"ch": 8}}, "m.json", "must give exactly ch, ch_mult, in_channels"),
        (_mapper_fields(ch="8"), "m.json", "mapper setting ch: expected int, got '8'"),
        (_mapper_fields(ch_mult=[1, 1]), "m.json", "ch_mult needs 4 levels"),
        (_mapper_fields(norm_groups=0), "m.json", "every size must be at least 1"),
        (_mapper_fields(norm_groups=3), "m.json", "config gives no valid GMS mapper (num_channels (8) must"),
        (_mapper_fields(ch=16, norm_groups=16), "m.pth", "not a matching GMS mapper (config from m.json)"),
    ],
)
def test_a_bad_mapper_config_names_its_file(
    tmp_path: Path, edit: Callable[[dict[str, Any]], object], named: str, expected: str
) -> None:
    """A config that cannot be read, or no longer matches its weights, is refused naming what to fix."""
    save_mapper(LatentMapper(NARROW), tmp_path / "m.pth")
    sidecar = config_path(tmp_path / "m.pth")
    edited = edit(json.loads(sidecar.read_text()))
    sidecar.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(CheckpointError) as caught:
        load_mapper(tmp_path / "m.pth")
    message = str(caught.value)
    assert message.startswith(str(tmp_path / named)) and expected in message, message
