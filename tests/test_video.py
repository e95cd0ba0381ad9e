"""Video files as inputs of `infer`: real clips written by FFmpeg (through PyAV), decoded one frame
at a time; masks into a lossless video at the input's timestamps, the same masks as PNG frames give."""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_infer import _InterruptedRunner

from gms_deploy.backends.torch_eager import TorchRunner
from gms_deploy.bundle import ModelBundle, demo_bundle
from gms_deploy.infer import InferOptions, run_inference

av = pytest.importorskip("av", reason="video needs PyAV: pip install 'gms-deploy[video]'")

SAMPLE = (
    Path(__file__).resolve().parents[1] / "gms_deploy" / "data" / "samples" / "images" / "phantom_900000.png"
)
FRAMES = 8


def write_clip(path: Path, codec: str, rate: int = 15, size: tuple[int, int] = (96, 112)) -> list[np.ndarray]:
    """A clip of the demo sample panning sideways; returns the frames as the decoder gives them back."""
    base = np.asarray(Image.open(SAMPLE).convert("RGB").resize(size[::-1]))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = size[1], size[0]
        stream.pix_fmt = "yuv420p" if codec != "mjpeg" else "yuvj420p"
        for i in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def read_video(path: Path) -> tuple[list[np.ndarray], list[float]]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
        return [f.to_ndarray(format="gray") for f in frames], [float(f.time) for f in frames]


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo() -> ModelBundle:
    return demo_bundle()


@pytest.mark.parametrize(("name", "codec"), [("clip.mp4", "libx264"), ("clip.avi", "mjpeg")])
def test_a_video_gives_the_masks_its_frames_give_as_png(
    demo: ModelBundle, tmp_path: Path, name: str, codec: str
) -> None:
    clip = tmp_path / "in" / name
    clip.parent.mkdir()
    decoded = write_clip(clip, codec)
    runner = TorchRunner(demo)
    out = tmp_path / "out"
    report = run_inference([clip], runner, InferOptions(out, overlay=True, frames_png=True, batch_size=3))
    assert report.ok and report.frames == FRAMES and report.files == 1
    masks, times = read_video(out / "clip_mask.mkv")
    assert len(masks) == FRAMES and all(m.shape == (96, 112) for m in masks)
    # each decoded frame, written as PNG and segmented as an image: the same mask, bit for bit
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, frame in enumerate(decoded):
        Image.fromarray(frame).save(pngs / f"f{i}.png")
    run_inference([pngs], runner, InferOptions(tmp_path / "png-out"))
    for i, mask in enumerate(masks):
        expected = np.asarray(Image.open(tmp_path / "png-out" / "pngs" / f"f{i}_mask.png")) > 0
        assert np.array_equal(mask > 127, expected), i
        assert np.array_equal(np.asarray(Image.open(out / f"clip_f{i:04d}_mask.png")) > 0, expected)
    with av.open(str(clip)) as source:
        expected_times = [float(f.time) for f in source.decode(video=0)]
    assert times == pytest.approx(expected_times, abs=5e-4)  # the input's timestamps (Matroska keeps ms)
    table = rows(out)
    assert [int(r["frame"]) for r in table] == list(range(FRAMES))
    assert [float(r["time"]) for r in table] == pytest.approx(expected_times, abs=1e-6)
    assert {r["output"] for r in table} == {str(out / "clip_mask.mkv")}
    with av.open(str(out / "clip_overlay.mp4")) as overlay:
        assert overlay.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in overlay.decode(video=0)) == FRAMES
    assert not list(out.glob(".*"))  # no temporary file left


def test_a_finished_video_is_skipped_and_an_interrupted_one_redone(
    tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    clip = tmp_path / "clip.mp4"
    write_clip(clip, "libx264", rate=10)
    out = tmp_path / "out"
    runner = TorchRunner(tiny_bundle)
    first = run_inference([clip], runner, InferOptions(out))
    assert first.frames == FRAMES and (out / "clip_mask.mkv").is_file()
    again = run_inference([clip], runner, InferOptions(out))
    assert again.frames == 0 and again.skipped == FRAMES
    (out / "clip_mask.mkv").unlink()

    with pytest.raises(KeyboardInterrupt):
        run_inference([clip], _InterruptedRunner(tiny_bundle), InferOptions(out, batch_size=2))
    assert not (out / "clip_mask.mkv").exists() and not list(out.glob(".*"))  # no half video
    redone = run_inference([clip], runner, InferOptions(out))
    assert redone.frames == FRAMES and len(read_video(out / "clip_mask.mkv")[0]) == FRAMES


def test_a_broken_video_is_one_line_and_the_rest_goes_on(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    write_clip(folder / "good.mp4", "libx264")
    report = run_inference([folder], TorchRunner(tiny_bundle), InferOptions(tmp_path / "out"))
    assert report.frames == FRAMES and len(report.failures) == 1
    assert (
        report.failures[0].startswith(f"{folder / 'broken.mp4'}: cannot open video")
        and "\n" not in report.failures[0]
    )


def test_the_frame_count_comes_from_the_container(tmp_path: Path) -> None:
    from gms_deploy.io.inputs import Source, frame_count

    write_clip(tmp_path / "c.mp4", "libx264", rate=30)
    assert frame_count(Source(tmp_path / "c.mp4", Path("c.mp4"))) == FRAMES
    with av.open(str(tmp_path / "c.mp4")) as c:
        assert c.streams.video[0].average_rate == Fraction(30)
