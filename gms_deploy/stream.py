"""Worker threads with bounded queues, so file decoding and writing overlap the network.

``Prefetch`` runs an iterator (discover, decode, crop, prepare) a fixed number of items ahead of
its consumer; ``Writer`` runs jobs (mask resize on the host path, PNG encoding, atomic writes, the
results table) one at a time in submission order, so ``results.csv`` lists frames in input order.
Both queues are bounded: a long cine loop streams through in batches and never sits in memory
whole, and a slow disk holds the GPU back instead of filling memory. Decoders, OpenCV and zlib
release the GIL, which is what makes threads (not processes) enough here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")
POLL_S = 0.1


class _End:
    """Marks the end of the source, carrying its exception if it raised one."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Prefetch(Generic[T]):
    """Iterate ``source`` on a worker thread, at most ``depth`` items ahead; its exception re-raises here."""

    def __init__(self, source: Iterable[T], depth: int) -> None:
        self._queue: queue.Queue[T | _End] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), name="gms-read", daemon=True)
        self._thread.start()

    def _put(self, item: T | _End) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterable[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the consumer, which decides what it means
            self._put(_End(err))
            return
        self._put(_End())

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item

    def close(self) -> None:
        """Stop the worker where it is (Ctrl-C, or a consumer that gave up) and wait for it."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
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
