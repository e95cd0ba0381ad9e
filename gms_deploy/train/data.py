"""Training data in the official layout: ``DIR/images/NAME.*``, ``DIR/masks/NAME.png``, a split file.

Split files come in the official ``*_train_test_names.pkl`` form or as the JSON equivalent
(``{"train": {"name_list": [...]}, "test": {"name_list": [...]}}``). A pickle can run code when
loaded, so it is read with an unpickler that only rebuilds dicts, lists and strings. Without a
split file the names are split 80/20 with a seed, so a folder of pairs trains as it is.

Augmentations follow the official albumentations pipeline (flips, rot90, colour jitter p=0.2,
shift-scale-rotate p=0.4) in numpy/OpenCV, so training needs no albumentations (whose 1.x/2.x
versions disagree on the ``ToFloat`` behaviour the released weights depend on).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from gms_deploy.errors import UsageError
from gms_deploy.messages import preview, shown

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class SplitError(UsageError):
    """A split file that is unreadable or names images that are not there."""


class _NamesOnlyUnpickler(pickle.Unpickler):
    """Refuses every global, so only builtin containers and strings can come out."""

    def find_class(self, module: str, name: str) -> type:
        raise SplitError(f"split pickle references {module}.{name}: only dicts, lists and strings allowed")


@dataclass(frozen=True)
class Split:
    train: list[str]
    test: list[str]


def _parse_split(raw: object, source: Path) -> Split:
    try:
        lists = [raw[part]["name_list"] for part in ("train", "test")]  # type: ignore[index]
    except (KeyError, TypeError):
        raise SplitError(f"{source}: expected {{'train': {{'name_list': [...]}}, 'test': {{...}}}}") from None
    for names in lists:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SplitError(f"{source}: name_list must be a list of strings")
    return Split(train=list(lists[0]), test=list(lists[1]))


def read_split(path: Path) -> Split:
    """Read an official ``.pkl`` split (safely) or a ``.json`` one."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            raw = json.loads(data)
        except ValueError as err:
            raise SplitError(f"{path}: invalid JSON ({err})") from None
    else:
        try:
            raw = _NamesOnlyUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            if isinstance(err, SplitError):
                raise
            raise SplitError(f"{path}: unreadable pickle ({err})") from None
    return _parse_split(raw, path)


def list_names(data_dir: Path) -> list[str]:
    """Stems that have both an image and a mask, sorted; the others are named in a warning."""
    data_dir = Path(data_dir)
    images = {p.stem for p in (data_dir / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem for p in (data_dir / "masks").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    for alone, folder, other in ((images - masks, "images", "mask"), (masks - images, "masks", "image")):
        if alone:
            message = "%s: %d with no %s of the same name, left out: %s"
            log.warning(
                message, shown(data_dir / folder), len(alone), other, preview(map(shown, sorted(alone)))
            )
    return sorted(images & masks)


def default_split(names: list[str], seed: int = 0, test_fraction: float = 0.2) -> Split:
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = round(len(names) * test_fraction)
    shuffled = [names[i] for i in order]
    return Split(train=sorted(shuffled[n_test:]), test=sorted(shuffled[:n_test]))


def find_split(data_dir: Path, split_file: Path | None = None, seed: int = 0) -> Split:
    """The given split file, else one in ``data_dir`` (``*_train_test_names.pkl`` or ``split.json``),
    else a seeded 80/20 split; names without an image/mask pair are an error, not a silent skip."""
    data_dir = Path(data_dir)
    if split_file is None:
        found = sorted(data_dir.glob("*_train_test_names.pkl")) + sorted(data_dir.glob("split.json"))
        split_file = found[0] if found else None
    available = list_names(data_dir)
    if split_file is None:
        return default_split(available, seed)
    split = read_split(split_file)
    missing = sorted(set(split.train + split.test) - set(available))
    if missing:
        raise SplitError(f"{split_file}: {len(missing)} name(s) without image+mask, e.g. {missing[0]!r}")
    return split


def find_image(folder: Path, name: str) -> Path:
    """``folder/name`` with whichever image suffix it has (data sets mix .png, .jpg, .bmp)."""
    for suffix in IMAGE_SUFFIXES:
        if (path := folder / f"{name}{suffix}").is_file():
            return path
    raise FileNotFoundError(f"{shown(folder / name)}.*: no such image")


def load_pair(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image (grey becomes three channels, as the official ``convert("RGB")``) and bool mask."""
    data_dir = Path(data_dir)
    image_file, mask_file = find_image(data_dir / "images", name), find_image(data_dir / "masks", name)
    image = cv2.imread(str(image_file), cv2.IMREAD_COLOR)
    mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE)
    for path, pixels in ((image_file, image), (mask_file, mask)):
        if pixels is None:
            raise OSError(f"{shown(path)}: cannot be read as an image")
    return image[..., ::-1].copy(), mask > 127


def _colour_jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation (factors in [0.9, 1.1]) and hue (+-0.1 turn) on float RGB."""
    image = image * rng.uniform(0.9, 1.1)
    image = (image - image.mean()) * rng.uniform(0.9, 1.1) + image.mean()
    grey = image.mean(axis=2, keepdims=True)
    image = np.clip((image - grey) * rng.uniform(0.9, 1.1) + grey, 0.0, 1.0)
    hsv = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-0.1, 0.1) * 360.0) % 360.0
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)


def augment(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official train-time augmentations on a float RGB image in [0, 1] and a bool mask."""
    if rng.uniform() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.uniform() < 0.5:
        image, mask = image[::-1], mask[::-1]
    if rng.uniform() < 0.5:
        k = int(rng.integers(0, 4))
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
    if rng.uniform() < 0.2:
        image = _colour_jitter(rng, image)
    if rng.uniform() < 0.4:
        h, w = mask.shape
        angle, scale = rng.uniform(-20, 20), 1.0 + rng.uniform(-0.1, 0.1)
        matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
        matrix[:, 2] += (rng.uniform(-0.15, 0.15) * w, rng.uniform(-0.15, 0.15) * h)
        image = cv2.warpAffine(
            image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        mask = (
            cv2.warpAffine(
                mask.astype(np.uint8),
                matrix,
                (w, h),
                flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_REFLECT_101,
            )
            > 0
        )
    return image, mask


class SegmentationDataset(Dataset):
    """Items are ``(image, mask, name)``: image 3 x S x S in [-1, 1], mask 1 x S x S in {0, 1}.

    Resizing matches inference (INTER_LINEAR on the image) and the official loader (NEAREST on the
    mask); augmentation draws from a generator seeded by ``seed``, the epoch and the item's index,
    so runs are repeatable whatever the worker count.
    """

    def __init__(
        self, data_dir: Path, names: list[str], image_size: int, augment: bool = False, seed: int = 0
    ) -> None:
        self.data_dir = Path(data_dir)
        self.names = list(names)
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        name = self.names[index]
        image, mask = load_pair(self.data_dir, name)
        image = image.astype(np.float32) / 255.0
        if self.augment:
            image, mask = augment(np.random.default_rng((self.seed, self.epoch, index)), image, mask)
        size = (self.image_size, self.image_size)
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))) * 2.0 - 1.0
        return image_t, torch.from_numpy(mask[None].astype(np.float32)), name
