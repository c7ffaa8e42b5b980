"""A cache at a URL (s3://, gs://, any fsspec protocol), read from a local copy staged as it is needed.

The loader fetches the manifest on construction; in each pass, the indexes of the shards this
rank reads, then the shards themselves, `ahead` of the consumer, in background threads. Every
file is checked against the manifest's size and sha256 while it downloads, written to a temporary
name and renamed: a file under its own name in the local copy is complete and verified. The local
copy lives in `local/<manifest digest>/` (a cache rebuilt under the same URL gets a new folder),
and is a cache like any other once staged. Processes on one node share it: a shard is fetched
under a file lock, by the first process that needs it.

`cache_limit` (bytes) is the node's: it bounds the shards staged in the shared folder by all the
loaders using it, accounted in that folder under a file lock (`.node.lock`) before each download.
Room is made by deleting the least recently fetched shards no loader is reading: a loader pins (a
shared flock on `<shard>.pin`) each shard from the moment it needs it until it is done with it and
no longer maps it (a pass left early keeps the pins of the shards it still maps), and a pinned shard
is never deleted. A download's temporary counts as the shard's full size; one left by a loader that
died mid-download (no process holds that shard's download lock) is deleted when room is next made. A
shard fetched ahead of the consumer is not pinned: it may be evicted for a shard another loader
needs now, and is fetched again when it is reached. When the pinned shards fill the limit, a loader
still fetches the one shard it needs now.

Storage options, credentials and endpoints are fsspec's (for S3: s3fs/botocore's `AWS_*`
variables, `AWS_ENDPOINT_URL` included, `~/.aws`, fsspec's config files), or `storage_options=`.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cacheformat.layout import TMP_MARK, index_path
from cacheformat.locks import lock_file, locked
from cacheformat.manifest import MANIFEST, MAX_MANIFEST_BYTES
from readers.errors import ReaderError

NODE_LOCK = ".node.lock"  # in the staged copy: held while a loader accounts for the node's shards
PIN = ".pin"  # <shard>.pin: shared-locked by every loader reading the shard
_CHUNK = 1 << 20  # a stopped pass's downloads notice within one chunk
_POLL_S = 0.05  # how often a download waiting on another process's lock looks for a stop


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
        self._stop = threading.Event()  # this pass's: set when it ends (each pass gets its own)
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
        self._pins: dict[str, int] = {}  # shard -> the descriptor holding its pin (a shared flock)
        self.fetched = 0  # files this loader downloaded (the node's other processes fetch the rest)
        self.evicted = 0  # shards this loader deleted to keep the node under cache_limit

    # -- a pass -------------------------------------------------------------------------------

    def begin(self, order: Sequence, indexes: Iterable) -> None:
        """A pass starts: fetch the indexes of `indexes` (all, in parallel, waited for), then the
        first shards of `order` (the shards in the order they will be read) in the background."""
        self.end(keep=self._pins)  # a shard still mapped stays pinned (ShardFiles lets go of it)
        self._stop = threading.Event()
        self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="readers-stage")
        jobs = [self._pool.submit(self._get, index_path(s.relpath), s.index_bytes, s.index_sha256, self._stop)
                for s in {s.relpath: s for s in indexes}.values()]
        for job in jobs:
            job.result()
        with self._lock:
            self._order = list(order)
            self._position = {s.relpath: k for k, s in reversed(list(enumerate(self._order)))}
            self._futures = {}
            self._schedule(0)

    def shard(self, shard) -> None:
        """Return once `shard` is in the local copy (fetching it now if it is not on its way)."""
        self._pin(shard.relpath)  # before looking: from now on no loader of the node deletes it
        with self._lock:
            k = self._position.get(shard.relpath)
            self._schedule(k if k is not None else 0)
            job = self._futures.get(shard.relpath)
            if job is None:  # a shard outside the plan: fetched now
                job = self._submit(shard)
        job.result()
        if not shard.path.is_file():  # fetched ahead, then evicted (or skipped for room): now, needed
            with self._lock:
                job = self._submit(shard, needed=True)
            job.result()

    def index(self, shard) -> None:
        """Return once `shard`'s index is in the local copy."""
        self._get(index_path(shard.relpath), shard.index_bytes, shard.index_sha256, self._stop)

    def done(self, shard) -> None:
        """This loader has read all it reads of `shard` and no longer maps it: it may be evicted
        (unless another loader reads it)."""
        self.unpin(shard.relpath)

    def unpin(self, rel: str) -> None:
        fd = self._pins.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def end(self, keep: Iterable[str] = ()) -> None:
        """The pass is over (or left): downloads stop within a chunk (or a lock poll), the
        threads are joined, and this loader's pins are let go, but those of `keep` (shards it
        still maps)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        for rel in set(self._pins) - set(keep):
            self.unpin(rel)

    def stage_all(self, shards: Iterable) -> None:
        """Fetch every shard and index of `shards` now (a live cache reads all of its source)."""
        shards = list(shards)
        try:
            self.begin(shards, shards)
            for s in shards:
                self.shard(s)
                self.done(s)  # staged whole, not being read: a pin each would hold a descriptor each
        finally:
            self.end()

    # -- bookkeeping (under self._lock) --------------------------------------------------------

    def _schedule(self, k: int) -> None:
        """Make sure shards k .. k+ahead of the pass are fetched or on their way (past k, only
        where the node's cache_limit has room for them)."""
        for j in range(k, min(k + self.ahead + 1, len(self._order))):
            shard = self._order[j]
            if shard.relpath not in self._futures:
                self._submit(shard, needed=j == k)

    def _submit(self, shard, needed: bool = True) -> cf.Future:
        if self._pool is None:
            raise ReaderError(f"{self.url}: a shard was asked for outside a pass")
        job = self._pool.submit(self._get, shard.relpath, shard.bytes, shard.sha256, self._stop,
                                None if needed else shard.bytes)
        self._futures[shard.relpath] = job
        return job

    def _pin(self, rel: str) -> None:
        if rel not in self._pins:
            pin = self.root / (rel + PIN)
            pin.parent.mkdir(parents=True, exist_ok=True)
            self._pins[rel] = lock_file(pin, shared=True)

    # -- the node's share of the disk (under NODE_LOCK) -----------------------------------------

    def _make_room(self, size: int, optional: bool, own: Path) -> bool:
        """Whether a shard of `size` bytes may be staged now: deletes unpinned shards, least
        recently fetched first, until the node's staged shards (downloads under way included)
        plus `size` fit in cache_limit. An `optional` shard (fetched ahead) that does not fit is
        not fetched; a needed one is, over the limit if the pinned shards fill it. The temporaries
        of dead downloads go first (`own`: the shard this thread holds the download lock of)."""
        staged = sorted(((st.st_mtime, path, st.st_size) for path, st in _shard_files(self.root)
                         if TMP_MARK not in path.name or not self._reclaim(path, own)),
                        key=lambda t: t[0])
        used = sum(size for _, _, size in staged)
        for _, path, bytes_ in staged:
            if used + size <= self.cache_limit:
                break
            if TMP_MARK in path.name or not self._evict(path):
                continue
            used -= bytes_
        return used + size <= self.cache_limit or not optional

    def _reclaim(self, tmp: Path, own: Path) -> bool:
        """Delete the download temporary `tmp` where no download of its shard is under way (its
        loader died mid-download): a download holds its shard's lock from before its temporary
        is made until after it is gone. `own`'s lock is this thread's: any temporary of it is dead."""
        shard = tmp.with_name(tmp.name.split(TMP_MARK)[0])
        if shard == own:
            tmp.unlink(missing_ok=True)
            return True
        fd = lock_file(shard.with_name(shard.name + ".lock"), blocking=False)
        if fd is None:  # being downloaded
            return False
        try:
            tmp.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def _evict(self, path: Path) -> bool:
        """Delete the staged shard `path` unless a loader has it pinned."""
        fd = lock_file(path.with_name(path.name + PIN), blocking=False)
        if fd is None:
            return False
        try:
            path.unlink(missing_ok=True)
            self.evicted += 1
            return True
        finally:
            os.close(fd)

    # -- one file ------------------------------------------------------------------------------

    def _get(self, rel: str, size: int, sha256: str, stop: threading.Event, optional: int | None = None) -> Path | None:
        """The local copy of `rel`, fetched (checked, then renamed into place) unless present; a
        shard (`optional`: fetched ahead, may be skipped) first gets room under cache_limit."""
        dest = self.root / rel
        if dest.is_file():  # only a complete, verified file has this name
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = self._wait_lock(dest.with_name(dest.name + ".lock"), rel, stop)  # one download per node
        try:
            if dest.is_file():
                return dest
            tmp = dest.with_name(f"{dest.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
            try:
                if not self._reserve(rel, tmp, size, optional):
                    return None
                self._retrying(rel, lambda: self._download(rel, tmp, size, sha256, stop), stop)
                os.replace(tmp, dest)
                with self._lock:
                    self.fetched += 1
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)
        return dest

    def _reserve(self, rel: str, tmp: Path, size: int, optional: int | None) -> bool:
        """Count a shard's download against the node's cache_limit: under the node lock, make room
        and create its temporary file at full size (so other loaders' accounts see it)."""
        if self.cache_limit is None or not rel.endswith(".tar"):
            return True
        with locked(self.root / NODE_LOCK):
            if not self._make_room(size, optional is not None, self.root / rel):
                return False
            with open(tmp, "wb") as f:
                f.truncate(size)
        return True

    def _wait_lock(self, path: Path, rel: str, stop: threading.Event) -> int:
        """Take the lock at `path`, polling, so that a pass that ends stops waiting for another
        process's download at once."""
        while True:
            fd = lock_file(path, blocking=False)
            if fd is not None:
                return fd
            if stop.wait(_POLL_S):
                raise ReaderError(f"{self.url}/{rel}: download stopped (the pass ended)")

    def copy(self, rel: str) -> None:
        """Copy `rel` into the local copy as it is, unchecked (for `cachegen verify` to judge); a
        missing object is left missing."""
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._retrying(rel, lambda: self.fs.get_file(self._remote(rel), str(dest)), self._stop)
        except ReaderError:
            if self.fs.exists(self._remote(rel)):
                raise

    def sizes(self) -> dict[str, int]:
        """Every object of the remote cache by its path relative to it, and its size: one listing
        (a page per thousand objects on S3), which bounds the manifest's counts by the objects
        before anything is planned or downloaded."""
        def listing() -> dict[str, int]:
            # What is there now; and no listing kept after, whose stale entries (a rebuilt cache's
            # sizes and etags) a later open of the same URL would read its objects by.
            self.fs.invalidate_cache()  # all of it: a path's own leaves its subfolders' listings
            try:
                found = self.fs.find(self._base, detail=True)
            finally:
                self.fs.invalidate_cache()
            return {path[len(self._base) + 1:]: int(info.get("size") or 0) for path, info in found.items()
                    if path.startswith(self._base + "/")}
        return self._retrying("", listing, self._stop)

    def _fetch_bytes(self, rel: str) -> bytes:
        """The manifest's bytes, refused unread where the object is bigger than any manifest."""
        def read() -> bytes:
            with self.fs.open(self._remote(rel), "rb") as f:
                if (f.size or 0) > MAX_MANIFEST_BYTES:
                    raise ReaderError(f"{self.url}/{rel} is {f.size} bytes, more than any manifest "
                                      f"({MAX_MANIFEST_BYTES}): not a cachegen cache")
                return f.read(MAX_MANIFEST_BYTES + 1) if f.size is None else f.read()
        return self._retrying(rel, read, self._stop)

    def _retrying(self, rel: str, attempt, stop: threading.Event):
        url = f"{self.url}/{rel}"
        last: BaseException | None = None
        for k in range(self.retries + 1):
            if k and stop.wait(self.backoff * 2 ** (k - 1)):
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

    def _download(self, rel: str, tmp: Path, size: int, sha256: str, stop: threading.Event) -> None:
        digest, got = hashlib.sha256(), 0
        # "r+b" over a reservation (_reserve: the file at full size), so the node's account holds
        # while it downloads; a retry starts it again from the beginning.
        with self.fs.open(self._remote(rel), "rb", block_size=_CHUNK) as src, \
                open(tmp, "r+b" if tmp.exists() else "wb") as out:
            while got <= size:
                if stop.is_set():
                    raise ReaderError(f"{self.url}/{rel}: download stopped (the pass ended)")
                chunk = src.read(min(_CHUNK, size + 1 - got))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
            out.truncate(got)  # a reservation, or an earlier try, may have left it longer
        if got != size:
            raise _Mismatch(f"{got} bytes{'+' if got > size else ''}, the manifest says {size}")
        if digest.hexdigest() != sha256:
            raise _Mismatch("its sha256 is not the manifest's (corrupted object)")

    def _remote(self, rel: str) -> str:
        return f"{self._base}/{rel}"


def _shard_files(root: Path) -> Iterable[tuple[Path, os.stat_result]]:
    """Every staged shard under `root`, downloads under way included: (path, stat)."""
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            name = entry.name
            if name.endswith(".tar") or (TMP_MARK in name and name.split(TMP_MARK)[0].endswith(".tar")):
                try:
                    yield Path(entry.path), entry.stat()
                except FileNotFoundError:  # deleted meanwhile by another loader
                    continue
