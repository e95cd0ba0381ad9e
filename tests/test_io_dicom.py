"""iter_dicom_frames and read_regions on the real files pydicom ships, and on broken ones."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from io_corpus import dicom_dataset, dicom_example, random_uint, write_dicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    iter_pixels,
)
from pydicom.uid import MPEG2MPML, DeflatedExplicitVRLittleEndian, RLELossless

from gms_deploy.io.dicom import iter_dicom_frames, read_regions
from gms_deploy.io.frames import InputError, UltrasoundRegion


def frames(path: Path) -> list[tuple[int | None, np.ndarray, tuple[UltrasoundRegion, ...]]]:
    return list(iter_dicom_frames(path))


def only_pixels(path: Path) -> np.ndarray:
    [(index, pixels, _)] = frames(path)
    assert index is None
    return pixels


def stored(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def test_rgb_ultrasound_is_the_stored_uint8() -> None:
    path = dicom_example("examples_rgb_color.dcm")
    [(index, pixels, regions)] = frames(path)
    assert (index, regions) == (None, ())
    assert pixels.dtype == np.uint8 and pixels.shape == (240, 320, 3)
    np.testing.assert_array_equal(pixels, stored(path))


def test_ybr_cine_is_converted_to_rgb_exactly_once(caplog: pytest.LogCaptureFixture) -> None:
    path = dicom_example("examples_ybr_color.dcm")
    with caplog.at_level(logging.WARNING):
        cine = frames(path)
    assert [index for index, _, _ in cine] == list(range(30))
    assert {(p.dtype, p.shape) for _, p, _ in cine} == {(np.dtype(np.uint8), (240, 320, 3))}
    raw = list(iter_pixels(path, raw=True))
    for index in (0, 17, 29):
        once = convert_color_space(raw[index], "YBR_FULL", "RGB")
        np.testing.assert_array_equal(cine[index][1], once)
        twice = convert_color_space(once, "YBR_FULL", "RGB")
        assert np.abs(twice.astype(int) - once).mean() > 5  # what converting again would have done
    # grey-scale ultrasound: the channels agree, as they would not after a second conversion
    channel_means = cine[0][1].reshape(-1, 3).mean(axis=0)
    assert np.ptp(channel_means) < 1.0
    # its one region was written for the 640 x 480 original: clipped, distrusted, said once for 30 frames
    [region] = cine[0][2]
    assert all(regions == (region,) for _, _, regions in cine)
    assert (region.x0, region.y0, region.x1, region.y1) == (84, 31, 320, 240)
    assert region.is_tissue_2d_cm
    assert region.delta_x == pytest.approx(0.05104970559477806)
    assert region.distrust == (
        "ultrasound region 1 (84,31)-(595,414) overruns the 320 x 240 image: "
        "its box and spacing describe other pixels"
    )
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: {region.distrust}; no area and no crop come from it"
    ]


def test_jpeg2k_ybr_rct_is_the_rgb_example_at_twice_the_size() -> None:
    """pydicom's examples_jpeg2k.dcm (YBR_RCT) and examples_rgb_color.dcm are one picture at two sizes."""
    big = only_pixels(dicom_example("examples_jpeg2k.dcm"))
    small = only_pixels(dicom_example("examples_rgb_color.dcm")).astype(float)
    assert big.dtype == np.uint8 and big.shape == (480, 640, 3)
    halved = big.reshape(240, 2, 320, 2, 3).mean(axis=(1, 3))
    assert np.abs(halved - small).mean() < 3
    twice = convert_color_space(big, "YBR_FULL", "RGB").reshape(240, 2, 320, 2, 3).mean(axis=(1, 3))
    assert np.abs(twice - small).mean() > 20


def test_palette_is_applied_and_its_regions_distrusted_or_skipped(caplog: pytest.LogCaptureFixture) -> None:
    path = dicom_example("examples_palette.dcm")
    with caplog.at_level(logging.WARNING):
        [(index, pixels, regions)] = frames(path)
    assert index is None
    ds = pydicom.dcmread(path)
    wide = apply_color_lut(ds.pixel_array, ds)  # 16-bit entries, all multiples of 256
    assert pixels.dtype == np.uint8 and pixels.shape == (350, 800, 3)
    np.testing.assert_array_equal(pixels, wide >> 8)
    distrust = (
        "ultrasound region 1 (120,60)-(800,518) overruns the 800 x 350 image: "
        "its box and spacing describe other pixels"
    )
    assert regions == (
        UltrasoundRegion(120, 60, 800, 350, 1, 3, 3, 0.02622878766196998, 0.02622878766196998, distrust),
    )
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: {distrust}; no area and no crop come from it",
        f"{path}: ultrasound region 2 skipped: box (176,522)-(743,576) and the 800 x 350 image "
        "do not overlap",
    ]


def test_big_endian_and_compressed_copies_decode_like_the_original() -> None:
    np.testing.assert_array_equal(
        only_pixels(dicom_example("ExplVR_BigEnd.dcm")), stored(dicom_example("ExplVR_BigEnd.dcm"))
    )
    original = only_pixels(dicom_example("MR_small.dcm"))
    assert original.dtype == np.float32
    for copy in ("MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_array_equal(only_pixels(dicom_example(copy)), original, err_msg=copy)


def test_window_matches_pydicoms_windowing_normalised() -> None:
    path = dicom_example("MR_small.dcm")  # signed 16-bit, window 600/1600
    ds = pydicom.dcmread(path)
    displayed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    expected = (displayed + 32768) / 65535  # pydicom's window output spans the signed 16-bit range
    pixels = only_pixels(path)
    np.testing.assert_allclose(pixels[:, :, 0], expected, atol=1e-6)
    np.testing.assert_array_equal(pixels[:, :, 0], pixels[:, :, 2])


@pytest.mark.parametrize(("function", "center", "width"), [("LINEAR_EXACT", 900, 700), ("SIGMOID", 700, 300)])
def test_other_window_functions_match_pydicom(tmp_path: Path, function: str, center: int, width: int) -> None:
    ds = pydicom.dcmread(dicom_example("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    path = write_dicom(tmp_path / "w.dcm", ds)
    expected = (apply_voi_lut(ds.pixel_array, ds) + 32768) / 65535
    np.testing.assert_allclose(only_pixels(path)[:, :, 0], expected, atol=1e-6)


def test_voi_lut_is_applied_and_clamped_at_its_ends(tmp_path: Path) -> None:
    grey = random_uint((7, 5), np.uint16) >> 4  # 12 bits, 0 to 4095
    ds = dicom_dataset(grey, "MONOCHROME2", 12)
    lut = Dataset()
    lut.LUTDescriptor = [2048, 0, 16]  # covers only half the stored range
    lut.add_new("LUTData", "OW", (np.arange(2048, dtype="<u2") * 32).tobytes())
    ds.VOILUTSequence = [lut]
    ds.WindowCenter, ds.WindowWidth = 10, 2  # ignored: the LUT wins, as in pydicom
    pixels = only_pixels(write_dicom(tmp_path / "voi.dcm", ds))
    np.testing.assert_allclose(pixels[:, :, 0], np.minimum(grey, 2047) * 32 / 65535, atol=1e-7)


def test_without_a_window_stored_values_scale_by_bits_stored() -> None:
    ct = dicom_example("CT_small.dcm")  # signed 16 bits, rescale but no window
    np.testing.assert_allclose(only_pixels(ct)[:, :, 0], (stored(ct) + 32768.0) / 65535, atol=1e-7)
    nm = dicom_example("JPGExtended.dcm")  # 12 bits stored in 16
    np.testing.assert_allclose(only_pixels(nm)[:, :, 1], stored(nm) / 4095, atol=1e-7)


def test_bits_above_bits_stored_are_not_part_of_the_value(tmp_path: Path) -> None:
    """12 bits in 16 span [0, 1]; bits set above BitsStored (old overlay planes) are dropped, not scaled."""
    grey = random_uint((7, 5), np.uint16) >> 4
    ds = dicom_dataset(grey, "MONOCHROME2", 12)
    ds.PixelData = (grey | 0xF000).astype("<u2").tobytes()
    pixels = only_pixels(write_dicom(tmp_path / "high.dcm", ds))
    np.testing.assert_allclose(pixels[:, :, 0], grey / 4095, atol=1e-7)
    assert pixels.max() == 1.0


def test_16bit_rgb_rle_cine() -> None:
    path = dicom_example("SC_rgb_rle_16bit_2frame.dcm")
    cine = frames(path)
    assert [index for index, _, _ in cine] == [0, 1]
    for (_, pixels, _), expected in zip(cine, stored(path), strict=True):
        assert pixels.dtype == np.float32
        np.testing.assert_array_equal(pixels, (expected / 65535).astype(np.float32))


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_ybr_colour_bars_match_the_rgb_colour_bars(name: str) -> None:
    reference = only_pixels(dicom_example("SC_rgb_rle.dcm")).astype(int)
    assert np.abs(only_pixels(dicom_example(name)).astype(int) - reference).mean() < 2


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_pixel_data_header_only_the_full_reader_accepts() -> None:
    """SC_rgb_jpeg.dcm writes an implicit-VR Pixel Data header in an explicit-VR file."""
    path = dicom_example("SC_rgb_jpeg.dcm")
    np.testing.assert_array_equal(only_pixels(path), stored(path))


def test_file_without_meta_header_is_read(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_example("MR_small.dcm"))
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "old"
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    np.testing.assert_array_equal(only_pixels(path), only_pixels(dicom_example("MR_small.dcm")))


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    grey8 = random_uint((7, 5), np.uint8)
    eight = only_pixels(write_dicom(tmp_path / "m8.dcm", dicom_dataset(grey8, "MONOCHROME1", 8)))
    np.testing.assert_array_equal(eight, np.repeat(255 - grey8[:, :, None], 3, axis=2))
    grey12 = random_uint((7, 5), np.uint16) >> 4
    deep = only_pixels(write_dicom(tmp_path / "m12.dcm", dicom_dataset(grey12, "MONOCHROME1", 12)))
    np.testing.assert_allclose(deep[:, :, 0], 1 - grey12 / 4095, atol=1e-7)


def test_uncompressed_cine_frames_keep_their_order(tmp_path: Path) -> None:
    cine = random_uint((4, 7, 5), np.uint8)
    decoded = frames(write_dicom(tmp_path / "cine.dcm", dicom_dataset(cine)))
    assert [index for index, _, _ in decoded] == [0, 1, 2, 3]
    for (_, pixels, _), expected in zip(decoded, cine, strict=True):
        np.testing.assert_array_equal(pixels[:, :, 0], expected)


def test_cine_cut_short_yields_the_good_frames_then_names_the_bad_one(tmp_path: Path) -> None:
    data = dicom_example("examples_ybr_color.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    decoded = iter_dicom_frames(path)
    good = 0
    with pytest.raises(InputError) as caught:
        for _ in decoded:
            good += 1
    assert 5 < good < 30
    assert str(caught.value) == f"{path}: frame {good} of 30: pixel data ends early"


def _broken_dicoms(tmp_path: Path) -> dict[str, Path]:
    names = ("text", "noise", "empty", "cut", "plan", "structure set", "ion plan")
    files = {name: tmp_path / f"{name}.dcm" for name in names}
    files["text"].write_text("patient notes\nnot DICOM\n")
    files["noise"].write_bytes(np.random.default_rng(1).bytes(3000))
    files["empty"].write_bytes(b"")
    rgb = dicom_example("examples_rgb_color.dcm").read_bytes()
    files["cut"].write_bytes(rgb[: len(rgb) // 2])
    files["plan"].write_bytes(dicom_example("rtplan.dcm").read_bytes())
    # Neither has the preamble: datasets written without the file format, which pydicom still reads.
    files["structure set"].write_bytes(dicom_example("rtstruct.dcm").read_bytes())
    files["ion plan"].write_bytes(dicom_example("ExplVR_LitEndNoMeta.dcm").read_bytes())

    no_pixels = dicom_dataset(random_uint((7, 5), np.uint8))
    del no_pixels.PixelData
    files["no pixel data"] = write_dicom(tmp_path / "nopixels.dcm", no_pixels)

    mpeg = pydicom.dcmread(dicom_example("examples_rgb_color.dcm"))
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(100)])
    mpeg["PixelData"].VR = "OB"
    files["no decoder"] = write_dicom(tmp_path / "mpeg.dcm", mpeg)

    zero = dicom_dataset(random_uint((7, 5), np.uint8))
    zero.NumberOfFrames = 0
    files["zero frames"] = write_dicom(tmp_path / "zero.dcm", zero)

    hsv = dicom_dataset(random_uint((7, 5, 3), np.uint8), "RGB")
    hsv.PhotometricInterpretation = "HSV"
    files["photometric"] = write_dicom(tmp_path / "hsv.dcm", hsv)

    palette = pydicom.dcmread(dicom_example("examples_palette.dcm"))
    palette.BitsStored = 32  # a 2**32-entry table to build, were it believed
    files["palette bits"] = write_dicom(tmp_path / "palette32.dcm", palette)

    # One RLE segment that decodes past the frame: pylibjpeg-rle's Rust decoder panics on it, and a
    # panic reaches Python as a BaseException, past every ``except Exception``.
    rle = dicom_dataset(np.zeros((2, 2), np.uint16), bits_stored=16)
    high, low = bytes([9, *range(1, 11)]), bytes([3, 1, 2, 3, 4])
    rle.PixelData = encapsulate([struct.pack("<16I", 2, 64, 64 + len(high), *[0] * 13) + high + low])
    rle["PixelData"].VR = "OB"
    rle.file_meta.TransferSyntaxUID = RLELossless
    files["rle panic"] = write_dicom(tmp_path / "rle.dcm", rle)

    files["deflate bomb"] = _deflate_bomb(tmp_path / "bomb.dcm", 400 << 20)

    one_sample_rgb = dicom_dataset(random_uint((7, 5), np.uint8))
    one_sample_rgb.PhotometricInterpretation = "RGB"
    files["samples"] = write_dicom(tmp_path / "rgb1.dcm", one_sample_rgb)

    no_green = pydicom.dcmread(dicom_example("examples_palette.dcm"))
    del no_green.GreenPaletteColorLookupTableData
    files["palette table"] = write_dicom(tmp_path / "nogreen.dcm", no_green)
    return files


def _deflate_bomb(path: Path, inflated: int) -> Path:
    """A deflated DICOM file of about ``inflated / 1000`` bytes whose dataset inflates to ``inflated``."""
    write_dicom(path, dicom_dataset(random_uint((7, 5), np.uint8)))
    meta = pydicom.filereader.read_file_meta_info(path)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(head, meta, enforce_standard=True)
    deflate, zeros = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS), bytes(1 << 20)
    body = b"".join(deflate.compress(zeros) for _ in range(inflated >> 20)) + deflate.flush()
    path.write_bytes(bytes(128) + b"DICM" + head.getvalue() + body)
    return path


def test_broken_files_raise_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    reasons = {}
    for what, path in _broken_dicoms(tmp_path).items():
        with pytest.raises(InputError) as caught:
            frames(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, what
        reasons[what] = caught.value.problem
    assert reasons["text"] == reasons["noise"] == reasons["empty"] == "not DICOM"
    assert "less than expected" in reasons["cut"]
    assert reasons["plan"] == "DICOM (RT Plan) holds no image (no pixel data)"
    assert reasons["structure set"] == "DICOM (RT Structure Set) holds no image (no pixel data)"
    assert reasons["ion plan"] == "DICOM (RT Ion Plan) holds no image (no pixel data)"
    assert "no 'Pixel Data'" in reasons["no pixel data"]
    assert "MPEG2" in reasons["no decoder"] and "not supported" in reasons["no decoder"]
    assert reasons["zero frames"] == "zero frames"
    assert reasons["photometric"] == "unsupported photometric interpretation HSV"
    assert reasons["palette bits"] == "PALETTE COLOR with 32 stored bits (palettes index at most 16)"
    assert reasons["rle panic"].startswith("pixel data: cannot decode:")
    assert reasons["deflate bomb"] == "deflated DICOM inflates to over 341 MiB, the limit"
    assert reasons["samples"] == "RGB with 1 samples per pixel, not 3"
    assert reasons["palette table"] == "no Green palette table"


def region_item(box: tuple[int, int, int, int], **overrides: object) -> Dataset:
    item = Dataset()
    keys = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")
    for key, value in zip(keys, box, strict=True):
        setattr(item, key, value)
    item.RegionSpatialFormat = 1
    item.PhysicalUnitsXDirection = 3
    item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX = 0.01
    item.PhysicalDeltaY = -0.02
    for key, value in overrides.items():
        if value is None:
            delattr(item, key)
        else:
            setattr(item, key, value)
    return item


def test_regions_are_exclusive_clipped_distrusted_and_invalid_ones_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ds = Dataset()
    ds.SequenceOfUltrasoundRegions = [
        region_item((0, 0, 9, 19)),
        region_item((10, 10, 41, 31)),  # two pixels past the image: other pixels
        region_item((0, 0, 9, 9), PhysicalDeltaX=None),
        region_item((60, 0, 70, 9)),
        region_item((20, 5, 10, 9)),
        region_item((5, 25, 9, 29), RegionSpatialFormat=4, PhysicalUnitsYDirection=0),
        region_item((0, 0, 40, 30)),  # Max = width: the off-by-one of inclusive bounds, trusted
    ]
    with caplog.at_level(logging.WARNING):
        regions = read_regions(ds, height=30, width=40, path=Path("scan.dcm"))
    distrust = (
        "ultrasound region 2 (10,10)-(41,31) overruns the 40 x 30 image: "
        "its box and spacing describe other pixels"
    )
    assert regions == (
        UltrasoundRegion(0, 0, 10, 20, 1, 3, 3, 0.01, -0.02),
        UltrasoundRegion(10, 10, 40, 30, 1, 3, 3, 0.01, -0.02, distrust),
        UltrasoundRegion(5, 25, 10, 30, 4, 3, 0, 0.01, -0.02),
        UltrasoundRegion(0, 0, 40, 30, 1, 3, 3, 0.01, -0.02),
    )
    assert regions[0].mm2_per_pixel == pytest.approx(0.02)
    assert not regions[2].is_tissue_2d_cm
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        f"scan.dcm: {distrust}; no area and no crop come from it",
        "scan.dcm: ultrasound region 3 skipped: no PhysicalDeltaX",
        "scan.dcm: ultrasound region 4 skipped: box (60,0)-(70,9) and the 40 x 30 image do not overlap",
        "scan.dcm: ultrasound region 5 skipped: box (20,5)-(10,9) and the 40 x 30 image do not overlap",
    ]


def test_no_region_sequence_means_no_regions() -> None:
    assert read_regions(Dataset(), height=3, width=3, path=Path("x.dcm")) == ()


def test_modalities_unlike_the_training_data_are_named_once_per_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photo = dicom_dataset(random_uint((7, 5, 3), np.uint8), "RGB")
    photo.Modality = "XC"
    unnamed = dicom_dataset(random_uint((7, 5), np.uint8))  # no Modality: nothing to say
    ct, dose = dicom_example("CT_small.dcm"), dicom_example("rtdose.dcm")  # rtdose: a 15-frame dose grid
    with caplog.at_level(logging.WARNING):
        for path in (ct, dose, dicom_example("examples_rgb_color.dcm")):
            frames(path)
        frames(write_dicom(tmp_path / "photo.dcm", photo))
        frames(write_dicom(tmp_path / "unnamed.dcm", unnamed))
    assert [record.getMessage() for record in caplog.records] == [
        f"{ct}: modality CT (not ultrasound); segmented anyway, the model was not trained on it",
        f"{dose}: modality RTDOSE (not ultrasound); segmented anyway, the model was not trained on it",
    ]
