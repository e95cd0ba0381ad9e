"""DICOM files -> RGB frames, one at a time, with the ultrasound regions that give them a physical size.

Frames are decoded by ``pydicom.pixels.iter_pixels`` straight from the file, one per step, so a long
cine never sits in memory whole. pydicom 3 hands colour over as RGB whatever the photometric
interpretation says (YBR_FULL/YBR_FULL_422 are converted once by pydicom, YBR_RCT/YBR_ICT inside
the JPEG 2000 decoder), so nothing here converts colour again: doing so tints the picture.

Bit depth follows the ``Frame`` contract:

* 8 unsigned stored bits (every ultrasound file met so far) -> the stored uint8 values, exactly what
  a PNG export of the same picture holds. Window and rescale are ignored here on purpose: the
  model saw stored pixels, not a display transform. MONOCHROME1 is inverted (255 - v), and a
  palette is applied (see ``_palette_table``).
* Anything deeper -> float32 in [0, 1]. Grey images with a VOI LUT or a window go through the
  Modality LUT/rescale and then that VOI (the first one: the standard makes it the default),
  which is how a viewer would show them; otherwise the stored values are scaled over the range
  their BitsStored can hold (a linear rescale would not change that picture). pydicom masks the
  bits above BitsStored and sign-extends signed values, so 12 bits in 16 span [0, 1] exactly.

GMS was trained on ultrasound, histology, dermoscopy and endoscopy pictures. Files of those
modalities, and the screen captures that ultrasound exports often are, are read silently; any other
modality (CT, MR, NM, PT, RTDOSE, SEG...) is segmented as asked, with one warning per file, since
the masks mean little there. A file without a Modality says nothing to warn about.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, iter_pixels
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from gms_deploy.io.frames import InputError, UltrasoundRegion
from gms_deploy.io.images import MAX_DECODED_BYTES, as_rgb, check_size, scale_to_unit
from gms_deploy.messages import reason, shown

log = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# What pydicom's decoders hand over as RGB (see the module docstring).
RGB_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"})
# Pictures like GMS's training data: ultrasound (US, intravascular IVUS), external-camera photos
# (XC), dermoscopy (DMS), endoscopy (ES), microscopy (GM, SM), and secondary captures (OT, and SC,
# not a defined term but written by some capture software).
TRAINED_LIKE_MODALITIES = frozenset({"US", "IVUS", "XC", "DMS", "ES", "GM", "SM", "OT", "SC"})

_BOX = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")
_CALIBRATION = (
    "RegionSpatialFormat",
    "PhysicalUnitsXDirection",
    "PhysicalUnitsYDirection",
    "PhysicalDeltaX",
    "PhysicalDeltaY",
)

DicomFrame = tuple[int | None, np.ndarray, tuple[UltrasoundRegion, ...]]


def has_dicom_preamble(path: Path) -> bool:
    """True for files in the DICOM file format: whatever their name, they hold "DICM" at byte 128."""
    with Path(path).open("rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def iter_dicom_frames(path: Path) -> Iterator[DicomFrame]:
    """Yield (frame index, or None for a single-frame file; RGB pixels; regions) frame by frame."""
    path = Path(path)
    ds = _read_header(path)
    try:
        count = _frame_count(path, ds)
        rows, columns = int(ds.Rows), int(ds.Columns)
        check_size(path, columns, rows)
        convert = _pixel_converter(path, ds)
        regions = read_regions(ds, rows, columns, path)
        modality = _modality(ds)
    except InputError:
        raise
    except Exception as exc:  # malformed image attributes or palette tables
        raise InputError(path, f"invalid image attributes: {reason(exc)}") from exc
    if modality and modality not in TRAINED_LIKE_MODALITIES:
        log.warning(
            "%s: modality %s (not ultrasound); segmented anyway, the model was not trained on it",
            shown(path),
            modality,
        )
    frames = _decoded(path, ds)
    for index in range(count):
        where = "pixel data" if count == 1 else f"frame {index} of {count}"
        try:
            pixels = convert(next(frames))
        except StopIteration:
            raise InputError(path, f"{where}: pixel data ends early") from None
        except (InputError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # ValueError, RuntimeError...; Rust decoders' panics are BaseExceptions
            raise InputError(path, f"{where}: cannot decode: {reason(exc)}") from exc
        yield (None if count == 1 else index), pixels, regions


def read_regions(ds: Dataset, height: int, width: int, path: Path) -> tuple[UltrasoundRegion, ...]:
    """The usable items of SequenceOfUltrasoundRegions (0018,6011), boxes clipped to the image.

    Read once per file, so each warning is said once however many frames share the regions. Real
    files carry regions that are incomplete or lie partly or wholly outside the stored image
    (pydicom's own examples do, after their pixel data was rescaled or cropped). Incomplete ones
    and those wholly outside are skipped. One that overruns the image by more than a pixel on a
    side describes other pixels, its box as much as its spacing (examples_ybr_color.dcm, halved
    to 320 x 240, keeps a box for 640 x 480: clipped, it would cut off a quarter of the sector):
    it is kept, clipped, with ``distrust`` set, so that no area and no crop comes from it while the
    missing area can still be explained. An overrun of one pixel is the common off-by-one of
    DICOM's inclusive Max bounds (a Max equal to the width): clipped and trusted.
    """
    regions = []
    for number, item in enumerate(ds.get("SequenceOfUltrasoundRegions") or (), start=1):
        region = _region(item, height, width, number, path)
        if region is not None:
            regions.append(region)
    return tuple(regions)


def _region(item: Dataset, height: int, width: int, number: int, path: Path) -> UltrasoundRegion | None:
    name = f"{shown(path)}: ultrasound region {number}"
    missing = [key for key in (*_BOX, *_CALIBRATION) if item.get(key) in (None, "")]
    if missing:
        log.warning("%s skipped: no %s", name, ", ".join(missing))
        return None
    try:
        x0, y0, max_x, max_y = (int(item.get(key)) for key in _BOX)
        spatial_format, units_x, units_y = (int(item.get(key)) for key in _CALIBRATION[:3])
        delta_x, delta_y = float(item.PhysicalDeltaX), float(item.PhysicalDeltaY)
    except (TypeError, ValueError) as exc:
        log.warning("%s skipped: %s", name, reason(exc))
        return None
    if not (math.isfinite(delta_x) and math.isfinite(delta_y)):
        log.warning("%s skipped: physical delta is not finite", name)
        return None
    box = (max(x0, 0), max(y0, 0), min(max_x + 1, width), min(max_y + 1, height))
    stated = f"({x0},{y0})-({max_x},{max_y})"
    if box[0] >= box[2] or box[1] >= box[3]:
        log.warning("%s skipped: box %s and the %d x %d image do not overlap", name, stated, width, height)
        return None
    overrun = max(-x0, -y0, max_x + 1 - width, max_y + 1 - height)
    distrust = ""
    if overrun > 1:
        distrust = (
            f"ultrasound region {number} {stated} overruns the {width} x {height} image: "
            "its box and spacing describe other pixels"
        )
        log.warning("%s: %s; no area and no crop come from it", shown(path), distrust)
    elif overrun == 1:
        log.info("%s %s clipped by the one pixel of an inclusive-bound off-by-one", name, stated)
    return UltrasoundRegion(*box, spatial_format, units_x, units_y, delta_x, delta_y, distrust)


def _read_header(path: Path) -> Dataset:
    try:
        preamble = has_dicom_preamble(path)
        if preamble:
            _check_inflated_size(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(path, f"cannot read: {reason(exc)}") from exc
    except Exception as exc:
        raise InputError(path, f"cannot read DICOM header: {reason(exc)}") from exc
    if "Rows" not in ds or "Columns" not in ds:
        if not (preamble or _parsed_as_dicom(ds)):
            raise InputError(path, "not DICOM")
        raise InputError(path, f"DICOM{_object_name(ds)} holds no image (no pixel data)")
    return ds


def _parsed_as_dicom(ds: Dataset) -> bool:
    """Whether a file without the preamble held DICOM elements, not bytes that ``force=True`` accepted.

    Forced, pydicom makes a dataset of nonsense elements out of any text or noise. Datasets written
    without the file format (ACR-NEMA style images, RT plans and structure sets) open with group
    0008 (SOP Class, Modality, dates), which nonsense rarely hits, and hardly ever with a known tag.
    """
    return any(map(dictionary_has_tag, ds.group_dataset(0x0008).keys()))


def _object_name(ds: Dataset) -> str:
    """`` (RT Structure Set)``: what the file holds, by its SOP class or else its modality, where it says."""
    if sop := ds.get("SOPClassUID"):
        uid = UID(str(sop))
        return f" ({uid.name.removesuffix(' Storage') if uid.name != uid else f'SOP class {uid}'})"
    return f" (modality {modality})" if (modality := _modality(ds)) else ""


def _modality(ds: Dataset) -> str:
    return " ".join(str(ds.get("Modality") or "").split()).upper()


def _check_inflated_size(path: Path) -> None:
    """Refuse a deflated dataset that inflates beyond ``MAX_DECODED_BYTES`` before pydicom inflates it.

    pydicom inflates a deflated file whole, pixel data included (even to read its header), and
    deflate packs up to 1000:1, so a 1 MB file can otherwise take gigabytes. Inflated here in
    chunks that are counted and dropped.
    """
    meta = pydicom.filereader.read_file_meta_info(path)
    length = meta.get("FileMetaInformationGroupLength")
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian or length is None:
        return
    inflate, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with path.open("rb") as f:
        f.seek(132 + 12 + int(length))  # preamble and "DICM", the group length element, the meta group
        while not inflate.eof and (data := f.read(1 << 20)):
            while data:
                inflated += len(inflate.decompress(data, 1 << 24))
                if inflated > MAX_DECODED_BYTES:
                    limit = MAX_DECODED_BYTES / 2**20
                    raise InputError(path, f"deflated DICOM inflates to over {limit:.0f} MiB, the limit")
                data = inflate.unconsumed_tail


def _frame_count(path: Path, ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    try:
        count = 1 if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise InputError(path, f"invalid NumberOfFrames {value!r}") from None
    if count < 1:
        raise InputError(path, "zero frames")
    return count


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's syntax, or for a file with no meta header (old ACR-NEMA style) the one pydicom guessed."""
    if syntax := ds.file_meta.get("TransferSyntaxUID"):
        return UID(syntax)
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _decoded(path: Path, ds: Dataset) -> Iterator[np.ndarray]:
    """Stream frames from the file; if that fails before the first frame, decode from the whole file.

    The streaming reader is strict about the Pixel Data element's header, and some writers get it
    wrong (pydicom's SC_rgb_jpeg.dcm: an implicit-VR header in an explicit-VR file) while the full
    reader copes. A file the full reader also rejects gets the full reader's error.
    """
    syntax = _transfer_syntax(ds)
    streamed = iter_pixels(path, transfer_syntax_uid=syntax)
    try:
        first = next(streamed)
    except StopIteration:
        return
    except Exception:
        whole = pydicom.dcmread(path, force=True)
        whole.file_meta.TransferSyntaxUID = syntax
        yield from iter_pixels(whole)
        return
    yield first
    yield from streamed


def _pixel_converter(path: Path, ds: Dataset) -> Callable[[np.ndarray], np.ndarray]:
    """Decide once per file how decoded samples become contract pixels; every frame then takes that path."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    if not 1 <= bits <= 32:
        raise InputError(path, f"unsupported BitsStored {bits}")
    eight_bit = bits == 8 and not signed
    if photometric not in RGB_PHOTOMETRICS | {"PALETTE COLOR", "MONOCHROME1", "MONOCHROME2"}:
        raise InputError(path, f"unsupported photometric interpretation {photometric or '(missing)'}")
    samples = ds.get("SamplesPerPixel") or 1
    expected = 3 if photometric in RGB_PHOTOMETRICS else 1
    if samples != expected:
        raise InputError(path, f"{photometric} with {samples} samples per pixel, not {expected}")
    if photometric == "PALETTE COLOR":
        if bits > 16:  # the LUT descriptor counts entries in 16 bits; a 2**32 table would not fit anyway
            raise InputError(path, f"PALETTE COLOR with {bits} stored bits (palettes index at most 16)")
        _check_palette(path, ds)
        table = _palette_table(ds, bits)
        return lambda samples: table[samples]
    if photometric in RGB_PHOTOMETRICS:
        if eight_bit:
            return lambda samples: samples.astype(np.uint8, copy=False)
        return lambda samples: scale_to_unit(samples, bits, signed)
    invert = photometric == "MONOCHROME1"
    if eight_bit:
        return lambda samples: as_rgb(255 - samples.astype(np.uint8) if invert else samples.astype(np.uint8))
    to_unit = _grey_to_unit(path, ds, bits, signed)
    return lambda samples: as_rgb(1.0 - to_unit(samples) if invert else to_unit(samples))


def _check_palette(path: Path, ds: Dataset) -> None:
    """Each colour's table is there, with 8 or 16 bits per entry, before pydicom builds the lookup."""
    for colour in ("Red", "Green", "Blue"):
        descriptor = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        valid = isinstance(descriptor, MultiValue | list) and len(descriptor) == 3
        if not valid or descriptor[2] not in (8, 16):
            raise InputError(path, f"invalid {colour} palette descriptor {descriptor!r}")
        tables = (f"{colour}PaletteColorLookupTableData", f"Segmented{colour}PaletteColorLookupTableData")
        if not any(table in ds for table in tables):
            raise InputError(path, f"no {colour} palette table")


def _palette_table(ds: Dataset, bits: int) -> np.ndarray:
    """Every palette entry as RGB, so a frame is one table lookup.

    A 16-bit palette whose entries all have a zero low byte is an 8-bit palette written wide
    (examples_palette.dcm is one): it stays uint8, so the frame matches its 8-bit PNG export.
    """
    table = apply_color_lut(np.arange(2**bits, dtype=np.uint16 if bits > 8 else np.uint8), ds)
    if table.dtype == np.uint8:
        return table
    if not np.any(table & 0xFF):
        return (table >> 8).astype(np.uint8)
    return scale_to_unit(table, 16)


def _grey_to_unit(path: Path, ds: Dataset, bits: int, signed: bool) -> Callable[[np.ndarray], np.ndarray]:
    if voi_luts := ds.get("VOILUTSequence"):
        entries, first, depth = (int(v) for v in voi_luts[0].LUTDescriptor)
        last = first + (entries or 2**16) - 1

        def through_voi_lut(samples: np.ndarray) -> np.ndarray:
            # apply_voi wraps values past its uint16 index range instead of clamping them: clamp first
            values = np.clip(np.rint(apply_modality_lut(samples, ds)), first, last).astype(np.int64)
            return (apply_voi(values, ds) / float(2**depth - 1)).astype(np.float32)

        return through_voi_lut
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        if width <= 0:
            raise InputError(path, f"invalid WindowWidth {width}")
        return lambda samples: _window(apply_modality_lut(samples, ds), center, width, function)
    return lambda samples: scale_to_unit(samples, bits, signed)


def _first(value: object) -> float:
    return float(value[0] if isinstance(value, MultiValue) else value)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2-3 windowing with output range [0, 1].

    pydicom's apply_windowing maps onto a range that depends on BitsStored, signedness and rescale;
    the formulas with y_min = 0 and y_max = 1 give the normalised picture directly.
    """
    values = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # far below the centre exp() overflows to inf, giving 0: right
            return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        low, span = center - width / 2, width
    else:  # LINEAR, the default, also for values the standard does not define
        low, span = center - 0.5 - (width - 1) / 2, width - 1
    if span <= 0:  # LINEAR with width 1 is a threshold
        return (values > low).astype(np.float32)
    return np.clip((values - low) / span, 0.0, 1.0).astype(np.float32)


def dicom_frame_count(path: Path) -> int | None:
    """The frames a DICOM file says it holds, from its header alone; None where it cannot say."""
    try:
        return _frame_count(path, _read_header(path))
    except InputError:
        return None
