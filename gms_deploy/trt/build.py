"""ONNX graph -> strongly typed TensorRT network -> serialised engine, with a batch profile.

Precision lives in the graph (TensorRT 11 and TensorRT for RTX have no FP16 builder flag), so one
FP16 ONNX file builds the same way on every flavour. A parser error names the ONNX node that
caused it, which is what a user can act on. A build logs TensorRT's progress phases and its time at
INFO, since a silent multi-minute first build looks hung.

Timing cache: full TensorRT (which always builds on the GPU it targets) reuses one across builds,
persisted beside the engines. TensorRT for RTX's timing-cache calls query the GPU even when building
ahead of time, so it gets none here; its runtime cache is filled and persisted by the runner instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gms_deploy.errors import GmsError
from gms_deploy.export_format import BatchProfile
from gms_deploy.io.outputs import write_atomic
from gms_deploy.trt.flavour import Flavour

log = logging.getLogger(__name__)
TIMING_CACHE = "timing.cache"


class BuildError(GmsError):
    """A graph TensorRT refuses or fails to build; ``str()`` is one line naming the file and node."""


@dataclass(frozen=True)
class BuiltEngine:
    engine: bytes
    seconds: float
    inputs: dict[str, tuple[int, ...]]


def _progress(flavour: Flavour, label: str) -> Any:
    """An ``IProgressMonitor`` logging each top-level phase and its percent at INFO (None if absent)."""
    trt = flavour.trt
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Logging(trt.IProgressMonitor):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}
            self.top: set[str] = set()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = max(int(num_steps), 1)
            if not parent_phase:
                self.top.add(phase_name)
                log.info("%s: %s (%d steps)", label, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            total = self.steps.get(phase_name, 1)
            # Only quarter marks of top-level phases: inner phases can have thousands of steps.
            if phase_name in self.top and total >= 4 and (step + 1) % (total // 4) == 0:
                log.info("%s: %s %d %%", label, phase_name, 100 * (step + 1) // total)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)
            self.top.discard(phase_name)

    return Logging()


def _load_timing_cache(flavour: Flavour, config: Any, cache_dir: Path | None) -> Any:
    """Attach the persisted timing cache (full TensorRT only; see the module docstring)."""
    if cache_dir is None:
        return None
    if flavour.name == "rtx":
        log.info(
            "%s: no timing cache (its timing-cache calls need a GPU even ahead of time); "
            "the runner keeps a runtime cache instead",
            flavour.label,
        )
        return None
    path = Path(cache_dir) / TIMING_CACHE
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU is dropped, not fatal
    return cache


def _save_timing_cache(cache: Any, cache_dir: Path | None) -> None:
    if cache is not None and cache_dir is not None:
        data = bytes(cache.serialize())
        write_atomic(Path(cache_dir) / TIMING_CACHE, lambda f: f.write(data))


def _parse(flavour: Flavour, builder: Any, onnx_path: Path, logger: Any) -> Any:
    trt = flavour.trt
    network = builder.create_network(flavour.network_flags())
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): it finds ONNX external data beside the graph.
    if not parser.parse_from_file(str(onnx_path)):
        problems = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            node = error.node_name() or f"node #{error.node()}"
            problems.append(f"node {node} ({error.node_operator()}): {' '.join(error.desc().split())}")
        detail = "; ".join(problems) or "; ".join(logger.errors) or "unknown parser error"
        raise BuildError(f"{onnx_path}: TensorRT ({flavour.label}) cannot parse it: {detail}")
    return network


def build_engine(
    flavour: Flavour,
    onnx_path: Path,
    profile: BatchProfile | None = None,
    targets: tuple[str, ...] = (),
    cache_dir: Path | None = None,
) -> BuiltEngine:
    """Parse ``onnx_path`` as a strongly typed network and build a serialised engine.

    ``targets``: compute capabilities to build for (TensorRT for RTX only, e.g. ``("SM86",)``);
    empty means the flavour's default (the GPU present, or TensorRT for RTX's own choice).
    ``cache_dir``: where full TensorRT's timing cache is kept between builds (None: no cache).
    """
    profile = profile or BatchProfile()
    trt = flavour.trt
    logger = flavour.error_logger()
    tick = time.perf_counter()
    builder = trt.Builder(logger)
    network = _parse(flavour, builder, Path(onnx_path), logger)
    config = builder.create_builder_config()
    flavour.set_targets(config, targets)
    monitor = _progress(flavour, Path(onnx_path).name)
    if monitor is not None:
        config.progress_monitor = monitor
    timing = _load_timing_cache(flavour, config, cache_dir)
    optimisation = builder.create_optimization_profile()
    shapes = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise BuildError(
                f"{onnx_path}: input {tensor.name} has a dynamic non-batch axis {tuple(tensor.shape)}"
            )
        optimisation.set_shape(tensor.name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
        shapes[tensor.name] = tuple(tensor.shape)
    config.add_optimization_profile(optimisation)
    serialised = builder.build_serialized_network(network, config)
    if serialised is None:
        detail = "; ".join(logger.errors) or "no reason given"
        raise BuildError(f"{onnx_path}: TensorRT ({flavour.label}) build failed: {detail}")
    _save_timing_cache(timing, cache_dir)
    seconds = time.perf_counter() - tick
    log.info("%s: built with %s in %.1f s", Path(onnx_path).name, flavour.label, seconds)
    return BuiltEngine(bytes(serialised), seconds, shapes)
