"""Phantoms must be reproducible, varied, and have masks that lie where the image shows tissue."""

from __future__ import annotations

import json

import cv2
import numpy as np

from gms_deploy.train.phantom import SPLIT_FILE, _shadow, make_phantom, write_dataset


def test_same_seed_same_phantom() -> None:
    a, b = make_phantom(7, (96, 128)), make_phantom(7, (96, 128))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.meta == b.meta


def test_different_seeds_differ() -> None:
    a, b = make_phantom(1, (96, 96)), make_phantom(2, (96, 96))
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.mask, b.mask)


def test_image_and_mask_shapes_and_fan() -> None:
    for seed in range(12):
        p = make_phantom(seed, (80, 112))
        assert p.image.shape == (80, 112, 3) and p.image.dtype == np.uint8
        assert p.mask.shape == (80, 112) and p.mask.dtype == bool
        assert p.mask.any(), "every phantom has a lesion"
        assert not (p.mask & ~p.fan).any(), "the lesion lies inside the field of view"
        assert (p.image[~p.fan] == 0).all(), "black outside the field of view"
        assert np.array_equal(p.image[..., 0], p.image[..., 2]), "grey in three channels"


def test_variety_over_seeds() -> None:
    metas = [make_phantom(seed, (64, 64)).meta for seed in range(40)]
    assert {m["geometry"] for m in metas} == {"sector", "linear"}
    assert {m["shape"] for m in metas} == {"ellipse", "lobulated", "irregular"}
    assert {m["hypoechoic"] for m in metas} == {True, False}
    assert {m["shadow"] for m in metas} == {True, False}


def test_hypoechoic_lesion_is_darker() -> None:
    seed = next(s for s in range(50) if make_phantom(s, (96, 96)).meta["hypoechoic"])
    p = make_phantom(seed, (96, 96))
    ring = cv2.dilate(p.mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~p.mask & p.fan
    assert p.image[p.mask, 0].mean() < p.image[ring, 0].mean()


def test_write_dataset(tmp_path) -> None:
    names = write_dataset(tmp_path, 5, seed=3, size=(48, 64))
    split = json.loads((tmp_path / SPLIT_FILE).read_text())
    assert split["train"]["name_list"] + split["test"]["name_list"] == names
    assert len(split["test"]["name_list"]) == 1
    image = cv2.imread(str(tmp_path / "images" / f"{names[0]}.png"))
    mask = cv2.imread(str(tmp_path / "masks" / f"{names[0]}.png"), cv2.IMREAD_GRAYSCALE)
    expected = make_phantom(3, (48, 64))
    assert np.array_equal(image[..., ::-1], expected.image)
    assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask > 0, expected.mask)


def test_shadow_lies_behind_the_lesion_only() -> None:
    h, w = 40, 40
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    lateral, depth = xs / w * 2.0 - 1.0, ys / h
    mask = np.zeros((h, w), bool)
    mask[10:20, 12:24] = True
    shadow = _shadow(mask, lateral, depth, np.ones((h, w), bool))
    expected = np.zeros((h, w), bool)
    expected[20:, 12:24] = True
    assert np.array_equal(shadow, expected)
