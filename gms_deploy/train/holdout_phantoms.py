"""A second phantom family, for scoring the demo model only: never trained on, never used to pick it.

A model scored on held-out phantoms of its own generator is scored on the generator's habits as
much as on segmentation. This family shares no code and few choices with ``phantom.py``, so that
its score says how the model does on ultrasound-like images it has not learnt the look of:

* speckle from point scatterers (a Poisson field of random amplitudes) convolved with a complex
  pulse (a Gaussian envelope times a carrier along the beam), its magnitude taken: the physics of
  an RF line rather than blurred Gaussian noise;
* tissue echogenicity as a sum of broad anisotropic bumps over a lateral and axial gradient,
  with no layers or fascia;
* lesions as ellipses, superellipses (rounded boxes) or smoothed polygons, scaled scatterer
  amplitude inside (darker or brighter), with a border ramp of varied width;
* attenuation linear in dB with depth, and power-law (gamma) display compression instead of log;
* a full-width linear view, or a curvilinear one with an arced top and bottom;
* 30 % of phantoms with no lesion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

LESION_FREE_SHARE = 0.3


@dataclass(frozen=True)
class HoldoutPhantom:
    image: np.ndarray
    """H x W x 3 uint8, grey in three channels."""
    mask: np.ndarray
    """H x W bool; empty where the phantom has no lesion."""


def _pulse_echo(rng: np.random.Generator, h: int, w: int, density: float) -> np.ndarray:
    """Complex echo field of random scatterers under a pulse: one FFT convolution."""
    scatterers = (rng.uniform(size=(h, w)) < density) * rng.normal(size=(h, w))
    axial_sigma, lateral_sigma = rng.uniform(0.8, 2.0), rng.uniform(1.2, 3.0)
    wavelength = rng.uniform(2.5, 5.0)
    ys = np.fft.fftfreq(h) * h
    xs = np.fft.fftfreq(w) * w
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    pulse = np.exp(-0.5 * ((yy / axial_sigma) ** 2 + (xx / lateral_sigma) ** 2)) * np.exp(
        2j * np.pi * yy / wavelength
    )
    return np.fft.ifft2(np.fft.fft2(scatterers) * np.fft.fft2(pulse))


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    field = 0.7 + rng.uniform(-0.2, 0.2) * xs + rng.uniform(-0.3, 0.1) * ys
    for _ in range(rng.integers(3, 7)):
        cy, cx = rng.uniform(0, 1, 2)
        sy, sx = rng.uniform(0.08, 0.35, 2)
        field += rng.uniform(-0.25, 0.25) * np.exp(-0.5 * (((ys - cy) / sy) ** 2 + ((xs - cx) / sx) ** 2))
    return np.clip(field, 0.2, None)


def _view(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Where the image shows tissue: a linear view, or a curvilinear one (arcs about a far apex)."""
    if rng.uniform() < 0.5:
        return np.ones((h, w), bool)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    apex_y, apex_x = -rng.uniform(1.0, 2.5) * h, w / 2
    radius = np.hypot(ys - apex_y, xs - apex_x)
    angle = np.abs(np.arctan2(xs - apex_x, ys - apex_y))
    top, bottom = -apex_y + 0.02 * h, -apex_y + 0.97 * h
    return (radius >= top) & (radius <= bottom) & (angle <= np.arctan2(w / 2, -apex_y + h) * 0.98)


def _lesion(rng: np.random.Generator, h: int, w: int, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, signed distance-like coordinate <= 1 inside) for a shape lying well inside ``view``."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    for _ in range(100):
        ry = rng.uniform(0.08, 0.22) * h
        rx = rng.uniform(0.6, 1.6) * ry
        cy, cx = rng.uniform(ry + 4, h - ry - 4), rng.uniform(rx + 4, w - rx - 4)
        turn = rng.uniform(0, np.pi)
        u = ((xs - cx) * np.cos(turn) + (ys - cy) * np.sin(turn)) / rx
        v = (-(xs - cx) * np.sin(turn) + (ys - cy) * np.cos(turn)) / ry
        kind = rng.choice(["ellipse", "superellipse", "polygon"], p=[0.5, 0.25, 0.25])
        if kind == "ellipse":
            level = np.hypot(u, v)
        elif kind == "superellipse":
            power = rng.uniform(3.0, 6.0)
            level = (np.abs(u) ** power + np.abs(v) ** power) ** (1 / power)
        else:  # the largest of a few half-plane distances: a convex polygon, corners softened
            sides = int(rng.integers(5, 9))
            normals = np.sort(rng.uniform(0, 2 * np.pi, sides))
            faces = np.stack([u * np.cos(a) + v * np.sin(a) for a in normals])
            level = np.log(np.exp(4.0 * faces).sum(0)) / 4.0 / np.log(sides) ** 0.25
        mask = level <= 1.0
        if mask.sum() > 30 and not (mask & ~_shrunk(view, 4)).any():
            return mask, level
    return np.zeros((h, w), bool), np.full((h, w), np.inf)


def _shrunk(view: np.ndarray, by: int) -> np.ndarray:
    """``view`` less ``by`` pixels at its edges, the image border counting as an edge."""
    inner = np.pad(view, by)
    for _ in range(by):
        inner[1:-1, 1:-1] = (
            inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        )
    return inner[by:-by, by:-by]


def make_holdout_phantom(seed: int, lesion: bool | None = None) -> HoldoutPhantom:
    """One phantom, 260-360 px high and 300-400 px wide; ``lesion`` None lets the seed decide."""
    rng = np.random.default_rng([seed, 0x5EC0])  # a seed space of its own, apart from phantom.py's
    h, w = int(rng.integers(260, 361)), int(rng.integers(300, 401))
    with_lesion = bool(rng.uniform() >= LESION_FREE_SHARE) if lesion is None else lesion
    view = _view(rng, h, w)
    amplitude = _tissue(rng, h, w)
    mask = np.zeros((h, w), bool)
    if with_lesion:
        mask, level = _lesion(rng, h, w, view)
        inside = rng.uniform(0.1, 0.45) if rng.uniform() < 0.75 else rng.uniform(1.8, 3.0)
        ramp = np.clip((1.0 - level) / rng.uniform(0.02, 0.25) + 0.5, 0.0, 1.0)
        amplitude = amplitude * (1.0 - ramp) + amplitude * inside * ramp
    echo = np.abs(_pulse_echo(rng, h, w, rng.uniform(0.05, 0.4))) * amplitude
    depth = (np.arange(h) / h)[:, None]
    echo *= 10.0 ** (-rng.uniform(2.0, 12.0) * depth / 20.0)
    grey = np.clip(echo / np.percentile(echo[view], 99.5), 0.0, 1.0) ** rng.uniform(0.3, 0.55)
    grey = np.where(view, grey, 0.0)
    image = np.repeat((grey * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    return HoldoutPhantom(image, mask & view)


def write_holdout_dataset(out_dir: Path, n: int, seed: int, lesion: bool | None = None) -> list[str]:
    """``images/NAME.png`` and ``masks/NAME.png`` (0/255), a data folder ``gms-deploy evaluate`` scores."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        phantom = make_holdout_phantom(seed + i, lesion)
        name = f"holdout_{seed + i:06d}"
        cv2.imwrite(str(out_dir / "images" / f"{name}.png"), phantom.image[..., ::-1])
        cv2.imwrite(str(out_dir / "masks" / f"{name}.png"), phantom.mask.astype(np.uint8) * 255)
        names.append(name)
    return names
