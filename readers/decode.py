"""A batch's png/jpg payloads decoded in parallel, each into its own row of the batch; or jpg
payloads kept compressed (`Payloads`) to be decoded in one batched call on the loader's device.

Threads, not processes: torchvision's decoders (libjpeg-turbo, libpng) run in C++ and release the
GIL, and a thread writes its pixels straight into the batch, where a process would send them back
through a pipe. `scripts/bench_decode.py` measures both side by side on the same 224 px JPEGs: on
a 2-core machine where a second core was free at times, 2 threads decoded 1.63x as fast as one,
while 2 processes never beat one thread (0.70-0.91x: sending payloads and pixels costs more than
the second core gives back). Python's share of the work per sample (a PNG's structural check, a
few calls) is small beside the decode. See docs/benchmarks.md for the runs and their load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from cacheformat import as_error
from cacheformat.payload import decode_jpegs
from readers.errors import ReaderError
from readers.split import default_workers


def default_decode_threads() -> int:
    """Threads decoding a batch by default: as many as the worker processes of a build or a live
    loader would use (this process's share of the cores, readers.split.default_workers)."""
    return default_workers()


def check_decode_threads(threads: object) -> int:
    """`threads` (None: default_decode_threads()) checked to be an int >= 1."""
    if threads is None:
        return default_decode_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"decode_threads must be an int >= 1 (1: decode in the reading thread), got {threads!r}")
    return threads


class BatchDecoder:
    """Runs one decode job per sample of a batch: in the calling thread and `threads - 1` pool
    threads (started on first use, stopped by close()), each on a contiguous share of the batch.

    Jobs write their own rows, so the batch is the same bytes whatever the thread count; where
    several samples fail, the error of the first in batch order is raised, after every share has
    finished (nothing writes into a batch once it is handed back).
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def run(self, jobs: Sequence[Callable[[], None]]) -> None:
        shares = min(self.threads, len(jobs))
        if shares <= 1:
            for job in jobs:
                job()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="readers-decode")
        step = -(-len(jobs) // shares)
        parts = [jobs[i:i + step] for i in range(0, len(jobs), step)]
        futures = [self._pool.submit(_run_all, part) for part in parts[1:]]
        try:
            _run_all(parts[0])
        finally:
            wait(futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        """Stop and join the pool's threads (idle between batches); safe to call more than once."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _run_all(jobs: Sequence[Callable[[], None]]) -> None:
    for job in jobs:
        job()


DECODE_ON = ("auto", "cpu", "device")


def check_decode_on(decode_on: object, encoding: str) -> str:
    """`decode_on` checked against the cache's encoding: "device" needs jpg payloads."""
    if decode_on not in DECODE_ON:
        raise ValueError(f"decode_on must be one of {', '.join(DECODE_ON)}, got {decode_on!r}")
    if decode_on == "device" and encoding != "jpg":
        raise ValueError(f"decode_on='device' decodes JPEGs (nvJPEG on CUDA), and this cache stores {encoding}: "
                         "use decode_on='auto' or 'cpu'")
    return decode_on


def decodes_on_device(decode_on: str, encoding: str, device: torch.device) -> bool:
    """Whether a pass's jpg payloads travel compressed and are decoded on the loader's device:
    asked for ("device"), or "auto" on CUDA."""
    return encoding == "jpg" and (decode_on == "device" or (decode_on == "auto" and device.type == "cuda"))


class Payloads:
    """A batch's jpg payloads, still compressed (1-D uint8 CPU tensors), on their way to the
    device, where `decode` turns them into a (B, C, H, W) uint8 batch in one batched call
    (cacheformat.payload.decode_jpegs: nvJPEG on CUDA, libjpeg-turbo on the CPU)."""

    def __init__(self, payloads: list[torch.Tensor], shape: tuple[int, int, int], where: list[str]) -> None:
        self.payloads, self.shape, self.where = payloads, shape, where

    def __len__(self) -> int:
        return len(self.payloads)

    def decode(self, device: torch.device) -> torch.Tensor:
        with as_error(ReaderError):
            return decode_jpegs(self.payloads, self.shape, device=device, where=self.where)
