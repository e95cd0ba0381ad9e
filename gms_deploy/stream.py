"""Worker threads with bounded queues, so file decoding and writing overlap the network.

``Prefetch`` reads files (decode, crop, prepare) on a few threads, a bounded number of frames
ahead of its consumer and in input order; ``Writer`` runs jobs (PNG encoding, atomic writes, the
results table) one at a time in submission order, so ``results.csv`` lists frames in input order.
Both queues are bounded: a long cine loop streams through in batches and never sits in memory
whole, and a slow disk holds the GPU back instead of filling memory. Threads rather than
processes: decoders, OpenCV and zlib release the GIL in their C code, and frames need no pickling.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

S = TypeVar("S")
T = TypeVar("T")
POLL_S = 0.1
_NOTHING = object()


class _End:
    """Marks the end of the source, carrying its exception if it raised one."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Prefetch(Generic[S, T]):
    """``produce(item)`` for every item on ``workers`` threads, yielded here in item order.

    Each item (a file) is produced whole by one worker, its results passing through a queue of
    ``depth``; workers run ahead on at most ``2 x workers`` items. So several files decode at
    once, their frames still come out in input order, and memory stays bounded however long one
    item (a cine loop) is. An item's exception re-raises here, in its place.
    """

    def __init__(
        self, items: Iterable[S], produce: Callable[[S], Iterable[T]], workers: int = 1, depth: int = 8
    ) -> None:
        self._items = iter(items)
        self._produce = produce
        self._depth = max(depth, 1)
        self._window = 2 * max(workers, 1)
        self._tasks: queue.Queue[tuple[S, queue.Queue[T | _End]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"gms-read-{i}", daemon=True)
            for i in range(max(workers, 1))
        ]
        for thread in self._threads:
            thread.start()

    def _put(self, results: queue.Queue[T | _End], item: T | _End) -> bool:
        while not self._stop.is_set():
            try:
                results.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        while not self._stop.is_set() and (task := self._tasks.get()) is not None:
            item, results = task
            try:
                for result in self._produce(item):
                    if not self._put(results, result):
                        return
            except BaseException as err:  # handed to the consumer, in this item's place
                self._put(results, _End(err))
                continue
            self._put(results, _End())

    def _submit(self, pending: deque[queue.Queue[T | _End]]) -> None:
        while len(pending) < self._window and (item := next(self._items, _NOTHING)) is not _NOTHING:
            results: queue.Queue[T | _End] = queue.Queue(maxsize=self._depth)
            pending.append(results)
            self._tasks.put((item, results))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        pending: deque[queue.Queue[T | _End]] = deque()
        self._submit(pending)
        while pending:
            results = pending.popleft()
            self._submit(pending)
            while not isinstance(result := results.get(), _End):
                yield result
            if result.error is not None:
                raise result.error

    def close(self) -> None:
        """Stop the workers where they are (Ctrl-C, or a consumer that gave up) and wait for them."""
        self._stop.set()
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> Prefetch[S, T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Writer:
    """Run jobs in submission order on one worker thread, at most ``depth`` waiting.

    A job that raises stops the writer: the error re-raises from the next ``submit`` or from
    ``close``. Jobs are expected to handle the errors they know (a full disk for one file).
    """

    def __init__(self, depth: int) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="gms-write", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as err:
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._queue.put(job)

    def _finish(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def close(self) -> None:
        """Finish every job already submitted, then stop."""
        self._finish()
        self._raise()

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Submitted jobs finish even on Ctrl-C: they are outputs whose masks already exist."""
        self._finish()
        if kind is None:
            self._raise()
