"""The frozen SD-VAE as a diffusers ``AutoencoderKL``, from whatever form the user has it in.

Three forms arrive: an LDM / original-SD checkpoint (GMS's ``768-v-ema-first-stage-VAE.ckpt``,
possibly inside a whole SD checkpoint, possibly with ``loss.*`` or EMA keys), a diffusers folder
(``config.json`` + weights), or a diffusers-named weights file with no config. With no config the
architecture is read off the tensor shapes, so the 128-wide SD-VAE and narrow test VAEs load alike.
LDM names are renamed by a small table here rather than by diffusers' single-file converter:
that converter silently skips keys it does not know, and a wrong checkpoint must fail loudly.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from gms_deploy.model.checkpoints import CheckpointError, check_finite, check_keys, read_state_dict

log = logging.getLogger(__name__)

VAE_PREFIXES = ("first_stage_model.", "vae.")
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
NORM_GROUPS = 32

_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_PARTS = {"nin_shortcut": "conv_shortcut"}
_LDM_RULES: tuple[tuple[re.Pattern[str], Any], ...] = (
    (
        re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
        lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PARTS.get(m[3], m[3])}.{m[4]}",
    ),
    (
        re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(\w+)$"),
        lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}",
    ),
    (
        re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
        lambda m, n: (
            f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_PARTS.get(m[3], m[3])}.{m[4]}"
        ),
    ),
    (
        re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(\w+)$"),
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}",
    ),
    (
        re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(\w+)$"),
        lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_PARTS.get(m[3], m[3])}.{m[4]}",
    ),
    (
        re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(\w+)$"),
        lambda m, n: f"{m[1]}.mid_block.attentions.0.{_ATTENTION.get(m[2], m[2])}.{m[3]}",
    ),
    (re.compile(r"^(encoder|decoder)\.norm_out\.(\w+)$"), lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out)\.(\w+)$"), lambda m, n: m[0]),
    (re.compile(r"^(quant_conv|post_quant_conv)\.(\w+)$"), lambda m, n: m[0]),
)


def load_vae(path: Path) -> AutoencoderKL:
    """Load a VAE in eval mode, frozen, on the CPU, from any supported form."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(path, "folder has no config.json (expected a diffusers VAE folder)")
        weights = next((path / name for name in DIFFUSERS_WEIGHTS if (path / name).is_file()), None)
        if weights is None:
            raise CheckpointError(path, f"folder has none of {', '.join(DIFFUSERS_WEIGHTS)}")
        return vae_from_state_dict(weights, read_state_dict(weights), _read_config(config_file))
    return vae_from_state_dict(path, read_state_dict(path))


def vae_from_state_dict(
    path: Path, state: dict[str, torch.Tensor], config: dict[str, Any] | None = None
) -> AutoencoderKL:
    """Build the VAE and load ``state`` strictly; ``path`` only names the source in errors."""
    state = _vae_tensors(path, state)
    if any(k.startswith("encoder.down.") for k in state):
        state = ldm_to_diffusers(path, state)
    config = config or config_from_state_dict(path, state)
    try:
        vae = AutoencoderKL.from_config(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"unusable VAE config ({err})") from None
    expected = {k: v.shape for k, v in vae.state_dict().items()}
    check_keys(path, expected, state, "SD-VAE")
    check_finite(path, state)
    vae.load_state_dict(state, strict=True)
    return vae.eval().requires_grad_(False)


def _vae_tensors(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the VAE's own tensors: a whole SD checkpoint or a training file carries others."""
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    kept = {k: v for k, v in state.items() if k.startswith(VAE_ROOTS)}
    if not kept:
        raise CheckpointError(path, "no VAE tensors (expected keys starting with encoder./decoder.)")
    ignored = sorted({k.split(".")[0] for k in state if k not in kept})
    if ignored:
        log.info("%s: ignored %d non-VAE tensors (%s)", path, len(state) - len(kept), ", ".join(ignored))
    return kept


def ldm_to_diffusers(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename LDM keys to diffusers' and reshape attention 1x1 convs into linear weights."""
    n_up = 1 + max((int(m[1]) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        new = next((rule(m, n_up) for pattern, rule in _LDM_RULES if (m := pattern.match(key))), None)
        if new is None:
            unknown.append(key)
            continue
        if ".attentions.0.to_" in new and new.endswith(".weight") and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        renamed[new] = tensor
    if unknown:
        raise CheckpointError(path, f"unexpected LDM VAE key(s): {', '.join(unknown[:3])}")
    return renamed


def config_from_state_dict(path: Path, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers config implied by the tensor shapes (GroupNorm groups cannot be read: 32)."""
    try:
        widths = []
        while (key := f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight") in state:
            widths.append(int(state[key].shape[0]))
        layers = sum(
            1 for k in state if re.fullmatch(r"encoder\.down_blocks\.0\.resnets\.\d+\.conv1\.weight", k)
        )
        config = {
            "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
            "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
        }
    except KeyError as err:
        raise CheckpointError(path, f"missing key {err.args[0]}: not a complete VAE checkpoint") from None
    if not widths or not layers:
        raise CheckpointError(path, "cannot read the VAE's block widths from the tensors")
    return {
        **config,
        "block_out_channels": tuple(widths),
        "down_block_types": ("DownEncoderBlock2D",) * len(widths),
        "up_block_types": ("UpDecoderBlock2D",) * len(widths),
        "layers_per_block": layers,
        "norm_num_groups": NORM_GROUPS,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
    }


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(path, f"unreadable config ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, "config is not a JSON object")
    return {k: v for k, v in raw.items() if not k.startswith("_")}
