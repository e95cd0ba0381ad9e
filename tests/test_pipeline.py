"""The pipeline around the network: threads and queues, the fused path, fallbacks and backend choice.

Everything here runs on the CPU: the fused segmenter runs its torch ops on the CPU device (the same
code a GPU runs), and GPU faults are injected by runners that raise what CUDA would raise.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gms_deploy.backends import BackendError, open_auto, open_runner
from gms_deploy.backends.torch_eager import TorchRunner
from gms_deploy.bundle import ModelBundle, demo_bundle
from gms_deploy.cli import app
from gms_deploy.infer import InferOptions, run_inference
from gms_deploy.io.images import read_image
from gms_deploy.metrics import dice
from gms_deploy.model.checkpoints import CheckpointError
from gms_deploy.segment import FusedSegmenter, HostSegmenter, Segmenter, segmenter_for
from gms_deploy.stream import Prefetch, Writer

cli = CliRunner()
SAMPLES = Path(__file__).resolve().parents[1] / "gms_deploy" / "data" / "samples" / "images"


def _frames() -> list[np.ndarray]:
    """Real sample images, odd shapes, and a float32 frame as a 16-bit source gives."""
    rng = np.random.default_rng(0)
    frames = [read_image(path) for path in sorted(SAMPLES.iterdir())[:3]]
    frames.append(rng.integers(0, 256, (33, 21, 3), dtype=np.uint8))
    frames.append(rng.integers(0, 256, (5, 300, 3), dtype=np.uint8))
    frames.append(rng.random((47, 64, 3), dtype=np.float32))
    return frames


def _segment(segmenter: Segmenter, frames: list[np.ndarray], threshold: float) -> list:
    return segmenter([segmenter.prepare(f) for f in frames], threshold, keep_prob=True)


# Threads and queues


def _count(n: int) -> Iterator[int]:
    yield from range(n)


def test_prefetch_reads_files_on_several_threads_and_keeps_their_order() -> None:
    active, most = 0, 0
    lock = threading.Lock()

    def produce(item: int) -> Iterator[tuple[int, int]]:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.02 * (item % 3))  # later files often finish first
        yield from ((item, frame) for frame in range(item % 4 + 1))
        with lock:
            active -= 1

    with Prefetch(range(12), produce, workers=4, depth=2) as reader:
        got = list(reader)
    assert got == [(item, frame) for item in range(12) for frame in range(item % 4 + 1)]
    assert most >= 2, "files are decoded side by side"


def test_prefetch_reads_only_a_few_frames_ahead() -> None:
    produced: list[int] = []

    def produce(item: int) -> Iterator[int]:
        for frame in range(1000):
            produced.append(frame)
            yield frame

    with Prefetch([0, 1, 2], produce, workers=2, depth=3) as reader:
        frames = iter(reader)
        next(frames)
        time.sleep(0.3)
        # Each of the two files in flight holds its queue and one frame in hand.
        assert len(produced) <= 2 * (3 + 2), "a long cine loop must not be read ahead whole"
        assert sum(1 for _ in frames) == 3 * 1000 - 1


def test_prefetch_hands_a_files_error_to_the_consumer_in_its_place() -> None:
    def produce(item: int) -> Iterator[int]:
        if item == 2:
            raise ValueError("disk gone")
        yield from _count(2)

    seen = []
    with pytest.raises(ValueError, match="disk gone"), Prefetch(range(5), produce, workers=3) as reader:
        for frame in reader:
            seen.append(frame)
    assert seen == [0, 1, 0, 1]


def test_prefetch_close_stops_endless_files() -> None:
    def endless(item: int) -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    reader = Prefetch(range(100), endless, workers=3, depth=2)
    assert next(iter(reader)) == 0
    reader.close()
    assert not any(t.name.startswith("gms-read") and t.is_alive() for t in threading.enumerate())


def test_writer_runs_jobs_in_order_and_finishes_them_on_exit() -> None:
    done: list[int] = []
    with Writer(depth=2) as writer:
        for i in range(20):
            writer.submit(lambda i=i: (time.sleep(0.001), done.append(i)))
    assert done == list(range(20))


def test_writer_raises_a_failed_jobs_error_and_runs_nothing_after_it() -> None:
    done: list[str] = []

    def broken() -> None:
        raise RuntimeError("bug in a job")

    writer = Writer(depth=4)
    writer.submit(broken)
    writer.submit(lambda: done.append("after"))
    with pytest.raises(RuntimeError, match="bug in a job"):
        writer.close()
    assert done == []


# The fused path against the host path


def test_fused_segmenter_on_the_cpu_gives_the_host_paths_masks(
    tiny_bundle: ModelBundle, one_thread: None
) -> None:
    runner = TorchRunner(tiny_bundle)
    host, fused = segmenter_for(runner), segmenter_for(runner, fused=True)
    assert isinstance(host, HostSegmenter) and isinstance(fused, FusedSegmenter)
    frames = _frames() + [np.flipud(f).copy() for f in _frames()[:3]]  # frames of one size go together
    reference = _segment(host, frames, 0.5)
    # A threshold inside the tiny model's range, so that masks are neither empty nor full.
    threshold = float(np.median(np.concatenate([r.prob.ravel() for r in reference])))
    reference = _segment(host, frames, threshold)
    results = _segment(fused, frames, threshold)
    for frame, ref, got in zip(frames, reference, results, strict=True):
        assert got.mask.shape == frame.shape[:2] and got.mask.dtype == bool
        assert 0 < ref.mask.mean() < 1
        assert np.abs(got.prob - ref.prob).max() <= 1e-6
        assert np.array_equal(got.mask, ref.mask)
        # the confidence columns, computed on the device by the same function as on the host
        assert ref.confidence is not None and got.confidence == pytest.approx(ref.confidence, abs=1e-6)
        assert got.uncertain == pytest.approx(ref.uncertain, abs=1e-6)
        inside = ref.prob > threshold
        assert ref.confidence == pytest.approx(float(ref.prob[inside].mean()), abs=1e-6)
        assert ref.uncertain == pytest.approx(float(np.mean((ref.prob >= 0.3) & (ref.prob <= 0.7))))


def test_host_runners_cannot_take_the_fused_path(tiny_onnx: Path) -> None:
    with pytest.raises(ValueError, match="fused pipeline needs a torch runner"):
        segmenter_for(open_runner("onnxruntime", tiny_onnx), fused=True)


class _SmallGpu(TorchRunner):
    """Fault injection: a device with room for two frames at a time."""

    def __init__(self, bundle: ModelBundle) -> None:
        super().__init__(bundle)
        self.batches: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return super().forward(images)


@pytest.mark.parametrize("fused", [False, True])
def test_out_of_memory_halves_the_batch_and_remembers(
    fused: bool, tiny_bundle: ModelBundle, one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    runner = _SmallGpu(tiny_bundle)
    segmenter = segmenter_for(runner, fused=fused)
    frames = _frames()
    results = _segment(segmenter, frames, 0.5)
    expected = _segment(segmenter_for(TorchRunner(tiny_bundle), fused=fused), frames, 0.5)
    # Batches of one and of six may round differently on the CPU; the probabilities must agree.
    assert all(np.abs(a.prob - b.prob).max() <= 1e-4 for a, b in zip(results, expected, strict=True))
    assert runner.batches[:3] == [6, 3, 1] and segmenter.max_batch == 1
    assert "out of memory at batch size 6" in caplog.text
    runner.batches.clear()
    _segment(segmenter, frames[:2], 0.5)
    assert runner.batches == [1, 1], "the size that fitted is kept for later batches"


# The driver


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    for i, frame in enumerate(_frames()[:5]):
        Image.fromarray(frame).save(root / f"{i:02d}.png")
    (root / "03b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


def test_fused_and_host_runs_write_the_same_masks_in_input_order(
    folder: Path, tiny_bundle: ModelBundle, tmp_path: Path, one_thread: None
) -> None:
    runner = TorchRunner(tiny_bundle)
    outs = {}
    for fused in (False, True):
        out = tmp_path / f"out-{fused}"
        options = InferOptions(out, batch_size=2, threshold=0.5, save_prob=True)
        report = run_inference([folder], runner, options, segmenter=segmenter_for(runner, fused=fused))
        assert report.frames == 5 and len(report.failures) == 1
        outs[fused] = out
    host_rows, fused_rows = _rows(outs[False]), _rows(outs[True])
    assert [r["source"] for r in fused_rows] == [r["source"] for r in host_rows]
    assert [Path(r["source"]).name for r in fused_rows if r["status"] == "ok"] == [
        f"{i:02d}.png" for i in range(5)
    ]
    for mask in sorted(outs[False].glob("*_mask.png")):
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(outs[True] / mask.name))), (
            mask.name
        )


_COMPILE_ONCE = """
import json, sys
from pathlib import Path
import numpy as np
from torch._dynamo.utils import counters
from gms_deploy.backends import open_runner
from gms_deploy.backends.torch_eager import TorchRunner
from gms_deploy.bundle import ModelBundle
compiled = open_runner("torch-compiled", sys.argv[1], device="cpu")
images = np.random.default_rng(1).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
eager = TorchRunner(ModelBundle.load(Path(sys.argv[1])))
error = float(np.abs(compiled(images) - eager(images)).max())
frames = counters["frames"]["ok"]
smaller = float(np.abs(compiled(images[:2]) - eager(images[:2])).max())  # padded to 3, not compiled
recompiled = counters["frames"]["ok"] - frames
summary = {"error": error, "smaller": smaller, "recompiled": recompiled, "precision": compiled.precision}
print(json.dumps({**summary, **counters["inductor"]}))
"""


def test_torch_compiled_on_the_cpu_matches_eager_and_a_second_process_reuses_the_compile(
    tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    """One batch size only: each larger one compiles afresh (about a minute on two cores), and a
    smaller one runs padded to it.

    The compile cache is in the user's cache folder, not torch's /tmp default, so that a restart
    (or a reboot that empties /tmp) finds it: the second process hits it.
    """
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    command = [sys.executable, "-c", _COMPILE_ONCE, str(tiny_bundle.vae.parent)]
    first, second = (
        json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
        for _ in range(2)
    )
    assert first["precision"] == "fp32" and first["error"] <= 1e-4 and second["error"] == first["error"]
    assert first["smaller"] <= 1e-4 and first["recompiled"] == 0
    assert first.get("fxgraph_cache_miss", 0) >= 1 and not first.get("fxgraph_cache_hit")
    assert second.get("fxgraph_cache_hit", 0) >= 1 and not second.get("fxgraph_cache_miss")
    assert (tmp_path / "gms-deploy" / "torchinductor" / "fxgraph").is_dir()
    with pytest.raises(BackendError, match="FP16 needs a CUDA GPU"):
        open_runner("torch-compiled", tiny_bundle.vae.parent, device="cpu", precision="fp16")


# Choosing a backend


def test_auto_takes_eager_torch_for_weights_without_a_gpu(tiny_bundle: ModelBundle) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU auto takes a GPU backend")
    runner, why = open_auto(tiny_bundle.vae.parent)
    assert runner.name == "torch" and str(runner.device) == "cpu"
    assert why.startswith("auto chose torch on cpu")
    assert "tensorrt: needs a CUDA GPU" in why and "torch-compiled: needs a CUDA GPU" in why
    assert "onnxruntime: runs an export folder" in why


def test_auto_takes_onnxruntime_for_an_export(tiny_onnx: Path) -> None:
    runner, why = open_auto(tiny_onnx)
    assert runner.name == "onnxruntime" and "auto chose onnxruntime" in why
    assert "torch-compiled: needs a CUDA GPU" in why


def test_auto_says_why_nothing_runs(tiny_onnx: Path, tmp_path: Path) -> None:
    export = shutil.copytree(tiny_onnx, tmp_path / "export")
    with (export / "gms_fp32.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BackendError, match=r"^no backend can run .*onnxruntime on cpu: .*SHA-256 does not"):
        open_auto(export, device="cpu")


def test_auto_reports_a_broken_model_as_itself(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a model bundle"):
        open_auto(tmp_path, device="cpu")
    bundle = shutil.copytree(tiny_bundle.vae.parent, tmp_path / "bundle")
    (bundle / "mapper.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^\S*mapper.pth: file is empty$"):
        open_auto(bundle, device="cpu")


# On a GPU (skipped elsewhere)


@pytest.mark.gpu
def test_fused_pipeline_on_the_gpu_gives_the_cpu_masks(one_thread: None) -> None:
    """The demo model's own frames: FP32 on the GPU (TF32 off) against the CPU's host path."""
    bundle = demo_bundle()
    frames = _frames()
    cpu = _segment(segmenter_for(TorchRunner(bundle)), frames, 0.5)
    gpu_segmenter = segmenter_for(TorchRunner(bundle, "cuda"))
    assert isinstance(gpu_segmenter, FusedSegmenter)
    gpu = _segment(gpu_segmenter, frames, 0.5)
    # Captured in the frames' order, then replayed in it and in reverse: the graphs share one pool.
    replays = [_segment(gpu_segmenter, frames, 0.5), _segment(gpu_segmenter, frames[::-1], 0.5)[::-1]]
    for a, b, *again in zip(cpu, gpu, *replays, strict=True):
        assert np.abs(a.prob - b.prob).max() <= 1e-4
        assert np.mean(a.mask != b.mask) <= 1e-3
        assert b.uncertain == pytest.approx(a.uncertain, abs=1e-3)
        assert all(np.array_equal(b.mask, c.mask) for c in again)


@pytest.mark.gpu
def test_torch_compiled_fp16_on_the_gpu_agrees_with_eager_fp32() -> None:
    bundle = demo_bundle()
    frames = _frames()
    reference = _segment(segmenter_for(TorchRunner(bundle, "cuda")), frames, 0.5)
    compiled = open_runner("torch-compiled", bundle.vae.parent, device="cuda")
    assert compiled.precision == "fp16" and compiled.mode == "reduce-overhead"
    results = _segment(segmenter_for(compiled), frames, 0.5)
    again = _segment(segmenter_for(compiled), frames, 0.5)  # a CUDA graph replay, not a capture
    for a, b, c in zip(reference, results, again, strict=True):
        assert dice(a.mask, b.mask, empty=1.0) >= 0.99
        assert np.array_equal(b.mask, c.mask)


@pytest.mark.gpu
def test_auto_on_a_gpu_takes_torch_compiled_for_weights(tiny_bundle: ModelBundle) -> None:
    runner, why = open_auto(tiny_bundle.vae.parent)
    assert runner.name == "torch-compiled" and why.startswith("auto chose torch-compiled on cuda")


def test_cli_says_which_backend_auto_took_and_refuses_what_cannot_run(
    tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU auto takes a GPU backend")
    image = sorted(SAMPLES.iterdir())[0]
    model = str(tiny_bundle.vae.parent)
    result = cli.invoke(app, ["infer", str(image), "--out", str(tmp_path / "a"), "--model", model])
    assert result.exit_code == 0, result.output
    assert "auto chose torch on cpu; passed over tensorrt: needs a CUDA GPU" in result.output
    args = ["infer", str(image), "--out", str(tmp_path / "b"), "--model", model, "--precision", "fp16"]
    result = cli.invoke(app, args)
    assert result.exit_code == 2 and "torch on cpu: torch FP16 needs a CUDA GPU" in result.output
    assert not (tmp_path / "b").exists()


class _HugeFrameRefused(HostSegmenter):
    """Fault injection: preparing the 40 x 50 frame runs out of host memory."""

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        if pixels.shape[:2] == (40, 50):
            raise MemoryError("Unable to allocate 1.2 TiB for an array")
        return super().prepare(pixels)


def test_a_frame_that_cannot_be_prepared_fails_alone(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    runner = TorchRunner(tiny_bundle)
    out = tmp_path / "out"
    report = run_inference(
        [tmp_path / "a.png", tmp_path / "b.png"],
        runner,
        InferOptions(out),
        segmenter=_HugeFrameRefused(runner),
    )
    assert report.frames == 1 and report.files == 2
    assert report.failures == [
        f"{tmp_path / 'a.png'}: cannot prepare frame 0: MemoryError: Unable to allocate 1.2 TiB for an array"
    ]
    assert (out / "b_mask.png").is_file() and not (out / "a_mask.png").exists()


def test_infer_runs_without_the_optional_extras(tmp_path: Path) -> None:
    """A plain `pip install gms-deploy` has no onnx, onnxruntime, TensorRT or matplotlib."""
    blocker = """
import sys
for name in ("onnx", "onnxruntime", "onnxscript", "tensorrt", "tensorrt_rtx", "modelopt", "polygraphy",
             "onnx_graphsurgeon", "matplotlib"):
    sys.modules[name] = None  # how Python marks a module that cannot be imported
from gms_deploy.cli import main
sys.argv = ["gms-deploy", "infer", sys.argv[1], "--out", sys.argv[2]]
main()
"""
    image = sorted(SAMPLES.iterdir())[0]
    command = [sys.executable, "-c", blocker, str(image), str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "auto chose torch" in done.stderr and (tmp_path / "out" / f"{image.stem}_mask.png").is_file()
