"""The GMS latent mapping network (``ResAttnUNet_DS`` in the official code).

A U-Net-shaped stack of residual + self-attention blocks that never changes the spatial size:
a 4 x 28 x 28 image latent goes in, a 4 x 28 x 28 mask latent comes out. Module names follow the
official checkpoint exactly, so ``best_model.pth`` loads with ``strict=True`` and our own
checkpoints load in the official code.

The tensors do not record GroupNorm's group count, so a mapper we train carries its config in a
JSON file beside the weights (``best_model.pth`` -> ``best_model.json``); the checkpoint itself
stays ``{"model": state_dict}``, the official format. A file with no config beside it (the
official release) gets its config from the tensor shapes and ``norm_groups_for``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from gms_deploy.config_types import check_types
from gms_deploy.io.outputs import write_atomic
from gms_deploy.model.checkpoints import CheckpointError, check_finite, check_keys, read_state_dict

HEADS = ("level3", "level2", "level1", "out")
CONFIG_FORMAT = "gms-mapper-config"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class MapperConfig:
    """Architecture of the mapper; the official release uses the defaults."""

    in_channels: int = 4
    out_channels: int = 4
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    norm_groups: int = 16


def norm_groups_for(ch: int) -> int:
    """GroupNorm groups for a mapper of base width ``ch``: the trainer builds with this and shape
    inference assumes it, so that a file without a config loads as it was trained.

    16 as the official mapper; a width that is not a multiple of 16 gets one group per base
    channel, which divides every width in the network (all are multiples of ``ch``).
    """
    return 16 if ch % 16 == 0 else ch


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class SpatialSelfAttention(nn.Module):
    """Single-head attention over all positions, written with MatMul so that ONNX has no Einsum."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = x.shape
        q = self.q(h).flatten(2).transpose(1, 2)  # b, hw, c
        k = self.k(h).flatten(2)  # b, c, hw
        v = self.v(h).flatten(2)  # b, c, hw
        weights = torch.softmax(torch.matmul(q, k) * self.scale, dim=2)  # b, hw(query), hw(key)
        attended = torch.matmul(v, weights.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(attended)


class ResBlock(nn.Module):
    """GroupNorm -> PReLU -> conv, twice, plus a skip.

    The official block registers each PReLU twice (as ``act1`` and inside ``conv1``), so its
    weight is stored under two keys; registering the same module twice here reproduces that.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.act1 = nn.PReLU()
        self.act2 = nn.PReLU()
        self.conv1 = nn.Sequential(
            _norm(in_channels, groups), self.act1, nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.conv2 = nn.Sequential(
            _norm(out_channels, groups), self.act2, nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_connection(x) + self.conv2(self.conv1(x))


class ResAttBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.resblock = ResBlock(in_channels, out_channels, groups)
        self.attention = SpatialSelfAttention(out_channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.resblock(x))


def _head(channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        _norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
    )


class LatentMapper(nn.Module):
    """Image latent -> mask latent. ``forward`` runs only the ``out`` head (inference);
    ``forward_heads`` adds the deep-supervision heads that training needs."""

    def __init__(self, config: MapperConfig = MapperConfig()) -> None:
        super().__init__()
        self.config = config
        ch, m, g = config.ch, config.ch_mult, config.norm_groups
        self.input_blocks = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.conv1_0 = ResAttBlock(ch, ch * m[0], g)
        self.conv2_0 = ResAttBlock(ch * m[0], ch * m[1], g)
        self.conv3_0 = ResAttBlock(ch * m[1], ch * m[2], g)
        self.conv4_0 = ResAttBlock(ch * m[2], ch * m[3], g)
        self.conv3_1 = ResAttBlock(ch * (m[2] + m[3]), ch * m[2], g)
        self.conv2_2 = ResAttBlock(ch * (m[1] + m[2]), ch * m[1], g)
        self.conv1_3 = ResAttBlock(ch * (m[0] + m[1]), ch * m[0], g)
        self.conv0_4 = ResAttBlock(ch * (1 + m[0]), ch, g)
        self.convds3 = _head(ch * m[2], config.out_channels, g)
        self.convds2 = _head(ch * m[1], config.out_channels, g)
        self.convds1 = _head(ch * m[0], config.out_channels, g)
        self.convds0 = _head(ch, config.out_channels, g)

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x0 = self.input_blocks(x)
        x1 = self.conv1_0(x0)
        x2 = self.conv2_0(x1)
        x3 = self.conv3_0(x2)
        x4 = self.conv4_0(x3)
        x3_1 = self.conv3_1(torch.cat([x3, x4], dim=1))
        x2_2 = self.conv2_2(torch.cat([x2, x3_1], dim=1))
        x1_3 = self.conv1_3(torch.cat([x1, x2_2], dim=1))
        x0_4 = self.conv0_4(torch.cat([x0, x1_3], dim=1))
        return x3_1, x2_2, x1_3, x0_4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convds0(self._trunk(x)[-1])

    def forward_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x3_1, x2_2, x1_3, x0_4 = self._trunk(x)
        return {
            "level3": self.convds3(x3_1),
            "level2": self.convds2(x2_2),
            "level1": self.convds1(x1_3),
            "out": self.convds0(x0_4),
        }


def config_from_state_dict(state: dict[str, torch.Tensor]) -> MapperConfig:
    """Read the architecture off the tensors, so that a wider or narrower mapper loads too.

    GroupNorm's group count leaves no trace in the tensors: it is the one the trainer would have
    used for this width (16 for the official mapper).
    """
    first = state["input_blocks.weight"]
    ch = int(first.shape[0])
    mult = tuple(int(state[f"conv{i}_0.resblock.conv2.2.weight"].shape[0]) // ch for i in range(1, 5))
    return MapperConfig(
        in_channels=int(first.shape[1]),
        out_channels=int(state["convds0.2.weight"].shape[0]),
        ch=ch,
        ch_mult=mult,
        norm_groups=norm_groups_for(ch),
    )


def config_path(checkpoint: Path) -> Path:
    """Where a mapper checkpoint's config lives: beside it, named after it, so copies stay paired."""
    return Path(checkpoint).with_suffix(".json")


def save_mapper(mapper: LatentMapper, path: Path) -> None:
    """Write the config, then the weights in the official format, each one whole or not at all.

    An interrupted training run must never leave a half-written ``best_model.pth``.
    """
    path = Path(path)
    text = json.dumps({"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "mapper": asdict(mapper.config)})
    write_atomic(config_path(path), lambda f: f.write(text.encode() + b"\n"))
    state = {k: v.detach().cpu() for k, v in mapper.state_dict().items()}
    write_atomic(path, lambda f: torch.save({"model": state}, f))


def read_mapper_config(path: Path) -> MapperConfig:
    """The config ``save_mapper`` wrote, every field required: a missing one would silently take a
    default, which is how a mapper came to be rebuilt with the wrong group count."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT:
            raise ValueError(f"format is not {CONFIG_FORMAT!r}")
        if data.get("version") != CONFIG_VERSION:
            raise ValueError(f"version {data.get('version')!r}; this gms-deploy reads {CONFIG_VERSION}")
        values = data["mapper"]
        names = {f.name for f in fields(MapperConfig)}
        if not isinstance(values, dict) or set(values) != names:
            raise ValueError(f"'mapper' must give exactly {', '.join(sorted(names))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        check_types(MapperConfig, values, "mapper setting")
        config = MapperConfig(**values)
        sizes = (config.in_channels, config.out_channels, config.ch, config.norm_groups, *config.ch_mult)
        if len(config.ch_mult) != 4 or min(sizes) < 1:
            raise ValueError("ch_mult needs 4 levels and every size must be at least 1")
        return config
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(path, f"not a GMS mapper config ({err})") from None


def load_mapper(path: Path) -> LatentMapper:
    """Strict-load a mapper from the official ``{"model": ...}`` file or any state-dict file.

    The config beside the file wins over the one read off the tensor shapes. A PReLU weight
    stored under only one of its two names (tools that deduplicate shared tensors, such as
    safetensors' ``save_model``, drop one) is filled in from its twin.
    """
    state = read_state_dict(path)
    for key in list(state):
        if (twin := _prelu_twin(key)) is not None:
            state.setdefault(twin, state[key])
    saved = config_path(path)
    if saved.is_file():
        mapper, what = _mapper_from_config(saved), f"GMS mapper (config from {saved.name})"
    else:
        mapper, what = _mapper_from_shapes(path, state), "GMS mapper"
    check_keys(path, {k: v.shape for k, v in mapper.state_dict().items()}, state, what)
    check_finite(path, state)
    mapper.load_state_dict(state, strict=True)
    return mapper.eval()


def _mapper_from_config(path: Path) -> LatentMapper:
    try:
        return LatentMapper(read_mapper_config(path))
    except ValueError as err:
        raise CheckpointError(path, f"config gives no valid GMS mapper ({err})") from None


def _mapper_from_shapes(path: Path, state: dict[str, torch.Tensor]) -> LatentMapper:
    try:
        return LatentMapper(config_from_state_dict(state))
    except KeyError as err:
        raise CheckpointError(path, f"missing key {err.args[0]}: not a GMS mapper checkpoint") from None
    except (ValueError, ZeroDivisionError) as err:
        raise CheckpointError(path, f"tensor shapes give no valid GMS mapper ({err})") from None


def _prelu_twin(key: str) -> str | None:
    for alias, inner in (("act1", "conv1.1"), ("act2", "conv2.1")):
        for a, b in (
            (f".resblock.{alias}.", f".resblock.{inner}."),
            (f".resblock.{inner}.", f".resblock.{alias}."),
        ):
            if a in key:
                return key.replace(a, b)
    return None
