"""A TensorRT engine run on torch CUDA tensors (GPU only), in the spirit of TensorRT's demo/Diffusion.

Tensors are bound by name with ``set_tensor_address`` and run with ``execute_async_v3`` on a torch
stream, so no pycuda or cuda-python is needed. Buffers are allocated once per batch size and reused.
CUDA graphs remove the per-call launch overhead that dominates at small batches, and the two
flavours get them differently, each as its makers document: TensorRT for RTX captures and replays
its own graphs (``CudaGraphStrategy.WHOLE_GRAPH_CAPTURE``; capturing its launch from outside needs
an engine built for user allocation), TensorRT's launch is captured here right after an
uncaptured run at a batch size (as TensorRT's demo/Diffusion does), and where capture fails the
engine runs uncaptured with a warning. When to capture, and when not to, is
``cuda_graphs.OneGraph``'s. TensorRT for RTX compiles kernels just in time:
eagerly for each new batch size (so a benchmark's warm-up settles them), kept in a runtime cache
file so that later processes start fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gms_deploy.cuda_graphs import Launch, OneGraph
from gms_deploy.errors import GmsError
from gms_deploy.io.outputs import write_atomic
from gms_deploy.messages import one_line
from gms_deploy.trt.flavour import Flavour

log = logging.getLogger(__name__)

DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64}


class EngineLoadError(GmsError):
    """TensorRT could not load, set up or run the engine; ``str()`` is one line with TensorRT's reason."""


class Engine:
    """One engine, one execution context, device buffers per batch size, and CUDA graphs if asked."""

    def __init__(
        self,
        flavour: Flavour,
        path: Path,
        device: torch.device,
        runtime_cache: Path | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        trt = flavour.trt
        self.path = Path(path)
        self.device = device
        self.runtime_cache = runtime_cache
        self.label = flavour.label
        self._logger = flavour.error_logger()
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(self._logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise self._error("cannot deserialise it")
            self._cache: Any = None  # TensorRT for RTX's IRuntimeCache, where there is one
            self._capture = cuda_graphs  # this class captures; TensorRT for RTX captures itself
            if hasattr(self.engine, "create_runtime_config"):
                self._config = self._runtime_config(trt)  # the context refers to it: kept alive with it
                self.context = self.engine.create_execution_context(self._config)
            else:
                self.context = self.engine.create_execution_context()
        if self.context is None:
            raise self._error("cannot create an execution context")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = torch.cuda.Stream(device)
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._graphs = OneGraph(self.path.name, self._capture, errors=(EngineLoadError,))

    def _error(self, what: str) -> EngineLoadError:
        """``what`` went wrong, with what TensorRT logged about it (its last few errors)."""
        said = "; ".join(self._logger.errors[-3:])
        self._logger.errors.clear()
        return EngineLoadError(f"{self.path}: {self.label} {what}" + (f": {said}" if said else ""))

    def _dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.engine.get_tensor_dtype(name).name]

    def _bind(self, batch: int) -> dict[str, torch.Tensor]:
        """Static input and output buffers for ``batch``, bound to the context by name."""
        if batch not in self._buffers:
            buffers = {}
            for name in self.inputs:
                shape = (batch, *tuple(self.engine.get_tensor_shape(name))[1:])
                buffers[name] = torch.empty(shape, dtype=self._dtype(name), device=self.device)
                self.context.set_input_shape(name, shape)
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=self._dtype(name), device=self.device)
            self._buffers[batch] = buffers
        buffers = self._buffers[batch]
        for name, tensor in buffers.items():
            if name in self.inputs:
                self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        return buffers

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise self._error("failed to run it (execute_async_v3)")

    def _runtime_config(self, trt: Any) -> Any:
        """TensorRT for RTX's runtime settings: its own CUDA graphs, eager kernels, the runtime cache."""
        config = self.engine.create_runtime_config()
        if self._capture and hasattr(trt, "CudaGraphStrategy"):
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self._capture = False
        if hasattr(trt, "DynamicShapesKernelSpecializationStrategy"):
            eager = trt.DynamicShapesKernelSpecializationStrategy.EAGER
            config.dynamic_shapes_kernel_specialization_strategy = eager
        if self.runtime_cache is not None and hasattr(config, "create_runtime_cache"):
            self._cache = config.create_runtime_cache()
            cache = self.runtime_cache
            if cache.is_file() and not self._cache.deserialize(cache.read_bytes()):
                log.info("%s: runtime cache from another GPU, driver or version; refilled", self.path.name)
            config.set_runtime_cache(self._cache)
        return config

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on CUDA tensors; returns the engine's output buffers (copy them before the next call)."""
        batch = next(iter(feeds.values())).shape[0]
        first = batch not in self._buffers
        buffers = self._bind(batch)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for name, tensor in feeds.items():
                buffers[name].copy_(tensor)
            self._graphs.run(batch, self._execute, self._capture_graph)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if first:
            self.save_runtime_cache()
        return {name: buffers[name] for name in self.outputs}

    def _capture_graph(self) -> Launch:
        """Record the launch just run (recording does not run it); its replay, for later calls.

        The caller's stream context around this puts the stream back where capture fails.
        """
        capturable = getattr(self.context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self.stream.cuda_stream):
            raise RuntimeError("TensorRT says this context cannot be stream-captured")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._execute()
        return graph.replay

    def save_runtime_cache(self) -> None:
        """Persist TensorRT for RTX's just-in-time kernels (a no-op without a runtime cache)."""
        if self._cache is None or self.runtime_cache is None:
            return
        self.stream.synchronize()
        data = bytes(self._cache.serialize())
        try:
            write_atomic(self.runtime_cache, lambda f: f.write(data))
        except OSError as err:  # a read-only export on a cart, a full disk: slower starts, same masks
            log.warning("%s: runtime cache not saved: %s", self.path.name, one_line(err))
            return
        log.info("%s: runtime cache saved to %s (%d bytes)", self.path.name, self.runtime_cache, len(data))

    def profile_batches(self) -> tuple[int, int]:
        """The (min, max) batch of the engine's optimisation profile."""
        low, _, high = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        return int(low[0]), int(high[0])
