"""Run an iterator in a background thread a few items ahead; its errors resurface in the caller."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_POLL_S = 0.1  # how often a blocked thread looks for a stop request
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Iterates `make(stopping)` in a daemon thread, at most `depth` items ahead of the consumer.

    `make` receives a function that turns True once the consumer has gone, so a long step can
    stop early. An exception in the thread is re-raised by __next__ with a note naming `where`
    (the torchdata pin-memory pattern: a worker never dies silently). close() (also run at the
    end, on error and on garbage collection) stops and joins the thread: none is left behind.
    """

    def __init__(self, make: Callable[[Callable[[], bool]], Iterator[T]], *, depth: int, where: str) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth!r}")
        self._make = make
        self._where = where
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"readers-prefetch ({where})", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._make(self._stop.is_set):
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(e))

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the reader thread ({self._where}) stopped without a word") from None
                continue
            if item is _DONE:
                self.close()
                raise StopIteration
            if isinstance(item, _Failure):
                self.close()
                error = item.error
                if hasattr(error, "add_note"):
                    error.add_note(f"(raised in the readers background thread, {self._where})")
                raise error
            return item

    def close(self) -> None:
        """Stop the thread and wait for it; safe to call more than once."""
        self._stop.set()
        self._drain()  # a put blocked on the full queue returns now, not after its poll timeout
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._drain()  # drop what was queued, so its buffers can be freed

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            self.close()
