"""read_image on real files: parity with the official convert("RGB"), exact deep scaling, clean errors."""

from __future__ import annotations

import logging
import re
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from io_corpus import FORMAT_MODES, H, W, png_bytes, png_with_size, random_uint, write_8bit_corpus
from PIL import Image

from gms_deploy.io.frames import InputError
from gms_deploy.io.images import MAX_PIXELS, read_image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_8bit_corpus(tmp_path_factory.mktemp("images"))


ALL_8BIT = [f"{mode}.{suffix}" for suffix, modes in FORMAT_MODES.items() for mode in modes] + ["cmyk.jpg"]


@pytest.mark.parametrize("name", ALL_8BIT)
def test_8bit_sources_equal_the_official_convert_rgb(corpus: dict[str, Path], name: str) -> None:
    pixels = read_image(corpus[name])
    with Image.open(corpus[name]) as im:
        expected = np.asarray(im.convert("RGB"))
    assert pixels.dtype == np.uint8
    assert pixels.shape == (H, W, 3)
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize("suffix", ["png", "bmp", "tif"])
def test_8bit_modes_mean_what_the_official_path_means(corpus: dict[str, Path], suffix: str) -> None:
    def source(mode: str) -> np.ndarray:
        with Image.open(corpus[f"{mode}.{suffix}"]) as im:
            return np.asarray(im)

    grey = read_image(corpus[f"grey.{suffix}"])
    np.testing.assert_array_equal(grey, np.repeat(source("grey")[:, :, None], 3, axis=2))
    bilevel = read_image(corpus[f"bilevel.{suffix}"])
    assert set(np.unique(bilevel)) <= {0, 255}
    np.testing.assert_array_equal(bilevel[:, :, 0] == 255, source("bilevel"))
    with Image.open(corpus[f"palette.{suffix}"]) as im:
        lut = np.array(im.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(read_image(corpus[f"palette.{suffix}"]), lut[np.asarray(im)])
    if suffix != "bmp":
        np.testing.assert_array_equal(read_image(corpus[f"rgba.{suffix}"]), source("rgba")[:, :, :3])


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_scales_by_65535_and_drops_alpha(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, channels: int
) -> None:
    samples = random_uint((H, W, channels), np.uint16, seed=channels)
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(samples))
    with caplog.at_level(logging.WARNING):
        pixels = read_image(path)
    assert not caplog.records
    colour = samples[:, :, :3] if channels >= 3 else np.repeat(samples[:, :, :1], 3, axis=2)
    assert pixels.dtype == np.float32
    assert pixels.shape == (H, W, 3)
    np.testing.assert_array_equal(pixels, (colour / 65535.0).astype(np.float32))
    assert pixels.min() == 0.0 and pixels.max() == 1.0


@pytest.mark.parametrize(
    ("samples", "options"),
    [
        (random_uint((H, W), np.uint16), {}),
        (random_uint((H, W, 3), np.uint16), {"photometric": "rgb"}),
        (random_uint((H, W, 4), np.uint16), {"photometric": "rgb", "extrasamples": ["unassalpha"]}),
        (random_uint((3, H, W), np.uint16), {"photometric": "rgb", "planarconfig": "separate"}),
        (random_uint((H, W, 3), np.uint16), {"photometric": "rgb", "compression": "zlib"}),
    ],
    ids=["grey", "rgb", "rgba", "planar", "deflate"],
)
def test_16bit_tiff_scales_by_65535(tmp_path: Path, samples: np.ndarray, options: dict) -> None:
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, samples, **options)
    pixels = read_image(path)
    if options.get("planarconfig") == "separate":
        samples = np.moveaxis(samples, 0, -1)
    colour = samples[:, :, :3] if samples.ndim == 3 else np.repeat(samples[:, :, None], 3, axis=2)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, (colour / 65535.0).astype(np.float32))


def with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """``png`` with one more chunk right after IHDR (where sBIT and eXIf may stand)."""
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def twelve_bit(shape: tuple[int, ...]) -> np.ndarray:
    return random_uint(shape, np.uint16) >> 4  # 0 to 4095, both present


@pytest.mark.parametrize("stored", ["as the standard asks", "unscaled"])
def test_16bit_png_with_sbit_scales_by_its_significant_bits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stored: str
) -> None:
    values = twelve_bit((H, W, 3))
    # The standard's way: the 12 bits on top, repeated into the low ones. Some writers skip that.
    samples = (values << 4) | (values >> 8) if stored == "as the standard asks" else values
    path = tmp_path / "sbit.png"
    path.write_bytes(with_chunk(png_bytes(samples), b"sBIT", bytes([12, 12, 12])))
    with caplog.at_level(logging.WARNING):
        pixels = read_image(path)
    np.testing.assert_array_equal(pixels, (values / 4095.0).astype(np.float32))
    assert not caplog.records


def test_16bit_png_using_12_bits_is_scaled_by_65535_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values = twelve_bit((H, W))
    path = tmp_path / "narrow.png"
    assert cv2.imwrite(str(path), values)
    with caplog.at_level(logging.WARNING):
        pixels = read_image(path)
    np.testing.assert_array_equal(pixels[:, :, 0], (values / 65535.0).astype(np.float32))
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: the image uses only 12 of its 16 bits (largest value 4095) and declares no smaller range, "
        "so it is scaled by 65535 and comes out nearly black; rescale the file to its full 16-bit range"
    ]


def test_16bit_tiff_with_max_sample_value_scales_by_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values = twelve_bit((H, W, 3))
    path = tmp_path / "declared.tif"
    tifffile.imwrite(path, values, photometric="rgb", extratags=[(281, "H", 3, (4095, 4095, 4095), True)])
    with caplog.at_level(logging.WARNING):
        pixels = read_image(path)
    np.testing.assert_array_equal(pixels, (values / 4095.0).astype(np.float32))
    assert not caplog.records


def test_12bit_tiff_scales_by_4095(tmp_path: Path) -> None:
    values = twelve_bit((H, W))
    path = tmp_path / "packed.tif"
    tifffile.imwrite(path, values, bitspersample=12)
    np.testing.assert_array_equal(read_image(path)[:, :, 0], (values / 4095.0).astype(np.float32))


@pytest.mark.parametrize(("photometric", "looks"), [("minisblack", "black"), ("miniswhite", "white")])
def test_16bit_tiff_using_12_bits_is_scaled_by_65535_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, photometric: str, looks: str
) -> None:
    values = twelve_bit((H, W))
    path = tmp_path / "narrow.tif"
    tifffile.imwrite(path, values, photometric=photometric, extratags=[(281, "H", 1, 65535, True)])
    with caplog.at_level(logging.WARNING):
        pixels = read_image(path)
    unit = (values / 65535.0).astype(np.float32)
    np.testing.assert_array_equal(pixels[:, :, 0], 1 - unit if photometric == "miniswhite" else unit)
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: the image uses only 12 of its 16 bits (largest value 4095) and declares no smaller range, "
        f"so it is scaled by 65535 and comes out nearly {looks}; rescale the file to its full 16-bit range "
        "(or state it in MaxSampleValue)"
    ]


def test_16bit_miniswhite_tiff_is_inverted(tmp_path: Path) -> None:
    samples = random_uint((H, W), np.uint16)
    path = tmp_path / "white.tif"
    tifffile.imwrite(path, samples, photometric="miniswhite")
    expected = (1.0 - (samples / 65535.0).astype(np.float32))[:, :, None].repeat(3, axis=2)
    np.testing.assert_array_equal(read_image(path), expected)


def test_multipage_tiff_reads_the_first_page_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pages = random_uint((3, H, W), np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, pages, photometric="minisblack")
    with caplog.at_level(logging.WARNING):
        pixels = read_image(path)
    np.testing.assert_array_equal(pixels[:, :, 0], (pages[0] / 65535.0).astype(np.float32))
    assert "3 pages" in caplog.text and str(path) in caplog.text


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _rotated_files(folder: Path, orientation: int) -> dict[str, Path]:
    """One file per reader that ignores EXIF orientation, with ``orientation`` set."""
    pixels = random_uint((H, W, 3), np.uint8)
    files = {suffix: folder / f"rotated.{suffix}" for suffix in ("png", "jpg")}
    for path in files.values():
        Image.fromarray(pixels).save(path, exif=_exif(orientation))
    files["16-bit png"] = folder / "rotated16.png"
    deep = png_bytes(random_uint((H, W, 3), np.uint16))
    files["16-bit png"].write_bytes(with_chunk(deep, b"eXIf", _exif(orientation).tobytes()))
    return files


def test_exif_orientation_is_not_applied_but_said_once_per_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The official path ignores EXIF orientation; applying it would show the model another picture."""
    files = _rotated_files(tmp_path, 6)  # "rotate 90 degrees clockwise to display"
    with caplog.at_level(logging.WARNING):
        for path in files.values():
            pixels = read_image(path)
            assert pixels.shape == (H, W, 3), path
            if path.suffix == ".jpg":
                with Image.open(path) as im:
                    np.testing.assert_array_equal(pixels, np.asarray(im.convert("RGB")))
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: EXIF orientation 6 (viewers show it turned 90° clockwise) is ignored, as the official GMS "
        "code ignores it: masks follow the stored pixels, not the picture viewers show"
        for path in files.values()
    ]


def test_exif_orientation_1_says_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        for path in _rotated_files(tmp_path, 1).values():
            read_image(path)
    assert not caplog.records


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_is_applied_at_every_depth_as_pillow_applies_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, orientation: int
) -> None:
    """Pillow transposes a TIFF by its Orientation tag as it loads it, so the official code sees it turned."""
    pixels = random_uint((H, W, 3), np.uint8)
    shallow, deep = tmp_path / "rotated.tif", tmp_path / "rotated16.tif"
    Image.fromarray(pixels).save(shallow, exif=_exif(orientation))
    wide = pixels.astype(np.uint16) * 257  # the same picture in 16 bits
    tifffile.imwrite(deep, wide, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    with caplog.at_level(logging.WARNING):
        eight, sixteen = read_image(shallow), read_image(deep)
    with Image.open(shallow) as im:
        np.testing.assert_array_equal(eight, np.asarray(im.convert("RGB")))
    assert eight.shape == ((W, H, 3) if orientation >= 5 else (H, W, 3))
    np.testing.assert_array_equal(sixteen, (eight / 255.0).astype(np.float32))
    assert sixteen.flags.c_contiguous and not caplog.records


def _truncated(source: Path, destination: Path) -> Path:
    data = source.read_bytes()
    destination.write_bytes(data[: len(data) * 2 // 3])
    return destination


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    big = Image.fromarray(random_uint((64, 64, 3), np.uint8))
    big.save(tmp_path / "big.png")
    big.save(tmp_path / "big.jpg")
    files = {
        "truncated png": _truncated(tmp_path / "big.png", tmp_path / "cut.png"),
        "truncated jpeg": _truncated(tmp_path / "big.jpg", tmp_path / "cut.jpg"),
        "empty": tmp_path / "empty.png",
        "random bytes": tmp_path / "noise.png",
        "text": tmp_path / "notes.png",
        "zero-size png": tmp_path / "zero.png",
        "zero-size tiff": tmp_path / "zero.tif",
        "bomb": tmp_path / "bomb.png",
        "gif": tmp_path / "animation.gif",
        "float tiff": tmp_path / "float.tif",
        "folder": tmp_path / "folder.png",
        "missing": tmp_path / "missing.png",
        "deep bomb": tmp_path / "deep.png",
        "many samples": tmp_path / "samples.tif",
        "volume": tmp_path / "volume.tif",
        "scan bomb": tmp_path / "scans.jpg",
        "absurd bits": tmp_path / "bits.tif",
    }
    files["empty"].write_bytes(b"")
    files["random bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["text"].write_text("not an image\nat all\n")
    files["zero-size png"].write_bytes(png_with_size(0, 4))
    with pytest.warns(UserWarning, match="zero-size"):
        tifffile.imwrite(files["zero-size tiff"], np.zeros((0, 4), np.uint16))
    files["bomb"].write_bytes(png_with_size(20_000, 20_000))
    # Under the pixel limit, over the decoded-bytes one: 16-bit RGB (its header claims it).
    deep = bytearray(png_with_size(9400, 9400))
    deep[24:26] = bytes([16, 2])
    deep[29:33] = zlib.crc32(bytes(deep[12:29])).to_bytes(4, "big")
    files["deep bomb"].write_bytes(bytes(deep))
    extra = {"photometric": "rgb", "planarconfig": "contig", "extrasamples": ["unspecified"] * 2}
    tifffile.imwrite(files["many samples"], np.zeros((4, 4, 5), np.uint16), **extra)
    volume = {"volumetric": True, "tile": (16, 16), "photometric": "minisblack"}
    tifffile.imwrite(files["volume"], np.zeros((3, 16, 16), np.uint16), **volume)
    files["scan bomb"].write_bytes(_repeated_scans(tmp_path / "big.jpg", 120))
    files["absurd bits"].write_bytes(_bits_per_sample_as_long8(tmp_path / "deep32.tif"))
    Image.fromarray(random_uint((H, W), np.uint8)).save(files["gif"])
    tifffile.imwrite(files["float tiff"], np.zeros((H, W), np.float32))
    files["folder"].mkdir()
    return files


def test_every_failure_is_one_line_naming_the_file(tmp_path: Path) -> None:
    for what, path in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as caught:
            read_image(path)
        message = str(caught.value)
        assert "\n" not in message, what
        assert message.startswith(f"{path}: "), what
        assert caught.value.path == path, what


def test_failures_say_why(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    reasons = {what: _reason(path) for what, path in files.items()}
    assert reasons["empty"] == "empty file"
    assert "zero size" in reasons["zero-size tiff"]
    assert reasons["bomb"] == f"image too large: 20000 x 20000 pixels, over the {MAX_PIXELS} limit"
    assert "truncated" in reasons["truncated png"] and "truncated" in reasons["truncated jpeg"]
    assert "GIF" in reasons["gif"]
    assert "sample format" in reasons["float tiff"]
    assert "cannot read" in reasons["missing"] and "cannot read" in reasons["folder"]
    assert reasons["deep bomb"].startswith("image too large: 9400 x 9400 x 3 samples of 2 byte(s)")
    assert "5 samples per pixel" in reasons["many samples"] and "volume of depth 3" in reasons["volume"]
    assert reasons["absurd bits"] == "unsupported TIFF bits per sample 281543713095680"
    assert re.fullmatch(r"JPEG with 1\d\d scans, over the 100 limit", reasons["scan bomb"])


def _bits_per_sample_as_long8(path: Path) -> bytes:
    """A 32-bit TIFF whose BitsPerSample entry says LONG8: tifffile reads 281543713095680 bits."""
    tifffile.imwrite(path, np.zeros((5, 7), np.uint32))
    data = bytearray(path.read_bytes())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", data, ifd)[0], 12):
        if struct.unpack_from("<H", data, entry)[0] == 258:  # BitsPerSample: type SHORT -> LONG8
            struct.pack_into("<H", data, entry + 2, 16)
    return bytes(data)


def _repeated_scans(jpeg: Path, extra: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: decoders run every scan over the whole image."""
    with Image.open(jpeg) as im:
        im.save(jpeg.with_suffix(".progressive.jpg"), progressive=True)
    data = jpeg.with_suffix(".progressive.jpg").read_bytes()
    last, end = data.rindex(b"\xff\xda"), len(data) - 2  # the last scan, up to the end-of-image marker
    return data[:end] + data[last:end] * extra + data[end:]


def _reason(path: Path) -> str:
    with pytest.raises(InputError) as caught:
        read_image(path)
    return caught.value.problem
