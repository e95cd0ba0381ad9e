"""ONNX graph -> strongly typed TensorRT network -> serialised engine, with a batch profile.

Precision lives in the graph (TensorRT 11 and TensorRT for RTX have no FP16 builder flag), so one
FP16 ONNX file builds the same way on every flavour. A parser error names the ONNX node that
caused it, which is what a user can act on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gms_deploy.trt.flavour import Flavour


class BuildError(Exception):
    """A graph TensorRT refuses or fails to build; ``str()`` is one line naming the file and node."""


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts (min, opt, max); the spatial size is fixed by the graph."""

    min: int = 1
    opt: int = 1
    max: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(
                f"batch profile needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}"
            )


@dataclass(frozen=True)
class BuiltEngine:
    engine: bytes
    seconds: float
    inputs: dict[str, tuple[int, ...]]


def _logger(flavour: Flavour) -> Any:
    """A TensorRT logger that keeps errors, so a failed build can say why in one line."""
    trt = flavour.trt

    class Collecting(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(" ".join(msg.split()))

    return Collecting()


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
) -> BuiltEngine:
    """Parse ``onnx_path`` as a strongly typed network and build a serialised engine.

    ``targets``: compute capabilities to build for (TensorRT for RTX only, e.g. ``("SM86",)``);
    empty means the flavour's default (the GPU present, or TensorRT for RTX's own choice).
    """
    profile = profile or BatchProfile()
    trt = flavour.trt
    logger = _logger(flavour)
    tick = time.perf_counter()
    builder = trt.Builder(logger)
    network = _parse(flavour, builder, Path(onnx_path), logger)
    config = builder.create_builder_config()
    flavour.set_targets(config, targets)
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
    return BuiltEngine(bytes(serialised), time.perf_counter() - tick, shapes)
