"""The GMS function: image in [-1, 1] -> probability map in [0, 1], exactly as the official code.

encode: encoder -> quant_conv -> first half of the moments (the posterior mean, never a sample)
        -> x scale_factor
map:    the latent mapper's ``out`` head
decode: / scale_factor -> post_quant_conv -> decoder -> mean over RGB -> (x + 1) / 2 -> clamp
The three stages are methods so that export can trace each one on its own and training can run
the posterior and the decoder with gradients; ``forward`` chains them for inference.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from gms_deploy.model.mapper import LatentMapper
from gms_deploy.settings import SCALE_FACTOR

LOGVAR_RANGE = (-30.0, 20.0)


def probability(rgb: torch.Tensor) -> torch.Tensor:
    """The decoder's RGB in [-1, 1] -> B x 1 x H x W probability: the official code's last step,
    shared with the exported decoder so that the two cannot drift apart."""
    return torch.clamp((rgb.mean(dim=1, keepdim=True) + 1.0) / 2.0, 0.0, 1.0)


class GMSModel(nn.Module):
    def __init__(self, vae: AutoencoderKL, mapper: LatentMapper, scale_factor: float = SCALE_FACTOR) -> None:
        super().__init__()
        self.vae = vae
        self.mapper = mapper
        self.scale_factor = scale_factor

    def moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of the image latent, unscaled (training needs both)."""
        h = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.moments(image)[0] * self.scale_factor

    def map(self, latent: torch.Tensor) -> torch.Tensor:
        return self.mapper(latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> B x 1 x H x W probability map."""
        z = latent / self.scale_factor
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return probability(self.vae.decoder(z))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decode(self.map(self.encode(image)))
