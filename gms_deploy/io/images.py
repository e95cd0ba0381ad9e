"""PNG, JPEG, BMP and TIFF files -> H x W x 3 RGB arrays.

8-bit sources go through ``PIL.Image.open(p).convert("RGB")`` and nothing else, because that is
what the official GMS code feeds its model: grey becomes three equal channels, alpha is dropped,
palettes are expanded, ICC profiles are ignored, and so is the EXIF orientation of JPEG and PNG
(the official ``data/image_dataset.py`` reads every image that way and calls no ``exif_transpose``).
Applying it would be friendlier to phone photos but would give the model a different picture than
the one the released weights were evaluated on, so parity wins; such a file gets a warning, since
its mask does not line up with the picture viewers show. A TIFF's Orientation tag is another
matter: Pillow applies it as it loads the pixels, so the official code does too, and so do the deep
TIFF reader here and viewers.

Deeper sources cannot take that path: Pillow silently cuts 16-bit RGB PNG and TIFF to 8 bits and
clips (rather than scales) 16-bit grey on ``convert``. They are read by OpenCV (16-bit PNG) or
tifffile (TIFF) and returned as float32 in [0, 1], scaled over the range the file declares: a
TIFF's MaxSampleValue, a PNG's sBIT, else the full range of the stored bits. A file that declares
nothing and uses only the low bits (12-bit data saved as 16 bits) comes out nearly black that way,
but nothing tells that apart from a dark picture, so it is scaled as stored, with a warning.

Multi-page TIFFs give their first page only, with a warning (Pillow does the same for animated PNG
and MPO, silently): the pipeline's frames come from DICOM cines, and a page stack has no agreed
frame semantics (pyramid levels, channels, time) to mirror.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
EXIF_ORIENTATION = 0x0112  # also TIFF's own Orientation tag
# What viewers do with a picture of each EXIF orientation, and the same on a rows x columns array,
# as Pillow transposes a TIFF; 1 (stored as shown) and invalid values are shown as stored.
ORIENTATION_SHOWN = {
    2: "mirrored left to right",
    3: "turned 180°",
    4: "mirrored top to bottom",
    5: "mirrored across its main diagonal",
    6: "turned 90° clockwise",
    7: "mirrored across its anti-diagonal",
    8: "turned 90° counter-clockwise",
}
ORIENTED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda pixels: pixels[:, ::-1],
    3: lambda pixels: pixels[::-1, ::-1],
    4: lambda pixels: pixels[::-1],
    5: lambda pixels: pixels.swapaxes(0, 1),
    6: lambda pixels: np.rot90(pixels, -1),
    7: lambda pixels: pixels.swapaxes(0, 1)[::-1, ::-1],
    8: lambda pixels: np.rot90(pixels, 1),
}
TIFF_MAX_SAMPLE_VALUE = 281
# A deep image whose brightest sample is below 1/16 of its range (under 4096 in 16 bits) is much more
# likely narrow data in a wide container than a picture that dark.
NARROW_BITS_MARGIN = 4


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


def scale_to_unit(values: np.ndarray, bits: int, signed: bool = False, top: int | None = None) -> np.ndarray:
    """Integer samples -> float32 in [0, 1] over the full range their bit depth can hold, or up to
    ``top`` where the file declares a smaller maximum (values above it become 1).

    Up to 24 bits in float32 itself: the samples, the offset and the span are exact there, so the
    one rounding of the division gives what float64 would (rounded to float32), in half the memory.
    """
    low = -(2 ** (bits - 1)) if signed else 0
    unit = values.astype(np.float32 if bits <= 24 else np.float64)
    unit -= low
    unit /= 2**bits - 1 if top is None else top - low
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
        rgb = np.asarray(im.convert("RGB"))
        try:  # after convert: a PNG's eXIf may follow its pixels, and is only read with them
            orientation = im.getexif().get(EXIF_ORIENTATION)
        except Exception:  # EXIF Pillow cannot parse is no reason to refuse what the official code reads
            orientation = None
        _warn_orientation(path, orientation)
        return rgb


def _warn_orientation(path: Path, orientation: object) -> None:
    if isinstance(orientation, int) and orientation in ORIENTATION_SHOWN:
        log.warning(
            "%s: EXIF orientation %s (viewers show it %s) is ignored, as the official GMS code ignores "
            "it: masks follow the stored pixels, not the picture viewers show",
            shown(path),
            orientation,
            ORIENTATION_SHOWN[orientation],
        )


def _undeclared_to_unit(
    path: Path, samples: np.ndarray, bits: int, fix: str = "", inverted: bool = False
) -> np.ndarray:
    """Samples of a file that declares no range narrower than its ``bits`` -> [0, 1] over all of them.

    Where the data uses only the low bits, the picture is scaled as stored anyway: guessing a range
    would brighten real dark pictures, and the user can fix the file (``fix`` says how besides
    rescaling). Said once per file.
    """
    if 0 < (peak := int(samples.max(initial=0))) < 2 ** (bits - NARROW_BITS_MARGIN):
        log.warning(
            "%s: the image uses only %d of its %d bits (largest value %d) and declares no smaller range, "
            "so it is scaled by %d and comes out nearly %s; rescale the file to its full %d-bit range%s",
            shown(path),
            peak.bit_length(),
            bits,
            peak,
            2**bits - 1,
            "white" if inverted else "black",
            bits,
            fix,
        )
    return scale_to_unit(samples, bits)


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

    decoded = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)  # no EXIF rotation
    if decoded is None or decoded.dtype != np.uint16:
        raise InputError(path, "cannot decode 16-bit PNG")
    if decoded.ndim == 3:
        decoded = decoded[:, :, [2, 1, 0, 3][: decoded.shape[2]]]  # OpenCV's BGR(A) -> RGB(A)
    chunks = _png_chunks(path, frozenset({b"sBIT", b"eXIf"}))
    _warn_orientation(path, _exif_orientation(chunks.get(b"eXIf", b"")))
    samples = as_rgb(decoded)
    bits = _significant_bits(chunks.get(b"sBIT", b""), 1 if decoded.ndim == 2 or decoded.shape[2] == 2 else 3)
    if bits is None:
        return _undeclared_to_unit(path, samples, 16)
    if samples.max(initial=0) >= 2**bits:
        # Scaled up to 16 bits as the PNG standard asks: the top bits are the original value. A file
        # whose values all fit in its sBIT depth holds them unscaled, as some writers store them.
        samples = samples >> (16 - bits)
    return scale_to_unit(samples, bits)


def _png_chunks(path: Path, wanted: frozenset[bytes]) -> dict[bytes, bytes]:
    """The first chunk of each ``wanted`` type, walking the others by their lengths without reading them.

    The walk needs no CRCs (the decoder checks those): a chunk that claims more than 1 MiB is skipped,
    as no sBIT or eXIf is that large.
    """
    found: dict[bytes, bytes] = {}
    with path.open("rb") as f:
        f.seek(len(PNG_MAGIC))
        while len(head := f.read(8)) == 8 and head[4:] != b"IEND":
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in wanted and kind not in found and length <= 1 << 20:
                found[kind] = f.read(length)
                f.seek(4, 1)
            else:
                f.seek(length + 4, 1)
    return found


def _significant_bits(sbit: bytes, colours: int) -> int | None:
    """The colour samples' depth an sBIT chunk states (the deepest where they differ), if under 16.

    One depth for all colours keeps their balance; an invalid chunk (a zero, over 16, too short) is
    ignored, as libpng ignores it.
    """
    if len(sbit) < colours or not all(1 <= depth <= 16 for depth in sbit[:colours]):
        return None
    bits = max(sbit[:colours])
    return bits if bits < 16 else None


def _exif_orientation(exif: bytes) -> object:
    if not exif:
        return None
    parsed = Image.Exif()
    try:
        parsed.load(exif)
    except Exception:  # unreadable EXIF: the picture is still what the file stores
        return None
    return parsed.get(EXIF_ORIENTATION)


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
        samples, bits = as_rgb(samples), page.bitspersample
        inverted = page.photometric == photometric.MINISWHITE
        if top := _max_sample_value(page, 3 if page.photometric == photometric.RGB else 1):
            unit = scale_to_unit(samples, bits, top=top)
        else:
            unit = _undeclared_to_unit(path, samples, bits, " (or state it in MaxSampleValue)", inverted)
        if inverted:
            unit = 1.0 - unit
        orientation = getattr(page.tags.get(EXIF_ORIENTATION), "value", 1)
        orient = ORIENTED.get(orientation) if isinstance(orientation, int) else None
        return unit if orient is None else np.ascontiguousarray(orient(unit))


def _max_sample_value(page: tifffile.TiffPage, colours: int) -> int | None:
    """The largest colour value a TIFF declares (tag 281, per sample; the largest where they differ).

    The default, the full range of BitsPerSample, and values outside it declare nothing narrower.
    """
    tag = page.tags.get(TIFF_MAX_SAMPLE_VALUE)
    if tag is None:
        return None
    values = tag.value if isinstance(tag.value, tuple) else (tag.value,)
    top = max(int(value) for value in values[:colours])
    return top if 0 < top < 2**page.bitspersample - 1 else None
