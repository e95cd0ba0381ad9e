"""PNG, JPEG, BMP and TIFF files -> H x W x 3 RGB arrays.

8-bit sources go through ``PIL.Image.open(p).convert("RGB")`` and nothing else, because that is
what the official GMS code feeds its model: grey becomes three equal channels, alpha is dropped,
palettes are expanded, EXIF orientation and ICC profiles are ignored. Applying EXIF orientation
would be friendlier to phone photos but would give the model a different picture than the one the
released weights were evaluated on, so parity wins.

Deeper sources cannot take that path: Pillow silently cuts 16-bit RGB PNG and TIFF to 8 bits and
clips (rather than scales) 16-bit grey on ``convert``. They are read by OpenCV (16-bit PNG) or
tifffile (TIFF) and returned as float32 in [0, 1], scaled by the stated bit depth.

Multi-page TIFFs give their first page only, with a warning (Pillow does the same for animated PNG
and MPO, silently): the pipeline's frames come from DICOM cines, and a page stack has no agreed
frame semantics (pyramid levels, channels, time) to mirror.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from gms_deploy.io.frames import InputError
from gms_deploy.messages import reason, shown

log = logging.getLogger(__name__)

# Pillow's own warning threshold: beyond it a small file can demand gigabytes once decoded.
MAX_PIXELS = 89_478_485
# Decoded samples, whatever their depth: an RGBA 8-bit image at MAX_PIXELS. A 16-bit or 200-sample
# image of fewer pixels can hold as many bytes, and a reader's float copies multiply them.
MAX_DECODED_BYTES = 4 * MAX_PIXELS
# Progressive JPEGs are decoded scan by scan over the whole image, and nothing limits their number:
# a file that repeats one scan thousands of times decodes for minutes. Encoders write about 10.
MAX_JPEG_SCANS = 100

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
PILLOW_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF"})
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel


def check_size(path: Path, width: int, height: int, samples: int = 1, sample_bytes: int = 1) -> None:
    """Refuse empty and decompression-bomb images before any pixel is decoded."""
    if width <= 0 or height <= 0:
        raise InputError(path, f"image has zero size ({width} x {height})")
    if width * height > MAX_PIXELS:
        raise InputError(path, f"image too large: {width} x {height} pixels, over the {MAX_PIXELS} limit")
    decoded = width * height * samples * sample_bytes
    if decoded > MAX_DECODED_BYTES:
        raise InputError(
            path,
            f"image too large: {width} x {height} x {samples} samples of {sample_bytes} byte(s) "
            f"decode to {decoded / 2**20:.0f} MiB, over the {MAX_DECODED_BYTES / 2**20:.0f} MiB limit",
        )


def as_rgb(samples: np.ndarray) -> np.ndarray:
    """H x W (grey), grey + alpha, RGB or RGBA samples -> H x W x 3, alpha dropped like ``convert("RGB")``."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    channels = samples.shape[2]
    if channels in (1, 2):
        return np.repeat(samples[:, :, :1], 3, axis=2)
    if channels in (3, 4):
        return np.ascontiguousarray(samples[:, :, :3])
    raise ValueError(f"{channels} samples per pixel")


def scale_to_unit(values: np.ndarray, bits: int, signed: bool = False) -> np.ndarray:
    """Integer samples -> float32 in [0, 1] over the full range their bit depth can hold.

    Up to 24 bits in float32 itself: the samples, the offset and the span are exact there, so the
    one rounding of the division gives what float64 would (rounded to float32), in half the memory.
    """
    low = -(2 ** (bits - 1)) if signed else 0
    unit = values.astype(np.float32 if bits <= 24 else np.float64)
    unit -= low
    unit /= 2**bits - 1
    return unit.clip(0.0, 1.0, out=unit).astype(np.float32, copy=False)


def read_image(path: Path) -> np.ndarray:
    """Decode one image file: uint8 RGB for sources of 8 bits or fewer, float32 RGB for deeper ones."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise InputError(path, f"cannot read: {reason(exc)}") from exc
    if not head:
        raise InputError(path, "empty file")
    try:
        if head.startswith(TIFF_MAGIC):
            return _read_tiff(path)
        if head.startswith(PNG_MAGIC) and head[12:16] == b"IHDR":
            depth, samples = head[24], PNG_SAMPLES.get(head[25], 1)
            width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            check_size(path, width, height, samples, 2 if depth == 16 else 1)
            if depth == 16:
                return _read_png16(path)
        return _read_with_pillow(path)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(path, f"image too large: {reason(exc)}") from exc
    except Image.UnidentifiedImageError as exc:
        raise InputError(path, "not a readable PNG, JPEG, BMP or TIFF image") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, zlib.error...
        raise InputError(path, f"cannot decode image: {reason(exc)}") from exc


def _read_with_pillow(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.format not in PILLOW_FORMATS:
            raise InputError(path, f"unsupported image format {im.format}")
        check_size(path, *im.size, len(im.getbands()))
        if im.mode in ("I", "F") or im.mode.startswith("I;"):
            raise InputError(path, f"unsupported {im.format} pixel mode {im.mode}")
        if im.format in ("JPEG", "MPO") and (scans := _jpeg_scans(path)) > MAX_JPEG_SCANS:
            raise InputError(path, f"JPEG with {scans} scans, over the {MAX_JPEG_SCANS} limit")
        return np.asarray(im.convert("RGB"))


def _jpeg_scans(path: Path) -> int:
    """Start-of-scan markers (FF DA: entropy-coded data escapes every FF), counted to just past the limit."""
    count, tail = 0, b""
    with path.open("rb") as f:
        while count <= MAX_JPEG_SCANS and (chunk := f.read(1 << 20)):
            count += (tail + chunk).count(b"\xff\xda")
            tail = chunk[-1:]
    return count


def _read_png16(path: Path) -> np.ndarray:
    import cv2  # only here: Pillow cannot read 16-bit colour PNG without losing the low byte

    decoded = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16:
        raise InputError(path, "cannot decode 16-bit PNG")
    if decoded.ndim == 3:
        decoded = decoded[:, :, [2, 1, 0, 3][: decoded.shape[2]]]  # OpenCV's BGR(A) -> RGB(A)
    return as_rgb(scale_to_unit(decoded, 16))


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        if not 1 <= page.bitspersample <= 32:
            raise InputError(path, f"unsupported TIFF bits per sample {page.bitspersample}")
        if page.imagedepth > 1:
            raise InputError(path, f"TIFF volume of depth {page.imagedepth}; only 2D images are read")
        check_size(path, page.imagewidth, page.imagelength, page.samplesperpixel, -(-page.bitspersample // 8))
        if page.samplesperpixel > 4:
            raise InputError(path, f"TIFF with {page.samplesperpixel} samples per pixel; at most 4 are read")
        if len(tif.pages) > 1:
            log.warning("%s: TIFF has %d pages; only the first is read", shown(path), len(tif.pages))
        if page.bitspersample <= 8:
            return _read_with_pillow(path)
        if page.sampleformat != tifffile.SAMPLEFORMAT.UINT:
            raise InputError(path, f"unsupported TIFF sample format {page.sampleformat.name}")
        photometric = tifffile.PHOTOMETRIC
        if page.photometric not in (photometric.MINISBLACK, photometric.MINISWHITE, photometric.RGB):
            raise InputError(path, f"unsupported photometric {page.photometric.name} in a deep TIFF")
        samples = page.asarray()
        if page.axes.startswith("S"):
            samples = np.moveaxis(samples, 0, -1)
        unit = scale_to_unit(samples, page.bitspersample)
        if page.photometric == photometric.MINISWHITE:
            unit = 1.0 - unit
        return as_rgb(unit)
