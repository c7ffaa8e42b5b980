"""A cache at a URL (s3://, gs://, any fsspec protocol), read from a local copy staged as it is needed.

The loader fetches the manifest on construction; in each pass, the indexes of the shards this
rank reads, then the shards themselves, `ahead` of the consumer, in background threads. Every
file is checked against the manifest's size and sha256 while it downloads, written to a temporary
name and renamed: a file under its own name in the local copy is complete and verified. The local
copy lives in `local/<manifest digest>/` (a cache rebuilt under the same URL gets a new folder),
and is a cache like any other once staged. Processes on one node share it: a shard is fetched
under a file lock, by the first process that needs it. `cache_limit` (bytes) evicts shards this
loader has finished with in the current pass once its copy grows past the limit.

Storage options, credentials and endpoints are fsspec's (for S3: s3fs/botocore's `AWS_*`
variables, `AWS_ENDPOINT_URL` included, `~/.aws`, fsspec's config files), or `storage_options=`.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cacheformat.layout import index_path
from cacheformat.manifest import MAX_MANIFEST_BYTES
from readers.errors import ReaderError

MANIFEST = "manifest.json"
_CHUNK = 4 << 20


def is_url(cache: Any) -> bool:
    """Whether `cache` names a remote cache (a URL with a protocol other than file://)."""
    return isinstance(cache, str) and "://" in cache and not cache.startswith("file://")


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path) of `url`; ReaderError where its protocol's package is missing."""
    try:
        import fsspec
    except ImportError:
        raise ReaderError(f"reading {url} needs fsspec and its protocol's package "
                          "(pip install 'cachegen[cluster]', or s3fs/gcsfs)") from None
    try:
        return fsspec.core.url_to_fs(url.rstrip("/"), **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise ReaderError(f"cannot open {url}: {e}".splitlines()[0]) from None


def _reason(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0][:200]


class _Mismatch(Exception):
    """A download that is not the file the manifest lists (size or sha256)."""


class Stager:
    """The local copy of the remote cache `url` in `local`, filled as shards are asked for."""

    def __init__(self, url: str, local: str | Path | None, *, ahead: int = 4, retries: int = 5,
                 backoff: float = 0.5, cache_limit: int | None = None, threads: int = 4,
                 storage_options: dict | None = None) -> None:
        if local is None:
            raise ValueError(f"{url} is remote: give local= (a folder on local disk to stage its shards in)")
        for name, value, low in (("download_ahead", ahead, 0), ("download_retries", retries, 0),
                                 ("download_threads", threads, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if cache_limit is not None and (not isinstance(cache_limit, int) or isinstance(cache_limit, bool)
                                        or cache_limit < 1):
            raise ValueError(f"cache_limit must be a number of bytes >= 1 (or None), got {cache_limit!r}")
        if not isinstance(backoff, (int, float)) or backoff < 0:
            raise ValueError(f"download_backoff must be seconds >= 0, got {backoff!r}")
        self.url = url.rstrip("/")
        self.fs, self._base = filesystem(self.url, storage_options)
        self.ahead, self.retries, self.backoff, self.threads = ahead, retries, float(backoff), threads
        self.cache_limit = cache_limit
        self._stop = threading.Event()
        data = self._fetch_bytes(MANIFEST)
        self.root = Path(local).absolute() / hashlib.sha256(data).hexdigest()[:16]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not (self.root / MANIFEST).is_file():
                tmp = self.root / f"{MANIFEST}.tmp-{os.getpid()}-{threading.get_ident()}"
                tmp.write_bytes(data)
                os.replace(tmp, self.root / MANIFEST)
        except OSError as e:
            raise ReaderError(f"cannot stage {self.url} in {local}: {e.strerror or e}") from None
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._futures: dict[str, cf.Future] = {}
        self._order: list = []  # the shards of this pass, in the order they are read
        self._position: dict[str, int] = {}
        self._held: OrderedDict[str, int] = OrderedDict()  # shards staged or reserved by this loader: bytes
        self._finished: set[str] = set()  # held shards this pass is done with: may be evicted
        self.fetched = 0  # files this loader downloaded (the node's other processes fetch the rest)
        self.evicted = 0  # shards deleted to stay under cache_limit

    # -- a pass -------------------------------------------------------------------------------

    def begin(self, order: Sequence, indexes: Iterable) -> None:
        """A pass starts: fetch the indexes of `indexes` (all, in parallel, waited for), then the
        first shards of `order` (the shards in the order they will be read) in the background."""
        self.end()
        self._stop.clear()
        self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="readers-stage")
        jobs = [self._pool.submit(self._get, index_path(s.relpath), s.index_bytes, s.index_sha256)
                for s in {s.relpath: s for s in indexes}.values()]
        for job in jobs:
            job.result()
        with self._lock:
            self._order = list(order)
            self._position = {s.relpath: k for k, s in reversed(list(enumerate(self._order)))}
            self._futures = {}
            wanted = set(self._position)
            self._finished = {rel for rel in self._held if rel not in wanted}  # earlier passes' leftovers
            self._evict()
            self._schedule(0)

    def shard(self, shard) -> None:
        """Return once `shard` is in the local copy (fetching it now if it is not on its way)."""
        with self._lock:
            k = self._position.get(shard.relpath)
            self._schedule(k if k is not None else 0)
            job = self._futures.get(shard.relpath)
            if job is None:  # a shard outside the plan: fetched now
                job = self._submit(shard)
        job.result()
        if not shard.path.is_file():  # evicted since by another process on the node: again
            with self._lock:
                job = self._submit(shard)
            job.result()

    def index(self, shard) -> None:
        """Return once `shard`'s index is in the local copy."""
        self._get(index_path(shard.relpath), shard.index_bytes, shard.index_sha256)

    def done(self, shard) -> None:
        """This pass has read all it reads of `shard`: it may be evicted."""
        with self._lock:
            if shard.relpath in self._held:
                self._finished.add(shard.relpath)
            self._evict()

    def end(self) -> None:
        """The pass is over (or left): stop fetching, wait for the threads."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def stage_all(self, shards: Iterable) -> None:
        """Fetch every shard and index of `shards` now (a live cache reads all of its source)."""
        shards = list(shards)
        try:
            self.begin(shards, shards)
            for s in shards:
                self.shard(s)
        finally:
            self.end()

    # -- bookkeeping (under self._lock) --------------------------------------------------------

    def _schedule(self, k: int) -> None:
        """Make sure shards k .. k+ahead of the pass are fetched or on their way (past k, only
        while they fit in cache_limit)."""
        for j in range(k, min(k + self.ahead + 1, len(self._order))):
            shard = self._order[j]
            if shard.relpath in self._futures:
                continue
            if j > k and self.cache_limit is not None and shard.relpath not in self._held and \
                    sum(self._held.values()) + shard.bytes > self.cache_limit:
                break
            self._submit(shard)

    def _submit(self, shard) -> cf.Future:
        if self._pool is None:
            raise ReaderError(f"{self.url}: a shard was asked for outside a pass")
        self._held[shard.relpath] = shard.bytes
        self._held.move_to_end(shard.relpath)
        self._finished.discard(shard.relpath)
        job = self._pool.submit(self._get, shard.relpath, shard.bytes, shard.sha256)
        self._futures[shard.relpath] = job
        return job

    def _evict(self) -> None:
        if self.cache_limit is None:
            return
        used = sum(self._held.values())
        for rel in [r for r in self._held if r in self._finished]:
            if used <= self.cache_limit:
                break
            used -= self._held.pop(rel)
            self._finished.discard(rel)
            try:
                (self.root / rel).unlink()
                self.evicted += 1
            except FileNotFoundError:  # another process on the node evicted it first
                pass

    # -- one file ------------------------------------------------------------------------------

    def _get(self, rel: str, size: int, sha256: str) -> Path:
        """The local copy of `rel`, fetched (checked, then renamed into place) unless present."""
        dest = self.root / rel
        if dest.is_file():  # only a complete, verified file has this name
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest.with_name(dest.name + ".lock")):  # one download per node
            if dest.is_file():
                return dest
            tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            try:
                self._retrying(rel, lambda: self._download(rel, tmp, size, sha256))
                os.replace(tmp, dest)
                with self._lock:
                    self.fetched += 1
            finally:
                tmp.unlink(missing_ok=True)
        return dest

    def copy(self, rel: str) -> None:
        """Copy `rel` into the local copy as it is, unchecked (for `cachegen verify` to judge); a
        missing object is left missing."""
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._retrying(rel, lambda: self.fs.get_file(self._remote(rel), str(dest)))
        except ReaderError:
            if self.fs.exists(self._remote(rel)):
                raise

    def _fetch_bytes(self, rel: str) -> bytes:
        """The manifest's bytes, refused unread where the object is bigger than any manifest."""
        def read() -> bytes:
            with self.fs.open(self._remote(rel), "rb") as f:
                if (f.size or 0) > MAX_MANIFEST_BYTES:
                    raise ReaderError(f"{self.url}/{rel} is {f.size} bytes, more than any manifest "
                                      f"({MAX_MANIFEST_BYTES}): not a cachegen cache")
                return f.read(MAX_MANIFEST_BYTES + 1) if f.size is None else f.read()
        return self._retrying(rel, read)

    def _retrying(self, rel: str, attempt):
        url = f"{self.url}/{rel}"
        last: BaseException | None = None
        for k in range(self.retries + 1):
            if k and self._stop.wait(self.backoff * 2 ** (k - 1)):
                raise ReaderError(f"{url}: download stopped (the pass ended)")
            try:
                return attempt()
            except FileNotFoundError as e:
                if rel == MANIFEST:
                    raise ReaderError(f"no cache at {url} (bucket or object not found)") from None
                # The manifest lists it: a store that is restarting (or only eventually consistent)
                # may not serve it yet. Retried; a truly missing one is named after the last try.
                last = e
            except PermissionError as e:
                raise ReaderError(f"access to {url} denied ({_reason(e)}); check the credentials") from None
            except ReaderError:
                raise
            except Exception as e:  # noqa: BLE001 - connection reset, timeout, a corrupted transfer: retried
                last = e
        raise ReaderError(f"cannot fetch {url} after {self.retries + 1} tries: {_reason(last)}")

    def _download(self, rel: str, tmp: Path, size: int, sha256: str) -> None:
        digest, got = hashlib.sha256(), 0
        with self.fs.open(self._remote(rel), "rb", block_size=_CHUNK) as src, open(tmp, "wb") as out:
            while got <= size:
                if self._stop.is_set():
                    raise ReaderError(f"{self.url}/{rel}: download stopped (the pass ended)")
                chunk = src.read(min(_CHUNK, size + 1 - got))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
        if got != size:
            raise _Mismatch(f"{got} bytes{'+' if got > size else ''}, the manifest says {size}")
        if digest.hexdigest() != sha256:
            raise _Mismatch("its sha256 is not the manifest's (corrupted object)")

    def _remote(self, rel: str) -> str:
        return f"{self._base}/{rel}"


@contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
