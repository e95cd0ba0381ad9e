"""Synthetic B-mode ultrasound phantoms with exact lesion masks: the demo model's training family.

Real ultrasound data sets (BUSI, BUS) cannot ship inside a package, yet the demo model, the tests
and users trying the tool need images whose ground truth is known exactly. These phantoms mimic
what makes ultrasound segmentation hard, over a wide range so that a model trained on them does
not learn one look: speckle that is fully developed (Rayleigh) or from few scatterers
(K-distributed), of varying grain; overall gain and time-gain compensation ramps; tissue texture
at two scales, layers of other echogenicity and bright fascia; lesions darker or brighter than
tissue, of several shapes and sizes, with sharp or blurred borders, acoustic shadows or
posterior enhancement behind them (which look like lesion tissue but are not in the mask);
sector and linear fields of view with black outside them. A quarter of the phantoms hold no
lesion at all, so that an empty mask is an answer the model can give.

``holdout_phantoms.py`` is a second family written apart from this one, for scoring only.

Every random choice is drawn from one ``numpy.random.Generator`` seeded by ``seed``, so a seed
is a complete description of a phantom.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

DEFAULT_SIZE = (256, 256)
SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Phantom:
    """One phantom: ``image`` is H x W x 3 uint8 (grey in three channels, as scanners export it),
    ``mask`` the lesion as H x W bool, ``fan`` the field of view, ``meta`` the choices made."""

    image: np.ndarray
    mask: np.ndarray
    fan: np.ndarray
    meta: dict[str, object] = field(default_factory=dict)


def _beam_coordinates(
    rng: np.random.Generator, h: int, w: int, geometry: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Field of view plus, per pixel, the lateral beam position and normalised depth.

    Shadows and attenuation follow the beams, which fan out radially in a sector probe and run
    straight down in a linear one.
    """
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if geometry == "sector":
        apex_x = w * rng.uniform(0.45, 0.55)
        apex_y = -h * rng.uniform(0.05, 0.3)
        half_angle = np.deg2rad(rng.uniform(30.0, 45.0))
        r0 = -apex_y + h * rng.uniform(0.03, 0.08)
        r1 = -apex_y + h * rng.uniform(0.9, 0.98)
        radius = np.hypot(xs - apex_x, ys - apex_y)
        theta = np.arctan2(xs - apex_x, ys - apex_y)
        fan = (radius >= r0) & (radius <= r1) & (np.abs(theta) <= half_angle)
        # a fan wider than the image is clipped at its sides, like a zoomed-in display
        return fan, theta / half_angle, (radius - r0) / (r1 - r0)
    left, right = w * rng.uniform(0.02, 0.12), w * rng.uniform(0.88, 0.98)
    top, bottom = h * rng.uniform(0.02, 0.08), h * rng.uniform(0.9, 0.98)
    fan = (xs >= left) & (xs <= right) & (ys >= top) & (ys <= bottom)
    return fan, (xs - left) / (right - left) * 2.0 - 1.0, (ys - top) / (bottom - top)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    return noise / (noise.std() + 1e-8)


def _lesion_shape(rng: np.random.Generator, h: int, w: int, cy: float, cx: float) -> tuple[np.ndarray, str]:
    """An ellipse, a lobulated blob or an irregular (many-harmonic) blob, rasterised exactly.

    The boundary is a radius function of angle in the ellipse's own frame, so membership of a
    pixel centre is a closed-form test and the mask is the lesion, not an approximation of it.
    """
    kind = str(rng.choice(["ellipse", "lobulated", "irregular"], p=[0.35, 0.35, 0.3]))
    scale = min(h, w)
    a = scale * rng.uniform(0.07, 0.28)
    b = a * rng.uniform(0.5, 1.0)
    rot = rng.uniform(0.0, np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    u = (dx * np.cos(rot) + dy * np.sin(rot)) / a
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / b
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    boundary = np.ones_like(rho)
    if kind == "lobulated":
        for k in range(2, 6):
            boundary += rng.uniform(0.0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    elif kind == "irregular":
        for k in range(2, 10):
            boundary += rng.uniform(0.0, 0.25) / k * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return rho <= boundary, kind


def _place_lesion(rng: np.random.Generator, fan: np.ndarray, h: int, w: int) -> tuple[np.ndarray, str]:
    """Draw shapes until one lies inside the fan with a margin: a lesion cut by the fan edge
    would have a mask that includes pixels the image shows black."""
    margin = max(2, min(h, w) // 40)
    inner = cv2.erode(fan.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)).astype(bool)
    candidates = np.argwhere(inner)
    for _ in range(200):
        cy, cx = candidates[rng.integers(len(candidates))] + 0.5
        mask, kind = _lesion_shape(rng, h, w, float(cy), float(cx))
        if mask.any() and not (mask & ~inner).any():
            return mask, kind
    raise RuntimeError("could not place a lesion inside the field of view")  # pragma: no cover


def _shadow(mask: np.ndarray, lateral: np.ndarray, depth: np.ndarray, fan: np.ndarray) -> np.ndarray:
    """Pixels on the same beam as the lesion and deeper than its far edge."""
    bins = np.clip(((lateral + 1.0) / 2.0 * 256).astype(np.int64), 0, 255)
    far = np.full(256, -np.inf)
    np.maximum.at(far, bins[mask], depth[mask])
    far[np.isneginf(far)] = np.inf  # beams that miss the lesion cast no shadow
    return fan & (depth > far[bins])


LESION_FREE_SHARE = 0.25


def _tissue(rng: np.random.Generator, h: int, w: int, depth: np.ndarray) -> np.ndarray:
    """Echogenicity without lesions: texture at two scales, layers of other echogenicity (muscle,
    fat) whose boundaries wander, and a few bright fascia-like lines near the skin."""
    side = min(h, w)
    echo = 0.5 + rng.uniform(0.05, 0.16) * _smooth_noise(rng, h, w, side / rng.uniform(6, 14))
    echo += rng.uniform(0.0, 0.08) * _smooth_noise(rng, h, w, side / rng.uniform(25, 60))
    for _ in range(rng.integers(0, 4)):
        level = rng.uniform(0.1, 0.9)
        wave = 0.03 * _smooth_noise(rng, h, w, side / 5)
        below = 0.5 + 0.5 * np.tanh((depth + wave - level) / rng.uniform(0.01, 0.06))
        echo *= 1.0 + rng.uniform(-0.35, 0.35) * below
    for _ in range(rng.integers(1, 4)):
        level = rng.uniform(0.05, 0.4)
        wave = 0.02 * _smooth_noise(rng, h, w, side / 6)
        echo += rng.uniform(0.2, 0.7) * np.exp(-(((depth + wave - level) / rng.uniform(0.01, 0.03)) ** 2))
    return np.clip(echo, 0.05, None)


def _speckle(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """Unit-mean speckle: a correlated complex Gaussian field's magnitude (Rayleigh), or that times
    a gamma texture (K-distributed: few scatterers per cell, spikier)."""
    axial, lateral = rng.uniform(0.4, 1.4), rng.uniform(0.8, 2.6)
    re = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), lateral, sigmaY=axial)
    im = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), lateral, sigmaY=axial)
    speckle = np.hypot(re, im)
    kind = "rayleigh"
    if rng.uniform() < 0.4:
        shape = rng.uniform(1.0, 8.0)
        speckle = speckle * np.sqrt(rng.gamma(shape, 1.0 / shape, (h, w)).astype(np.float32))
        kind = "k"
    return speckle / speckle.mean(), kind


def _tgc(rng: np.random.Generator, depth: np.ndarray) -> np.ndarray:
    """A time-gain compensation curve: piecewise linear in depth, a few dB up or down per knot."""
    knots = np.linspace(0.0, 1.0, int(rng.integers(3, 6)))
    gains_db = rng.uniform(-6.0, 6.0, len(knots))
    return 10.0 ** (np.interp(np.clip(depth, 0.0, 1.0), knots, gains_db) / 20.0)


def make_phantom(seed: int, size: tuple[int, int] = DEFAULT_SIZE, lesion: bool | None = None) -> Phantom:
    """Render one phantom of ``size`` = (H, W); identical for identical arguments.

    ``lesion`` None lets the seed decide (``LESION_FREE_SHARE`` of seeds have none).
    """
    h, w = size
    rng = np.random.default_rng(seed)
    with_lesion = bool(rng.uniform() >= LESION_FREE_SHARE) if lesion is None else lesion
    geometry = str(rng.choice(["sector", "linear"]))
    fan, lateral, depth = _beam_coordinates(rng, h, w, geometry)
    echo = _tissue(rng, h, w, depth)

    mask = np.zeros((h, w), bool)
    kind, echogenicity, behind = "none", "none", "none"
    if with_lesion:
        mask, kind = _place_lesion(rng, fan, h, w)
        echogenicity = str(rng.choice(["hypo", "hyper", "mildly hypo"], p=[0.55, 0.25, 0.2]))
        contrast = {"hypo": (0.05, 0.35), "hyper": (1.5, 2.4), "mildly hypo": (0.45, 0.7)}[echogenicity]
        inside = rng.uniform(*contrast) * (1.0 + rng.uniform(0.0, 0.25) * _smooth_noise(rng, h, w, 3.0))
        edge = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), rng.uniform(0.3, 3.0))
        echo = echo * (1.0 - edge) + inside * edge
        behind = str(rng.choice(["none", "shadow", "enhancement"], p=[0.5, 0.3, 0.2]))
        if behind != "none":
            region = cv2.GaussianBlur(_shadow(mask, lateral, depth, fan).astype(np.float32), (0, 0), 2.0)
            change = -rng.uniform(0.3, 0.65) if behind == "shadow" else rng.uniform(0.2, 0.6)
            echo *= 1.0 + change * region

    echo *= np.exp(-rng.uniform(0.2, 1.4) * np.clip(depth, 0.0, 1.0)) * _tgc(rng, depth)
    speckle, speckle_kind = _speckle(rng, h, w)
    envelope = echo * speckle

    # log compression onto 8 bits, as a scanner display does, at the operator's gain
    compression = rng.uniform(6.0, 20.0)
    reference = np.percentile(envelope[fan], 99) / rng.uniform(0.6, 1.4)
    grey = np.log1p(compression * envelope / reference) / np.log1p(compression)
    grey = np.where(fan, np.clip(grey, 0.0, 1.0), 0.0)
    image = np.repeat((grey * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    meta = {
        "seed": seed,
        "geometry": geometry,
        "lesion": with_lesion,
        "shape": kind,
        "echogenicity": echogenicity,
        "behind": behind,
        "speckle": speckle_kind,
    }
    return Phantom(image=image, mask=mask, fan=fan, meta=meta)


def write_dataset(
    out_dir: Path,
    n: int,
    seed: int,
    size: tuple[int, int] = DEFAULT_SIZE,
    test_fraction: float = 0.2,
    lesion: bool | None = None,
) -> list[str]:
    """Write ``images/NAME.png``, ``masks/NAME.png`` (0/255) and ``split.json``; returns the names.

    Phantom ``i`` uses seed ``seed + i``, so data sets written with the same seed share phantoms
    and a single image can be regenerated from its name's index; ``lesion`` as ``make_phantom``'s.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        phantom = make_phantom(seed + i, size, lesion)
        name = f"phantom_{seed + i:06d}"
        cv2.imwrite(str(out_dir / "images" / f"{name}.png"), phantom.image[..., ::-1])
        cv2.imwrite(str(out_dir / "masks" / f"{name}.png"), phantom.mask.astype(np.uint8) * 255)
        names.append(name)
    n_test = round(n * test_fraction)
    split = {"train": {"name_list": names[: n - n_test]}, "test": {"name_list": names[n - n_test :]}}
    (out_dir / SPLIT_FILE).write_text(json.dumps(split, indent=1) + "\n")
    return names
