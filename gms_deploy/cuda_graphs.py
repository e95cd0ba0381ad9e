"""Fixed-shape tensor functions replayed as CUDA graphs, for the fused pipeline's pre- and postprocessing.

Exact resizing costs about 90 small kernels a stage (float64 FMA emulation, index selects, casts).
Launched one by one from Python that is a millisecond or more of CPU time per batch, whatever the
GPU: comparable to the whole network's time at batch 1. Captured once per input shape and replayed,
the same kernels launch as one graph, with the same numerics (a graph records the very kernels that
eager mode runs).

Shapes seen once run eagerly (a folder of odd-sized images would otherwise capture a graph per
image); the second time a shape comes, it is captured. All graphs share one memory pool, so they
hold the largest one's intermediates, not the sum; the least recently used beyond ``capacity`` are
dropped. Off the GPU, or where capture fails, the function simply runs.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from gms_deploy.messages import one_line

log = logging.getLogger(__name__)

_Key = tuple[Hashable, ...]
Launch = Callable[[], None]
_Entry = tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]  # graph, its input, its output


class Graphed:
    """``fn(x, *args)`` replayed as one CUDA graph per (shape, dtype, device of ``x``, ``args``).

    ``fn`` must be a pure tensor function of ``x`` (``args`` are hashable constants) whose constant
    tensors live for the process, as graphs keep their addresses. A replay returns a copy of the
    graph's output buffer: the graphs share one pool, so a graph captured earlier may keep its
    intermediates where this one's output is, and replaying it would overwrite a buffer handed out.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], capacity: int = 8) -> None:
        self.fn = fn
        self.capacity = capacity
        self.enabled = True
        self._seen: Counter[_Key] = Counter()
        self._graphs: OrderedDict[_Key, _Entry] = OrderedDict()
        self._pool: Any = None

    def __call__(self, x: torch.Tensor, *args: Hashable) -> torch.Tensor:
        if x.device.type != "cuda" or not self.enabled:
            return self.fn(x, *args)
        key = (tuple(x.shape), x.dtype, x.device, *args)
        # Inference mode throughout: buffers made in it can be written to only in it.
        with torch.inference_mode():
            if key not in self._graphs:
                self._seen[key] += 1
                if self._seen[key] == 1 or not self._capture(key, x, args):
                    return self.fn(x, *args)
            self._graphs.move_to_end(key)
            graph, static_in, static_out = self._graphs[key]
            static_in.copy_(x)
            graph.replay()
            return static_out.clone()

    def _capture(self, key: _Key, x: torch.Tensor, args: tuple[Hashable, ...]) -> bool:
        static_in = x.clone()
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            # The outer stream context puts the caller's stream back where capture fails:
            # torch.cuda.graph's own exit raises before it restores it.
            with (
                torch.cuda.stream(torch.cuda.current_stream(x.device)),
                torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            ):
                static_out = self.fn(static_in, *args)
        except torch.OutOfMemoryError:
            raise  # the caller's to handle (a smaller batch), not a reason to give up graphs
        except RuntimeError as err:
            name = getattr(self.fn, "__name__", repr(self.fn))
            log.warning("%s: running without CUDA graphs: %s", name, one_line(err))
            self.enabled = False
            return False
        self._graphs[key] = (graph, static_in, static_out)
        if len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        return True


class OneGraph:
    """One captured launch for a context (a TensorRT execution context) and when to capture it anew.

    A captured launch holds the shapes its context had, so a context keeps one graph. Another shape
    runs uncaptured, and replaces the graph only when it comes twice in a row (an out-of-memory
    retry's halved batch, a new run's batch size): chunks that alternate (8, 4, 8, 4) never
    re-capture, since every capture synchronises the device and would cost more than it saves. A
    capture that fails (any of ``errors``) is said once and not tried again; the launch it
    followed has already produced the outputs.
    """

    def __init__(self, name: str, enabled: bool = True, errors: tuple[type[Exception], ...] = ()) -> None:
        self.name = name
        self.enabled = enabled
        self.errors = (RuntimeError, *errors)
        self._graph: tuple[Hashable, Launch] | None = None  # shape, its replay
        self._last: Hashable = None

    def run(self, key: Hashable, execute: Launch, capture: Callable[[], Launch]) -> None:
        """Replay the graph for ``key``, or ``execute`` and perhaps ``capture`` (which records, not runs)."""
        repeated, self._last = self._last == key, key
        if self._graph is not None and self._graph[0] == key:
            self._graph[1]()
            return
        execute()
        if not self.enabled or (self._graph is not None and not repeated):
            return
        try:
            self._graph = (key, capture())
        except torch.OutOfMemoryError:
            raise
        except self.errors as err:
            log.warning("%s: running without CUDA graphs: %s", self.name, one_line(err))
            self.enabled = False
            self._graph = None
