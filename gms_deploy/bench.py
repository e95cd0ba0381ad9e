"""Every backend on one machine, on the same frames: latency, throughput, memory, stages and accuracy.

A *variant* is a backend at one precision on one device (or ONNX Runtime provider). Eager PyTorch
FP32 is the baseline: it always runs first, at every image and batch size, because every other
variant's speed-up and accuracy are measured against it on the very same batch. It runs as the
official code does, with OpenCV on the host around the network; on a GPU every other torch or
TensorRT variant runs the fused pipeline, eager FP32 once more among them, so what fusing saves
and what lower precision and compilers save show apart.

A batch is timed end to end as a user's frames go through it (``prepare`` per frame, then
``segment``); on a GPU with CUDA events after a synchronise, so the figure is what the GPU did,
not when Python asked. A second pass times the phases apart (pre, network, post, and encoder,
mapper and decoder where the runner exposes them); a third compares masks and probabilities with
the baseline's.

What cannot run here is an error only when the user asked for that backend; otherwise it is
listed as skipped with its reason, so a CPU-only laptop and an H100 run the same command.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from itertools import cycle, islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from gms_deploy.backends import NAMES, BackendError, ModelSource, Runner, backend_spec, open_runner
from gms_deploy.backends.base import DeviceRunner
from gms_deploy.compare import Criteria, agree
from gms_deploy.devices import torch_device
from gms_deploy.errors import UsageError
from gms_deploy.export_format import ExportManifest
from gms_deploy.io.frames import InputError
from gms_deploy.io.inputs import discover, read_frames
from gms_deploy.machine_load import MachineLoad
from gms_deploy.segment import Segmentation, Segmenter, segmenter_for

SAMPLES = Path(__file__).parent / "data" / "samples" / "images"
# Dense FP16 tensor-core peaks in TFLOP/s (datasheets), the most specific name first.
FP16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0}

FUSED = "fused"
T = TypeVar("T")
Progress = Callable[[int, int, str], None]
"""``progress(done, total, what runs next)``."""


@dataclass(frozen=True)
class Variant:
    backend: str
    precision: str
    device: str
    pipeline: str = "host"
    """``host`` (OpenCV around the network) or ``fused`` (everything on the device: ``segment.py``)."""

    @property
    def label(self) -> str:
        return self.record().label

    def record(self, **fields: Any) -> BenchRecord:
        return BenchRecord(self.backend, self.precision, self.device, self.pipeline, **fields)


@dataclass(frozen=True)
class BenchConfig:
    """What to run; ``None`` picks for the device, since a GPU affords more batches and iterations."""

    source: ModelSource = field(default_factory=ModelSource.from_flags)
    """The weights for the PyTorch backends (default: the embedded demo model), and the export folder
    for ONNX Runtime and TensorRT (with ``gms-deploy build``'s engines), if any."""
    backends: tuple[str, ...] = ()
    """Only these, beside the eager FP32 baseline, which always runs; empty: all that run here."""
    batch_sizes: tuple[int, ...] | None = None
    image_sizes: tuple[int, ...] | None = None
    """Default: the model's. Exported graphs run only at the size they were exported for."""
    device: str = "auto"
    warmup: int | None = None
    iterations: int | None = None
    frames: Path | None = None
    """Images or DICOM cycled to fill each batch (default: the package's sample images)."""
    threads: int | None = None
    """CPU threads for every backend alike (default: the cores this process may use)."""
    submodels: bool = True
    """Time encoder, mapper and decoder apart too; for torch-compiled that compiles each of them again."""


@dataclass
class BenchRecord:
    """One variant at one image and batch size; a skipped one carries its ``reason`` instead."""

    backend: str
    precision: str
    device: str
    pipeline: str = "host"
    image_size: int | None = None
    batch_size: int | None = None
    status: str = "ok"
    reason: str | None = None
    description: str | None = None
    iterations: int = 0
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None
    throughput_img_s: float | None = None
    speedup_vs_eager: float | None = None
    """The median over rounds of eager FP32's time over this one's, both taken in the same round."""
    speedup_min: float | None = None
    speedup_max: float | None = None
    peak_gpu_mem_mib: float | None = None
    """PyTorch variants on a GPU: their weights plus the most the allocator rose above what was held
    during a timed batch. None for ONNX Runtime and TensorRT, whose memory PyTorch cannot see: the
    environment's ``gpu_process_mem_mib`` (NVML) is the figure that includes them."""
    stages_ms: dict[str, float] = field(default_factory=dict)
    """Medians: pre, network, post, and encoder, mapper, decoder where the runner exposes them."""
    dice_mean: float | None = None
    """Masks against eager FP32's on the same frames; two empty masks agree (Dice 1)."""
    dice_min: float | None = None
    prob_max_abs: float | None = None
    gflop_per_image: float | None = None
    """PyTorch's flop counter on the eager model (convolutions, matmuls, attention)."""
    achieved_tflop_s: float | None = None
    roofline_pct: float | None = None
    """Of the GPU's dense FP16 peak, where it is known (``FP16_PEAK_TFLOPS``)."""

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision} {self.device} {self.pipeline}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Opened:
    """A variant's runner, held for the whole run so that every round times all of them."""

    variant: Variant
    runner: Runner
    fixed_size: int | None
    """The image size an export runs at; None where the runner is built at any size (PyTorch)."""
    weights_mib: float | None
    """What opening it added to PyTorch's allocator on the GPU: its weights (PyTorch variants only)."""

    @cached_property
    def segmenter(self) -> Segmenter:
        return segmenter_for(self.runner, fused=self.variant.pipeline == FUSED)


@dataclass
class _Measured:
    """One variant on one batch: the timings and the outputs, before comparison with eager FP32."""

    latencies_ms: list[float]
    """One per round, in round order: round ``i`` of every variant ran within the same minute."""
    stages_ms: dict[str, float]
    peak_gpu_mem_mib: float | None
    outputs: list[Segmentation]


@dataclass
class BenchResult:
    """The records, and what decides whether their ratios hold: thread budget and machine load."""

    records: list[BenchRecord]
    threads: int
    load: MachineLoad
    gpu_process_mem_mib: float | None = None
    """NVML's figure for this whole process at the end, every variant held at once: the one place
    TensorRT's and ONNX Runtime's GPU memory shows; None without a GPU or where NVML cannot say."""

    def environment(self) -> dict[str, Any]:
        return {
            "torch_threads": self.threads,
            "onnxruntime_threads": self.threads,
            "timing": "interleaved rounds: each round times every variant once, in rotating order",
            **self.load.to_json(),
            "gpu_process_mem_mib": self.gpu_process_mem_mib,
            "gpu_process_mem_source": "NVML, this process after the last round, all variants held",
        }


def run_bench(config: BenchConfig, progress: Progress | None = None) -> BenchResult:
    """Run every variant over every image and batch size; skipped variants come back as records too.

    Raises ``BackendError`` before anything is timed where a backend the user asked for cannot run
    here at all or ``--export`` is no export, and ``ValueError`` for unusable settings or frames.
    """
    unknown = sorted(set(config.backends) - set(NAMES))  # every real backend: auto picks only one
    if unknown:
        raise BackendError(f"unknown backend {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    # Every variant is timed against eager PyTorch FP32: the weights are read once, here.
    bundle = config.source.weights("bench")
    source = ModelSource(bundle, export=config.source.export)
    device = _resolve_device(config.device)
    gpu = device.type == "cuda"
    warmup = 3 if config.warmup is None else config.warmup
    iterations = (20 if gpu else 5) if config.iterations is None else config.iterations
    threads = config.threads or len(os.sched_getaffinity(0))
    # Smallest first, each once: torch-compiled pads a batch smaller than one it compiled, so a
    # larger size timed first would have the smaller one timed at the larger's cost.
    batch_sizes = tuple(sorted(set(config.batch_sizes or ((1, 8, 32) if gpu else (1, 4)))))
    if min(batch_sizes) < 1 or iterations < 1 or warmup < 0 or threads < 1:
        raise UsageError("batch sizes, iterations and threads must be at least 1, warm-up at least 0")
    _check_export(source.export)
    image_sizes = config.image_sizes or (bundle.settings.image_size,)
    frames = _load_frames(config.frames or SAMPLES, max(batch_sizes))
    peak_tflops = _fp16_peak_tflops(device) if gpu else None
    timing = _Timing(warmup, iterations, config.submodels, peak_tflops)
    load = MachineLoad(threads)
    total, done = len(image_sizes) * len(batch_sizes), 0
    held = torch.get_num_threads()
    torch.set_num_threads(threads)  # ONNX Runtime sessions take the same budget (``open_session``)
    try:
        opened, records = _available(config, source, device, image_sizes[0])
        for size in image_sizes:
            here = _at_size(opened, size, source, records)
            gflop = _gflop_per_image(here[0].runner, size)
            for batch_size in batch_sizes:
                if progress:
                    progress(done, total, f"{size}px batch {batch_size}, {len(here)} variants")
                batch = list(islice(cycle(frames), batch_size))
                records += _bench_batch(here, batch, size, gflop, timing, load)
                done += 1
        gpu_mib = _process_gpu_mib() if gpu else None
    finally:
        torch.set_num_threads(held)
    if progress:
        progress(done, total, "done")
    return BenchResult(records, threads, load, gpu_mib)


def _at_size(
    opened: list[_Opened], size: int, source: ModelSource, records: list[BenchRecord]
) -> list[_Opened]:
    """The variants that run at ``size``: PyTorch ones built anew for it (replacing the held one in
    ``opened``), exports only at the size they were exported for (a skipped record otherwise)."""
    here: list[_Opened] = []
    for i, item in enumerate(opened):
        if item.fixed_size not in (None, size):
            why = f"exported at {item.fixed_size} x {item.fixed_size}; export again with --image-size {size}"
            records.append(item.variant.record(image_size=size, status="skipped", reason=why))
        else:
            if item.fixed_size is None and item.runner.settings.image_size != size:
                opened[i] = item = _open_held(item.variant, source, size)
            here.append(item)
    return here


def _resolve_device(device: str) -> torch.device:
    """``auto`` as everywhere; a bare ``cuda`` becomes the current GPU's index, as records name it."""
    chosen = torch_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", torch.cuda.current_device() if chosen.index is None else chosen.index)
        torch.cuda.set_device(chosen)  # CUDA events record on the current device's stream
    return chosen


def _check_export(export: Path | None) -> None:
    """An export named with --export that is no export is an error, not a backend passed over.

    Reading a manifest needs no export extra: without it, a sound export's backends are listed as
    skipped, saying why.
    """
    if export is not None:
        ExportManifest.read(export)


def _load_frames(folder: Path, count: int) -> list[np.ndarray]:
    """Up to ``count`` frames (batches cycle through them), read before any timing starts."""
    sources, errors = discover([folder])
    frames: list[np.ndarray] = []
    try:
        for source in sources:
            frames += [frame.pixels for frame in islice(read_frames(source), count - len(frames))]
            if len(frames) == count:
                break
    except InputError as err:
        raise UsageError(str(err)) from None
    if not frames:
        raise UsageError(str(errors[0]) if errors else f"{folder}: no frames to benchmark")
    return frames


def _candidates(
    config: BenchConfig, source: ModelSource, device: torch.device
) -> list[tuple[Variant, str | None]]:
    """Every variant worth knowing about here, eager FP32 first, each with why it will not run (or None).

    Slow ones (compiling on a CPU, ONNX Runtime's CPU provider beside a GPU) run only when asked for.
    """
    gpu = device.type == "cuda"
    here, cuda = str(device), str(device) if gpu else "cuda"

    def opt_in(backend: str, why: str) -> str | None:
        return None if backend in config.backends else f"{why}; ask for it with --backend {backend}"

    compile_note = None if gpu else opt_in("torch-compiled", "compiling on a CPU takes ~1 min per batch size")
    ort_cpu_note = opt_in("onnxruntime", "its CPU provider is slow beside a GPU") if gpu else None
    variants = [
        (_baseline(device), None),
        (Variant("torch", "fp32", cuda, FUSED), None),  # what fusing alone saves
        (Variant("torch", "fp16", cuda, FUSED), None),
        (Variant("torch-compiled", "fp16" if gpu else "fp32", here, FUSED if gpu else "host"), compile_note),
        (Variant("onnxruntime", "fp32", "cpu"), ort_cpu_note),
        (Variant("onnxruntime", "fp16", cuda), None),
        (Variant("tensorrt", "fp16", cuda, FUSED), None),
    ]
    return [(variant, _cannot(variant, gpu, source) or note) for variant, note in variants]


def _cannot(variant: Variant, gpu: bool, source: ModelSource) -> str | None:
    """Why the backend table rules a variant out here, or None."""
    if variant.device.startswith("cuda") and not gpu:
        return "needs a CUDA GPU (--device cuda)"
    if backend_spec(variant.backend).runs == "export" and source.export is None:
        return "needs --export DIR (a `gms-deploy export` folder)"
    return None


def _available(
    config: BenchConfig, source: ModelSource, device: torch.device, size: int
) -> tuple[list[_Opened], list[BenchRecord]]:
    """Every variant that opens here, eager FP32 first, and a skipped record for each that does not.

    All are opened before anything is timed, so that a broken export or a missing engine ends the
    run at once, and held to the end, so that each round times every one of them.
    """
    opened: list[_Opened] = []
    skipped: list[BenchRecord] = []
    reasons: dict[str, list[str]] = defaultdict(list)
    baseline = _baseline(device)
    for variant, reason in _candidates(config, source, device):
        if config.backends and variant.backend not in config.backends and variant != baseline:
            continue
        if reason is None:
            try:
                opened.append(_open_held(variant, source, size))
                continue
            except (BackendError, ImportError) as err:  # ImportError: the export extra is not installed
                if variant == baseline:
                    raise
                reason = str(err) if isinstance(err, BackendError) else f"{err.name} is not installed"
        reasons[variant.backend].append(reason)
        skipped.append(variant.record(status="skipped", reason=reason))
    for backend in config.backends:
        if all(item.variant.backend != backend for item in opened):
            raise BackendError(
                f"--backend {backend} cannot run here: {'; '.join(dict.fromkeys(reasons[backend]))}"
            )
    return opened, skipped


def _baseline(device: torch.device) -> Variant:
    """Eager FP32 as the official code runs it: OpenCV on the host around the network."""
    return Variant("torch", "fp32", str(device))


def _open_held(variant: Variant, source: ModelSource, size: int) -> _Opened:
    """Opened as every command opens a runner; weights are built at ``size``, an export runs as it is."""
    gpu = torch.device(variant.device).type == "cuda"
    before = torch.cuda.memory_allocated(variant.device) if gpu else 0
    if backend_spec(variant.backend).runs == "export":
        runner = open_runner(variant.backend, source, variant.device, variant.precision)
        return _Opened(variant, runner, runner.settings.image_size, None)
    at_size = ModelSource(source.weights("bench").with_settings(image_size=size))
    runner = open_runner(variant.backend, at_size, variant.device, variant.precision)
    weights_mib = (torch.cuda.memory_allocated(variant.device) - before) / 2**20 if gpu else None
    return _Opened(variant, runner, None, weights_mib)


def _timed(fn: Callable[[], T], gpu: bool) -> tuple[T, float]:
    """``fn()`` and its milliseconds: CUDA events around it on an idle GPU, else the host clock.

    An event recorded after ``fn`` returns completes once the GPU has finished what ``fn`` queued,
    so host work inside ``fn`` (OpenCV, copies) and device work are both counted.
    """
    if not gpu:
        start = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, begin.elapsed_time(end)


@dataclass(frozen=True)
class _Timing:
    warmup: int
    iterations: int
    submodels: bool
    peak_tflops: float | None


def _bench_batch(
    here: list[_Opened],
    batch: Sequence[np.ndarray],
    size: int,
    gflop: float,
    timing: _Timing,
    load: MachineLoad,
) -> list[BenchRecord]:
    """Warm every variant up, time them all in interleaved rounds, then their stages and outputs apart.

    A round times each variant once, starting one further along the list each time, so a load that
    comes and goes lands on all of them alike, and each round gives one ratio against eager FP32.
    Warm-up and compilation stay outside the rounds; so does the load measurement.
    """
    calls = {id(item): _end_to_end(item, batch) for item in here}
    records: list[BenchRecord] = []
    live = [
        item
        for item in here
        if _fits(
            item,
            size,
            len(batch),
            records,
            lambda item=item: [calls[id(item)]() for _ in range(timing.warmup)],
        )
    ]
    latencies: dict[int, list[float]] = {id(item): [] for item in live}
    peaks: dict[int, float] = defaultdict(float)
    with load.measure():
        for round_ in range(timing.iterations):
            start = round_ % max(1, len(live))
            for item in live[start:] + live[:start]:
                ms, peak = _timed_with_peak(calls[id(item)], item)
                latencies[id(item)].append(ms)
                peaks[id(item)] = max(peaks[id(item)], peak)
    measured: dict[int, _Measured] = {}
    for item in live:

        def finish(item: _Opened = item) -> None:
            stages = _stage_times(item, batch, timing)
            own = None if item.weights_mib is None else item.weights_mib + peaks[id(item)]
            measured[id(item)] = _Measured(latencies[id(item)], stages, own, _end_to_end(item, batch, True)())

        _fits(item, size, len(batch), records, finish)
    reference = measured.get(id(here[0]))
    for item in here:
        if id(item) not in measured:
            continue
        if reference is None:
            why = f"eager FP32 did not run at batch {len(batch)}: nothing to compare with"
            records.append(
                item.variant.record(image_size=size, batch_size=len(batch), status="skipped", reason=why)
            )
        else:
            records.append(_record(item, size, measured[id(item)], reference, gflop, timing.peak_tflops))
    return records


def _end_to_end(
    item: _Opened, batch: Sequence[np.ndarray], keep_prob: bool = False
) -> Callable[[], list[Segmentation]]:
    """A batch as a user's frames go through: ``prepare`` per frame, then ``segment``."""
    segmenter, threshold = item.segmenter, item.runner.settings.threshold
    return lambda: segmenter.segment([segmenter.prepare(frame) for frame in batch], threshold, keep_prob)


def _fits(
    item: _Opened, size: int, batch_size: int, records: list[BenchRecord], work: Callable[[], Any]
) -> bool:
    """``work()``; where the GPU runs out of memory, a skipped record in its place and False."""
    try:
        work()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        why = f"out of GPU memory at batch {batch_size}"
        records.append(
            item.variant.record(image_size=size, batch_size=batch_size, status="skipped", reason=why)
        )
        return False
    return True


def _timed_with_peak(fn: Callable[[], Any], item: _Opened) -> tuple[float, float]:
    """Milliseconds, and how far PyTorch's allocator rose above what was held before (MiB, GPU only).

    Only PyTorch variants report it: ONNX Runtime and TensorRT allocate where PyTorch cannot see.
    """
    tracked = item.weights_mib is not None
    if tracked:
        torch.cuda.reset_peak_memory_stats(item.variant.device)
        before = torch.cuda.memory_allocated(item.variant.device)
    _, ms = _timed(fn, _on_gpu(item.runner))
    if not tracked:
        return ms, 0.0
    return ms, (torch.cuda.max_memory_allocated(item.variant.device) - before) / 2**20


def _on_gpu(runner: Runner) -> bool:
    return isinstance(runner, DeviceRunner) and runner.device.type == "cuda"


def _stage_times(item: _Opened, batch: Sequence[np.ndarray], timing: _Timing) -> dict[str, float]:
    """Median milliseconds of each phase, timed one at a time, after ``warmup`` untimed rounds.

    The warm-up matters for the encoder, mapper and decoder of a compiled runner: each is a graph
    of its own, compiled on its first call.
    """
    runner, segmenter, gpu = item.runner, item.segmenter, _on_gpu(item.runner)
    device = runner.device if isinstance(runner, DeviceRunner) else None
    stages = runner.stages() if timing.submodels and isinstance(runner, DeviceRunner) else {}
    threshold = runner.settings.threshold
    times: dict[str, list[float]] = defaultdict(list)
    with torch.inference_mode():
        for round_ in range(timing.warmup + timing.iterations):
            prepared, prepare_ms = _timed(lambda: [segmenter.prepare(frame) for frame in batch], gpu)
            inputs, inputs_ms = _timed(partial(segmenter.network_inputs, prepared), gpu)
            probs, network_ms = _timed(partial(segmenter.network, inputs), gpu)
            _, post_ms = _timed(partial(segmenter.masks, probs, prepared, threshold, False), gpu)
            step = {"pre": prepare_ms + inputs_ms, "network": network_ms, "post": post_ms}
            tensor = inputs  # each stage runs on the previous one's output, as ``forward`` chains them
            for name, stage in stages.items():
                tensor, step[name] = _timed(partial(stage, torch.as_tensor(tensor, device=device)), gpu)
            if round_ >= timing.warmup:
                for name, ms in step.items():
                    times[name].append(ms)
    return {name: float(np.median(values)) for name, values in times.items()}


def _record(
    item: _Opened,
    size: int,
    measured: _Measured,
    reference: _Measured,
    gflop: float,
    peak_tflops: float | None,
) -> BenchRecord:
    """The row: timings, and what is relative to eager FP32 (speed-up, agreement, roofline).

    The speed-up is the median of one ratio per round, each of two timings taken side by side.
    """
    mine, theirs = measured.outputs, reference.outputs
    agreement = agree(
        [m.prob for m in mine],
        [t.prob for t in theirs],
        Criteria(),
        ([m.mask for m in mine], [t.mask for t in theirs]),
    )
    p50, p90, p99 = (float(p) for p in np.percentile(measured.latencies_ms, [50, 90, 99]))
    ratios = np.array(reference.latencies_ms) / np.array(measured.latencies_ms)
    throughput = len(mine) / (p50 / 1e3)
    achieved = gflop * throughput / 1e3
    return item.variant.record(
        image_size=size,
        batch_size=len(mine),
        description=item.runner.description,
        iterations=len(measured.latencies_ms),
        latency_ms_p50=p50,
        latency_ms_p90=p90,
        latency_ms_p99=p99,
        throughput_img_s=throughput,
        speedup_vs_eager=float(np.median(ratios)),
        speedup_min=float(ratios.min()),
        speedup_max=float(ratios.max()),
        peak_gpu_mem_mib=measured.peak_gpu_mem_mib,
        stages_ms=measured.stages_ms,
        dice_mean=agreement.dice_mean,
        dice_min=agreement.dice_min,
        prob_max_abs=agreement.max_abs,
        gflop_per_image=gflop,
        achieved_tflop_s=achieved,
        roofline_pct=None if peak_tflops is None else 100.0 * achieved / peak_tflops,
    )


def _gflop_per_image(runner: Runner, size: int) -> float:
    """PyTorch's flop count of one image through the eager model: the numerator of the roofline."""
    assert isinstance(runner, DeviceRunner)
    with FlopCounterMode(display=False) as counter:
        runner.forward(torch.zeros(1, 3, size, size, device=runner.device))
    return counter.get_total_flops() / 1e9


def _fp16_peak_tflops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in FP16_PEAK_TFLOPS.items() if key in name), None)


def _process_gpu_mib() -> float | None:
    """This process's GPU memory on every GPU as NVML reports it, None where NVML cannot say.

    A container may hide the process from NVML (another PID namespace): then None, not zero.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or pynvml's NVMLError where no driver answers
        return None
    try:
        used = [
            process.usedGpuMemory
            for index in range(pynvml.nvmlDeviceGetCount())
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(
                pynvml.nvmlDeviceGetHandleByIndex(index)
            )
            if process.pid == os.getpid() and process.usedGpuMemory is not None
        ]
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
    return sum(used) / 2**20 if used else None
