"""The build's shards as tasks on a Dask cluster (`cachegen build --dask ADDRESS`).

The same seam as the local pool: a `concurrent.futures.Executor` (distributed's ClientExecutor)
whose futures the build collects as they finish. The job (source, transform, output folder) is
sent to every worker once; each task writes one shard into the output folder, which every worker
must see at the same path (a shared file system), and returns its manifest entry to the client,
which writes the manifest. A worker lost mid-build costs only its tasks: Dask runs them again
elsewhere, and a shard is only ever renamed into place complete, so the bytes are a local build's.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any

from cachegen.errors import CachegenError


@contextmanager
def dask_executor(address: str) -> Iterator[tuple[Executor, Any]]:
    """(executor, client) of the Dask scheduler at `address`, closed on exit."""
    try:
        from distributed import Client
    except ImportError:
        raise CachegenError("--dask needs the distributed package: pip install 'cachegen[cluster]'") from None
    try:
        # Connect timeout: Dask's config (distributed.comm.timeouts.connect, 30 s; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT).
        client = Client(address, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise CachegenError(f"cannot reach the Dask scheduler at {address} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); start one or fix --dask") from None
    executor = client.get_executor()
    try:
        yield executor, client
    finally:
        executor.shutdown(wait=False)  # what is still queued or running is cancelled
        client.close()
