"""The torch pre/postprocessing equals cv2's float32 INTER_LINEAR and the CPU path, bit for bit."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest
import torch
from conftest import cv2_with_ipp

from gms_deploy.cuda_graphs import Graphed, OneGraph
from gms_deploy.device_ops import frame_masks, masks_from_probs, preprocess_frames, upsample_probs
from gms_deploy.postprocess import to_mask, upsample
from gms_deploy.preprocess import preprocess
from gms_deploy.resize import _fma, resize_linear

# (src height, src width, dst height, dst width): the fixture's 300 x 260 -> 224, up- and downscales
# by non-integer ratios, exact 2x downscales (IPP takes them before OpenCV's INTER_AREA shortcut),
# one axis unchanged, very thin frames, single rows and columns (IPP declines those), 1-pixel outputs.
SHAPES = [
    (300, 260, 224, 224),
    (224, 224, 480, 640),
    (224, 224, 300, 260),
    (97, 131, 224, 224),
    (333, 517, 224, 224),
    (448, 448, 224, 224),
    (120, 90, 60, 45),
    (224, 224, 224, 225),
    (224, 224, 225, 224),
    (3, 500, 224, 224),
    (500, 30, 224, 224),
    (10, 10, 7, 7),
    (2, 2, 1, 1),
    (2, 50, 1, 1),
    (7, 9, 1, 30),
    (1, 1, 5, 7),
    (1, 40, 9, 13),
    (40, 1, 13, 9),
    (1, 300, 1, 224),
    (300, 1, 224, 3),
]


def _random_shapes(count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Random sizes, widths upscaled at most 8x (wider: test_wide_three_channel_upscale)."""
    rng = np.random.default_rng(seed)
    shapes = []
    while len(shapes) < count:
        src_h, src_w, dst_h, dst_w = (int(v) for v in rng.integers(1, 200, 4))
        if dst_w <= 8 * src_w:
            shapes.append((src_h, src_w, dst_h, dst_w))
    return shapes


def _image(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """uint8 content / 255, as frames reach the resize."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8).astype(np.float32) / 255.0


def _cv2_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return out.reshape(height, width, image.shape[2])


def _torch_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    return resize_linear(x, height, width)[0].permute(1, 2, 0).numpy()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are small: on shared CI cores a second intra-op thread costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cv2_with_ipp
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", SHAPES + _random_shapes(16, seed=0), ids=str)
def test_resize_is_cv2_bit_for_bit(shape: tuple[int, int, int, int], channels: int) -> None:
    src_h, src_w, dst_h, dst_w = shape
    image = _image((src_h, src_w, channels), seed=sum(shape))
    assert np.array_equal(_torch_resize(image, dst_h, dst_w), _cv2_resize(image, dst_h, dst_w))


@cv2_with_ipp
@pytest.mark.parametrize("shape", [(500, 3, 224, 224), (50, 10, 120, 100), (16, 4, 100, 319)], ids=str)
def test_wide_three_channel_upscale_is_within_its_bound(shape: tuple[int, int, int, int]) -> None:
    """Past a 9x width upscale IPP's 3-channel kernel rounds channels 0 and 1 twice in some border
    columns (documented in device_ops); one channel at a time, and channel 2, stay bit-exact."""
    src_h, src_w, dst_h, dst_w = shape
    image = _image((src_h, src_w, 3), seed=3)
    ours, theirs = _torch_resize(image, dst_h, dst_w), _cv2_resize(image, dst_h, dst_w)
    assert np.abs(ours - theirs).max() <= 2.0**-23  # the bound for data in [0, 1]; 2^-24 seen
    assert np.array_equal(ours[..., 2], theirs[..., 2])
    for channel in range(3):
        plane = np.ascontiguousarray(image[..., channel : channel + 1])
        assert np.array_equal(_torch_resize(plane, dst_h, dst_w), _cv2_resize(plane, dst_h, dst_w))


def test_same_size_is_the_input_itself() -> None:
    x = torch.rand(1, 3, 5, 7)
    assert resize_linear(x, 5, 7) is x
    prob = torch.rand(4, 4)
    assert upsample_probs(prob, 4, 4) is prob


def test_resize_rejects_what_cv2_would_compute_differently() -> None:
    with pytest.raises(ValueError, match="float32"):
        resize_linear(torch.rand(1, 3, 5, 7, dtype=torch.float64), 3, 3)


def test_fma_rounds_once_where_float64_would_round_twice() -> None:
    """1 + 2^-23 + (1 - 2^-23) * 2^-24 (1 + 2^-23) lies just below a float32 tie: a float64 sum
    lands on the tie and rounds to even (1 + 2^-22); a hardware FMA gives 1 + 2^-23."""
    a = torch.tensor([1 + 2.0**-23, -(1 + 2.0**-23)], dtype=torch.float32)
    t = torch.tensor([1 - 2.0**-23, 1 - 2.0**-23], dtype=torch.float32)
    d = torch.tensor([2.0**-24 * (1 + 2.0**-23), -(2.0**-24) * (1 + 2.0**-23)], dtype=torch.float32)
    naive = (a.double() + t.double() * d.double()).float()
    assert naive.tolist() == [1 + 2.0**-22, -(1 + 2.0**-22)]
    assert _fma(t, d, a).tolist() == [1 + 2.0**-23, -(1 + 2.0**-23)]


@pytest.mark.parametrize("shape", [(300, 260), (480, 640), (448, 448), (224, 224), (500, 30), (3, 500)])
def test_preprocess_frames_is_preprocess(shape: tuple[int, int]) -> None:
    rgb = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = preprocess_frames(torch.from_numpy(rgb), 224)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert np.array_equal(ours.numpy(), preprocess(rgb, 224))
    unit = rgb.astype(np.float32) / 255.0
    assert np.array_equal(preprocess_frames(torch.from_numpy(unit), 224).numpy(), preprocess(unit, 224))


@pytest.mark.parametrize("frame", [(300, 260), (480, 640), (112, 112), (224, 224), (57, 1000)])
def test_masks_are_the_cpu_masks(frame: tuple[int, int]) -> None:
    # A smooth map with many pixels near the threshold, like a decoded probability.
    grid = np.linspace(0.0, 1.0, 224, dtype=np.float32)
    prob = (0.5 + 0.02 * np.sin(17 * grid)[:, None] * np.cos(11 * grid)[None, :]).astype(np.float32)
    prob += np.random.default_rng(0).normal(0, 1e-4, prob.shape).astype(np.float32)
    up = upsample_probs(torch.from_numpy(prob), *frame)
    assert np.array_equal(up.numpy(), upsample(prob, *frame))
    mask = masks_from_probs(up, 0.5)
    assert mask.dtype == torch.bool
    assert np.array_equal(mask.numpy(), to_mask(upsample(prob, *frame), 0.5))
    fused = frame_masks(torch.from_numpy(prob)[None], *frame, 0.5)
    assert fused.dtype == torch.uint8 and np.array_equal(fused[0].numpy(), mask.numpy())


def test_threshold_is_strict_in_float32() -> None:
    prob = np.array([np.float32(0.3), np.nextafter(np.float32(0.3), np.float32(1)), 0.2], np.float32)
    assert masks_from_probs(torch.from_numpy(prob), 0.3).tolist() == to_mask(prob, 0.3).tolist()
    assert masks_from_probs(torch.from_numpy(prob), 0.3).tolist() == [False, True, False]


@pytest.mark.gpu
def test_gpu_matches_cpu() -> None:
    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    cpu = preprocess_frames(rgb, 224)
    gpu = preprocess_frames(rgb.cuda(), 224).cpu()
    assert torch.equal(gpu, cpu), (gpu - cpu).abs().max()
    prob = torch.rand(224, 224)
    cpu_up = upsample_probs(prob, 300, 260)
    gpu_up = upsample_probs(prob.cuda(), 300, 260).cpu()
    assert torch.equal(gpu_up, cpu_up), (gpu_up - cpu_up).abs().max()


@pytest.mark.gpu
def test_graph_replays_are_eager_bit_for_bit() -> None:
    """Shapes seen twice are captured, the least recent dropped past capacity; results never differ.

    What a replay returned stays as it was whatever replays come after it, in any order: the graphs
    share one memory pool.
    """
    rng = np.random.default_rng(4)
    pre, post = Graphed(preprocess_frames, capacity=2), Graphed(frame_masks, capacity=2)
    kept = []
    for n, height, width in [
        (2, 300, 260),
        (2, 300, 260),
        (2, 300, 260),
        (1, 57, 1000),
        (1, 57, 1000),
        (2, 300, 260),
        (1, 57, 1000),
        (4, 480, 640),
        (4, 480, 640),
        (2, 300, 260),
    ]:
        frames = torch.from_numpy(rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)).cuda()
        prob = torch.from_numpy(rng.random((n, 224, 224), dtype=np.float32)).cuda()
        results = pre(frames, 224), post(prob, height, width, 0.5)
        expected = preprocess_frames(frames, 224), frame_masks(prob, height, width, 0.5)
        assert all(torch.equal(got, want) for got, want in zip(results, expected, strict=True))
        kept.append((results, expected))
    assert all(torch.equal(got, want) for pairs in kept for got, want in zip(*pairs, strict=True))
    assert pre.enabled and post.enabled, "capture failed: see the warning"
    assert len(pre._graphs) == len(post._graphs) == 2


@cv2_with_ipp
@pytest.mark.parametrize("shape", [(300, 260), (480, 640), (3, 500)])
def test_without_ipp_the_cpu_path_keeps_the_official_numerics(shape: tuple[int, int]) -> None:
    """Where OpenCV runs its own loop (ARM wheels, IPP off), preprocessing falls back to torch."""
    rgb = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    prob = np.random.default_rng(3).random((224, 224), dtype=np.float32)
    unit = rgb.astype(np.float32) / 255
    with_ipp, ipp_resize = (preprocess(rgb, 224), upsample(prob, *shape)), _cv2_resize(unit, 224, 224)
    cv2.ipp.setUseIPP(False)
    try:
        own_loop = _cv2_resize(unit, 224, 224)
        without = preprocess(rgb, 224), upsample(prob, *shape)
    finally:
        cv2.ipp.setUseIPP(True)
    assert not np.array_equal(own_loop, ipp_resize), "OpenCV's own loop rounds otherwise"
    assert np.array_equal(without[0], with_ipp[0]) and np.array_equal(without[1], with_ipp[1])


FAILED_CAPTURE = """
import logging, torch
from gms_deploy.cuda_graphs import Graphed, OneGraph
logging.basicConfig(level=logging.WARNING)
def syncs(x):  # .item() waits for the GPU, which a stream being captured forbids
    return x * float(x.sum().item())
graphed, x, stream = Graphed(syncs), torch.ones(4, device="cuda"), torch.cuda.Stream()
with torch.cuda.stream(stream):
    for _ in range(3):  # eager, failed capture, eager
        assert torch.equal(graphed(x), syncs(x))
        assert torch.cuda.current_stream() == stream, "capture left its own stream current"
assert not graphed.enabled
print("fell back")
"""


@pytest.mark.gpu
def test_a_failed_capture_runs_eagerly_on_the_callers_stream() -> None:
    """In a process of its own: a failed capture must not leave this one's CUDA state to other tests."""
    done = subprocess.run([sys.executable, "-c", FAILED_CAPTURE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fell back" in done.stdout, done.stdout + done.stderr
    assert "syncs: running without CUDA graphs" in done.stderr


class _Launches:
    """What a context's launches did: run eagerly, captured, or replayed (a graph needs no GPU here)."""

    def __init__(self, fail_capture: Exception | None = None) -> None:
        self.log: list[str] = []
        self.fail = fail_capture

    def run(self, graphs: OneGraph, batch: int) -> None:
        graphs.run(batch, lambda: self.log.append(f"run {batch}"), lambda: self.capture(batch))

    def capture(self, batch: int) -> Callable[[], None]:
        if self.fail is not None:
            raise self.fail
        self.log.append(f"capture {batch}")
        return lambda: self.log.append(f"replay {batch}")


def test_one_graph_is_not_recaptured_for_alternating_chunks() -> None:
    """A batch beyond the profile runs as 8, 4, 8, 4: capturing each anew would synchronise every chunk."""
    launches, graphs = _Launches(), OneGraph("engine")
    for batch in (8, 4, 8, 4, 8):
        launches.run(graphs, batch)
    assert launches.log == ["run 8", "capture 8", "run 4", "replay 8", "run 4", "replay 8"]
    launches.log.clear()
    for batch in (4, 4, 4):  # an out-of-memory retry's halved batch, from then on
        launches.run(graphs, batch)
    assert launches.log == ["run 4", "run 4", "capture 4", "replay 4"]


def test_a_failed_capture_is_said_once_and_not_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    """TensorRT's launch failing inside capture raises the engine's own error, not a RuntimeError."""
    from gms_deploy.trt.engine import EngineLoadError

    launches = _Launches(EngineLoadError("gms_fp16.engine: failed to run it (execute_async_v3)"))
    graphs = OneGraph("gms_fp16.engine", errors=(EngineLoadError,))
    for batch in (2, 2, 2, 1, 1):
        launches.run(graphs, batch)
    assert launches.log == ["run 2", "run 2", "run 2", "run 1", "run 1"]  # every batch still ran
    assert caplog.text.count("running without CUDA graphs") == 1 and "execute_async_v3" in caplog.text
    assert not graphs.enabled
