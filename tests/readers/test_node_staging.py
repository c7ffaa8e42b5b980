"""Node-shared staging against a real S3 endpoint (moto's server): several real processes share one
`local=` folder; cache_limit bounds the node's copy, a shard a loader reads is never deleted under
it, and leaving a pass stops its downloads at once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from cacheformat.locks import lock_file
from readers import CachedLoader, ReaderError

pytestmark = pytest.mark.usefixtures("s3_server")

PROCESSES = 3
OPTIONS = {"batch_size": 16, "device": "cpu", "normalize": False, "shuffle_window": 50, "prefetch": 0}


@pytest.fixture
def remote(npy_cache, s3_server) -> str:
    from s3server import s3fs_filesystem, upload

    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    upload(s3fs_filesystem(), npy_cache, url)
    return url


def _read(url: str, cache: str, local: str, limit: int, seed: int, out: str) -> None:
    """One loader process: two epochs through the shared staged copy, each batch compared with
    the same loader over the cache on local disk."""
    staged = CachedLoader(url, local=local, cache_limit=limit, download_ahead=2, download_backoff=0.05,
                          seed=seed, **OPTIONS)
    reference = CachedLoader(cache, seed=seed, **OPTIONS)
    result = {"batches": 0, "mismatches": 0, "error": None}
    try:
        for epoch in (0, 1):
            staged.set_epoch(epoch)
            reference.set_epoch(epoch)
            for (x, y), (rx, ry) in zip(staged, reference, strict=True):
                result["batches"] += 1
                result["mismatches"] += not (torch.equal(x, rx) and torch.equal(y, ry))
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        result["error"] = f"{type(e).__name__}: {e}"
    result["evicted"], result["fetched"] = staged._stager.evicted, staged._stager.fetched
    Path(out).write_text(json.dumps(result))


def _staged_bytes(local: Path) -> int:
    """Bytes of the shards staged under `local`, downloads under way included."""
    total = 0
    for path in local.rglob("*.tar*"):
        if not path.name.endswith((".lock", ".pin")):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
    return total


def test_processes_sharing_a_folder_keep_the_node_under_cache_limit(npy_cache, remote, tmp_path):
    manifest = json.loads((npy_cache / "manifest.json").read_text())
    shard_bytes = max(s["bytes"] for e in manifest["epoch_list"] for s in e["shards"])
    limit = 3 * shard_bytes  # 12 shards in the cache, 3 staged on the node at a time
    local = tmp_path / "node"
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_read, args=(remote, str(npy_cache), str(local), limit, seed,
                                               str(tmp_path / f"p{seed}.json")))
             for seed in range(PROCESSES)]  # other seeds: each reads the shards in its own order
    for p in procs:
        p.start()
    peak, deadline = 0, time.monotonic() + 240
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        peak = max(peak, _staged_bytes(local))
        time.sleep(0.01)
    for p in procs:
        p.join(timeout=5)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"p{seed}.json").read_text()) for seed in range(PROCESSES)]
    assert [r["error"] for r in results] == [None] * PROCESSES  # no shard went missing under a reader
    assert all(r["batches"] == 2 * 19 and r["mismatches"] == 0 for r in results)  # 300 samples in batches of 16
    assert sum(r["evicted"] for r in results) > 0  # the limit bound
    # The node's limit, plus at most the one shard each loader needs now when pinned shards fill it;
    # a limit per loader would have allowed PROCESSES x limit.
    assert peak <= limit + PROCESSES * shard_bytes < PROCESSES * limit + shard_bytes


def test_closing_a_loader_stops_a_download_waiting_on_another_process(remote, tmp_path):
    loader = CachedLoader(remote, local=tmp_path / "node", shuffle=False, **OPTIONS)
    first = loader.manifest.epochs[0][0]
    first.path.parent.mkdir(parents=True, exist_ok=True)
    held = lock_file(first.path.with_name(first.path.name + ".lock"))  # "another process" is fetching it
    errors = []

    def consume():
        try:
            next(iter(loader))
        except ReaderError as e:
            errors.append(str(e))

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(1.0)
    assert reader.is_alive()  # waiting for the other process's download
    loader.close()
    reader.join(timeout=10)
    stopped = not reader.is_alive()  # judged while the other process still holds the lock: close() ended the wait
    os.close(held)
    assert stopped
    assert errors and "download stopped" in errors[0]


def _stall(url: str, local: str, limit: int) -> None:
    """A loader whose downloads stall: the shards leave the store once it is open (an open checks them
    all against one listing), so each download is retried, far apart."""
    from s3server import s3fs_filesystem

    loader = CachedLoader(url, local=local, cache_limit=limit, download_backoff=60, download_retries=5,
                          shuffle=False, **OPTIONS)
    s3fs_filesystem().rm(_shard_objects(url))
    next(iter(loader))


def _shard_objects(remote: str) -> list[str]:
    from s3server import s3fs_filesystem

    return [p for p in s3fs_filesystem().find(remote.removeprefix("s3://")) if p.endswith(".tar")]


def test_the_reservation_of_a_loader_killed_mid_download_is_reclaimed(npy_cache, remote, tmp_path):
    from s3server import s3fs_filesystem, upload

    fs, local = s3fs_filesystem(), tmp_path / "node"
    manifest = json.loads((npy_cache / "manifest.json").read_text())
    shard_bytes = max(s["bytes"] for e in manifest["epoch_list"] for s in e["shards"])
    killed = mp.get_context("spawn").Process(target=_stall, args=(remote, str(local), 100 * shard_bytes))
    killed.start()
    try:
        deadline = time.monotonic() + 120
        while not list(local.glob("*/*/*.tar.tmp-*")):
            assert killed.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        killed.kill()  # mid-download, as the OOM killer would
        killed.join()
    left = list(local.glob("*/*/*.tar.tmp-*"))
    assert left and all(f".tmp-{killed.pid}-" in p.name for p in left)
    upload(fs, npy_cache, remote)

    loader = CachedLoader(remote, local=local, cache_limit=3 * shard_bytes, **OPTIONS)
    assert sum(len(y) for _, y in loader) == 300
    assert not [p for p in left if p.exists()]  # no longer counted against the node's limit for ever


def test_a_shard_still_mapped_after_a_pass_left_early_stays_pinned(npy_cache, remote, tmp_path):
    manifest = json.loads((npy_cache / "manifest.json").read_text())
    shard_bytes = max(s["bytes"] for e in manifest["epoch_list"] for s in e["shards"])
    local = tmp_path / "node"
    left = CachedLoader(remote, local=local, seed=1, **OPTIONS)
    next(iter(left))  # a pass left after one batch: its shards stay mapped, to be read next pass
    mapped = [s for s in left.manifest.epochs[0] if s.relpath in left._files._open]
    assert mapped and all(s.path.is_file() for s in mapped)

    other = CachedLoader(remote, local=local, cache_limit=2 * shard_bytes, seed=2, **OPTIONS)
    assert sum(len(y) for _, y in other) == 300 and other._stager.evicted > 0  # room made, shard by shard
    assert all(s.path.is_file() for s in mapped)  # not evicted while mapped
    left.close()
