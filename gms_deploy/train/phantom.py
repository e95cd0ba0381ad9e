"""Synthetic B-mode ultrasound phantoms with exact lesion masks.

Real ultrasound data sets (BUSI, BUS) cannot ship inside a package, yet the demo model, the tests
and users trying the tool need images whose ground truth is known exactly. These phantoms mimic
what makes ultrasound segmentation hard: multiplicative speckle, depth attenuation, a sector or
linear field of view with black outside it, soft lesion borders, and acoustic shadows behind a
lesion that look like lesion tissue but are not in the mask.

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
    a = scale * rng.uniform(0.11, 0.25)
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


def make_phantom(seed: int, size: tuple[int, int] = DEFAULT_SIZE) -> Phantom:
    """Render one phantom of ``size`` = (H, W); identical for identical arguments."""
    h, w = size
    rng = np.random.default_rng(seed)
    geometry = str(rng.choice(["sector", "linear"]))
    fan, lateral, depth = _beam_coordinates(rng, h, w, geometry)

    # tissue: a smooth echogenicity field plus a few bright fascia-like layers near the top
    echo = 0.5 + 0.12 * _smooth_noise(rng, h, w, min(h, w) / 10)
    for _ in range(rng.integers(1, 4)):
        level = rng.uniform(0.05, 0.4)
        wave = 0.02 * _smooth_noise(rng, h, w, min(h, w) / 6)
        echo += rng.uniform(0.3, 0.7) * np.exp(-(((depth + wave - level) / rng.uniform(0.01, 0.03)) ** 2))

    mask, kind = _place_lesion(rng, fan, h, w)
    hypo = bool(rng.uniform() < 0.7)
    contrast = rng.uniform(0.08, 0.3) if hypo else rng.uniform(1.5, 2.2)
    inside = contrast * (1.0 + 0.15 * _smooth_noise(rng, h, w, 3.0))
    edge = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), rng.uniform(0.6, 1.5))
    echo = echo * (1.0 - edge) + inside * edge

    shadowed = bool(rng.uniform() < 0.35)
    if shadowed:
        shadow = cv2.GaussianBlur(_shadow(mask, lateral, depth, fan).astype(np.float32), (0, 0), 2.0)
        echo *= 1.0 - rng.uniform(0.3, 0.6) * shadow

    echo *= np.exp(-rng.uniform(0.3, 1.2) * np.clip(depth, 0.0, 1.0))

    # fully developed speckle: magnitude of a correlated complex Gaussian field (Rayleigh)
    psf = (rng.uniform(0.5, 0.9), rng.uniform(0.9, 1.6))  # axial, lateral sigma in pixels
    field_re = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), psf[1], sigmaY=psf[0])
    field_im = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), psf[1], sigmaY=psf[0])
    speckle = np.hypot(field_re, field_im)
    envelope = np.clip(echo, 0.0, None) * speckle / speckle.mean()

    # log compression onto 8 bits, as a scanner display does
    gain = rng.uniform(8.0, 16.0)
    reference = np.percentile(envelope[fan], 99)
    grey = np.log1p(gain * envelope / reference) / np.log1p(gain)
    grey = np.where(fan, np.clip(grey, 0.0, 1.0), 0.0)
    image = np.repeat((grey * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    meta = {"seed": seed, "geometry": geometry, "shape": kind, "hypoechoic": hypo, "shadow": shadowed}
    return Phantom(image=image, mask=mask, fan=fan, meta=meta)


def write_dataset(
    out_dir: Path, n: int, seed: int, size: tuple[int, int] = DEFAULT_SIZE, test_fraction: float = 0.2
) -> list[str]:
    """Write ``images/NAME.png``, ``masks/NAME.png`` (0/255) and ``split.json``; returns the names.

    Phantom ``i`` uses seed ``seed + i``, so data sets written with the same seed share phantoms
    and a single image can be regenerated from its name's index.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        phantom = make_phantom(seed + i, size)
        name = f"phantom_{seed + i:06d}"
        cv2.imwrite(str(out_dir / "images" / f"{name}.png"), phantom.image[..., ::-1])
        cv2.imwrite(str(out_dir / "masks" / f"{name}.png"), phantom.mask.astype(np.uint8) * 255)
        names.append(name)
    n_test = round(n * test_fraction)
    split = {"train": {"name_list": names[: n - n_test]}, "test": {"name_list": names[n - n_test :]}}
    (out_dir / SPLIT_FILE).write_text(json.dumps(split, indent=1) + "\n")
    return names
