"""The numbers the official code hard-codes, as data a bundle and an export record.

Apart from the model code so that reading a manifest or a bundle's settings imports no network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gms_deploy.config_types import check_types
from gms_deploy.errors import UsageError

SCALE_FACTOR = 0.18215
# Network input sizes: the VAE halves the image three times, and the mid-block attention over
# (size / 8)^2 latent positions grows as size^4 (at 2048, a 64 K x 64 K score matrix), so a
# larger size is a typo or a hostile file, not a model anyone can run.
MAX_IMAGE_SIZE = 2048
UNCERTAIN_LIMIT = 0.1


def check_image_size(size: int) -> None:
    """Refuse a network input size the model cannot take, before any frame or file is touched."""
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= MAX_IMAGE_SIZE or size % 8:
        raise UsageError(f"image_size must be a multiple of 8 from 8 to {MAX_IMAGE_SIZE}, got {size!r}")


@dataclass(frozen=True)
class Settings:
    """What the official code hard-codes; a bundle records it so that a retrained model can differ."""

    image_size: int = 224
    scale_factor: float = SCALE_FACTOR
    threshold: float = 0.5
    uncertain_limit: float = UNCERTAIN_LIMIT
    """A frame with a larger share of uncertain probabilities is said to look unlike the model's
    training data (a warning, and the row's message); a bundle may set its own."""

    def __post_init__(self) -> None:
        check_image_size(self.image_size)
        check_types(Settings, asdict(self), "setting")
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if not 0.0 < self.uncertain_limit <= 1.0:
            raise UsageError(f"uncertain_limit must lie in (0, 1], got {self.uncertain_limit}")

    def to_json(self) -> dict[str, object]:
        """As bundles and export manifests record it: ``uncertain_limit`` only where it is not the
        default, so that files written before it existed read and write back unchanged."""
        data: dict[str, object] = asdict(self)
        if self.uncertain_limit == UNCERTAIN_LIMIT:
            del data["uncertain_limit"]
        return data
