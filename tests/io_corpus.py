"""Real image and DICOM files for the io tests, written into a temporary folder.

16-bit PNGs come from a tiny encoder here rather than from Pillow or OpenCV, so the reader under
test is checked against bytes that no library it uses has produced.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

H, W = 7, 5  # odd and unequal, so a transposed or cropped read cannot pass
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def random_uint(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    """Values spread over the whole range; the first two entries along axis 0 are 0 and the maximum."""
    info = np.iinfo(dtype)
    values = np.random.default_rng(seed).integers(0, info.max, size=shape, endpoint=True, dtype=dtype)
    values[0, ...] = 0
    values[1, ...] = info.max
    return values


def png_bytes(samples: np.ndarray) -> bytes:
    """A PNG (8 or 16 bits, grey/grey+alpha/RGB/RGBA) from H x W or H x W x C samples."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    height, width, channels = samples.shape
    depth = samples.dtype.itemsize * 8
    rows = samples.astype(f">u{samples.dtype.itemsize}").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return PNG_SIGNATURE + body


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a bomb, or zero) over a tiny body."""
    data = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def pillow_images() -> dict[str, Image.Image]:
    """One Pillow image per 8-bit-or-less mode the readers must take through ``convert("RGB")``."""
    rgb = random_uint((H, W, 3), np.uint8, seed=1)
    rgba = random_uint((H, W, 4), np.uint8, seed=2)
    grey = random_uint((H, W), np.uint8, seed=3)
    palette = Image.fromarray(grey % 16, mode="L").convert("P")
    palette.putpalette(random_uint((256 * 3,), np.uint8, seed=4).tolist())
    return {
        "rgb": Image.fromarray(rgb),
        "rgba": Image.fromarray(rgba),
        "grey": Image.fromarray(grey),
        "grey_alpha": Image.fromarray(np.dstack([grey, grey[::-1]])),
        "palette": palette,
        "bilevel": Image.fromarray(grey > 127),
    }


# Which Pillow modes each format can store.
FORMAT_MODES = {
    "png": ("rgb", "rgba", "grey", "grey_alpha", "palette", "bilevel"),
    "bmp": ("rgb", "grey", "palette", "bilevel"),
    "tif": ("rgb", "rgba", "grey", "palette", "bilevel"),
    "jpg": ("rgb", "grey"),
}


def write_8bit_corpus(folder: Path) -> dict[str, Path]:
    """Every (format, mode) pair of ``FORMAT_MODES``, named ``<mode>.<format>``."""
    images = pillow_images()
    written = {}
    for suffix, modes in FORMAT_MODES.items():
        for mode in modes:
            path = folder / f"{mode}.{suffix}"
            images[mode].save(path)
            written[path.name] = path
    cmyk = folder / "cmyk.jpg"
    images["rgb"].convert("CMYK").save(cmyk)
    written[cmyk.name] = cmyk
    return written


def dicom_example(name: str) -> Path:
    """One of the real files pydicom ships in pydicom/data/test_files."""
    return Path(get_testdata_file(name))


def dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8) -> Dataset:
    """An uncompressed secondary-capture dataset; a 3-D grey array becomes a multi-frame one."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.set_pixel_data(pixels, photometric, bits_stored)
    return ds


def write_dicom(path: Path, ds: Dataset) -> Path:
    """In the DICOM file format: preamble, "DICM", file meta."""
    ds.save_as(path, enforce_file_format=True)
    return path
