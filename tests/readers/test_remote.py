"""A cache on S3 (a real endpoint over HTTP: moto's server), read through a local staged copy."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from pathlib import Path

import pytest
import torch

from readers import CachedLoader, ReaderError, open_loader

pytestmark = pytest.mark.usefixtures("s3_server")

FAST = {"download_retries": 2, "download_backoff": 0.05, "prefetch": 0, "device": "cpu"}


@pytest.fixture
def s3fs_fs(s3_server):
    from s3server import s3fs_filesystem

    return s3fs_filesystem()


@pytest.fixture
def remote(npy_cache, s3fs_fs) -> str:
    """The npy test cache uploaded under a fresh prefix."""
    from s3server import upload

    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    upload(s3fs_fs, npy_cache, url)
    return url


def batches(loader, epochs=(0, 1)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def staged_files(local: Path) -> list[Path]:
    return sorted(p for p in local.rglob("*") if p.suffix in (".tar", ".idx"))


def test_staged_read_equals_local_read_two_epochs_two_ranks(npy_cache, remote, tmp_path):
    for rank in (0, 1):
        for prefetch in (0, 2):
            local = CachedLoader(npy_cache, batch_size=32, rank=rank, world_size=2, device="cpu", prefetch=prefetch)
            staged = CachedLoader(remote, local=tmp_path / "scratch", batch_size=32, rank=rank, world_size=2,
                                  **{**FAST, "prefetch": prefetch})
            assert same(batches(staged), batches(local))
    # Every staged file is the cache's own, byte for byte; no temporary is left behind.
    copy = next((tmp_path / "scratch").iterdir())
    files = staged_files(copy)
    assert len(files) == 2 * len(list(npy_cache.rglob("*.tar")))
    for p in files:
        assert p.read_bytes() == (npy_cache / p.relative_to(copy)).read_bytes()
    assert not list(copy.rglob("*.tmp-*"))


def test_open_loader_and_a_second_loader_reuse_the_node_copy(npy_cache, remote, tmp_path):
    first = open_loader(remote, local=tmp_path / "scratch", batch_size=50, **FAST)
    assert isinstance(first, CachedLoader)
    batches(first)
    assert first._stager.fetched > 0
    second = CachedLoader(remote, local=tmp_path / "scratch", batch_size=50, **FAST)
    assert same(batches(second), batches(CachedLoader(npy_cache, batch_size=50, device="cpu")))
    assert second._stager.fetched == 0  # everything was there, complete and verified


def test_two_ranks_on_one_node_fetch_each_shard_once(remote, tmp_path):
    loaders = [CachedLoader(remote, local=tmp_path / "scratch", batch_size=25, shuffle=False, **FAST)
               for _ in range(2)]  # both read the whole epoch at the same time, from one local copy
    errors = []

    def read(loader):
        try:
            batches(loader, epochs=(0,))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=read, args=(lo,)) for lo in loaders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    copy = next((tmp_path / "scratch").iterdir())
    assert sum(lo._stager.fetched for lo in loaders) == len(staged_files(copy))


def test_server_outage_mid_epoch_is_retried_and_nothing_partial_is_used(npy_cache, remote, s3_server, tmp_path):
    from s3server import s3fs_filesystem, upload

    expected = batches(CachedLoader(npy_cache, batch_size=25, shuffle_window=50, device="cpu"), epochs=(0,))
    loader = CachedLoader(remote, local=tmp_path / "scratch", batch_size=25, shuffle_window=50, download_ahead=0,
                          download_retries=10, download_backoff=0.25, prefetch=0, device="cpu")  # ~4 min budget: a loaded CI
    copy = loader.manifest.root
    # A partial download a killed process left behind: never read.
    (copy / "epoch-0000").mkdir(exist_ok=True)
    victim = loader.manifest.epochs[0][-1]
    Path(f"{victim.path}.tmp-999-1").write_bytes(b"partial")
    got = []
    restarted = threading.Event()

    def restart():
        s3_server.start()
        upload(s3fs_filesystem(), npy_cache, remote)  # its objects are back
        restarted.set()

    it = iter(loader)
    got.append(tuple(t.clone() for t in next(it)))
    assert len(list(copy.rglob("*.tar"))) == 1  # the first shard (indexes: all of this pass's)
    s3_server.stop()  # mid-epoch: the next shards cannot be fetched
    timer = threading.Timer(1.0, restart)
    timer.start()
    try:
        got += [(x.clone(), y.clone()) for x, y in it]
    finally:
        timer.join()
    assert restarted.is_set()
    assert same(got, expected)
    assert len(list(copy.rglob("*.tar"))) == 6
    for p in staged_files(copy):
        assert p.read_bytes() == (npy_cache / p.relative_to(copy)).read_bytes()
    assert [p.name for p in copy.rglob("*.tmp-*")] == [f"{victim.path.name}.tmp-999-1"]


def test_a_corrupted_object_is_a_reader_error_naming_it(npy_cache, remote, s3fs_fs, tmp_path):
    manifest = json.loads((npy_cache / "manifest.json").read_text())
    rel = manifest["epoch_list"][0]["shards"][1]["path"]
    data = bytearray((npy_cache / rel).read_bytes())
    data[5000] ^= 0xFF  # same size, one byte off
    s3fs_fs.pipe_file(f"{remote.removeprefix('s3://')}/{rel}", bytes(data))
    loader = CachedLoader(remote, local=tmp_path / "scratch", batch_size=50, shuffle=False, **FAST)
    with pytest.raises(ReaderError, match=f"{remote}/{rel}.*sha256") as e:
        batches(loader, epochs=(0,))
    assert "\n" not in str(e.value)
    assert not (loader.manifest.root / rel).exists()  # never renamed into place


def test_eviction_keeps_the_copy_under_cache_limit(npy_cache, remote, tmp_path):
    manifest = json.loads((npy_cache / "manifest.json").read_text())
    shard_bytes = max(s["bytes"] for e in manifest["epoch_list"] for s in e["shards"])
    limit = 3 * shard_bytes
    loader = CachedLoader(remote, local=tmp_path / "scratch", batch_size=16, cache_limit=limit, download_ahead=2,
                          shuffle_window=50, **FAST)
    seen = []

    def size(path):  # a shard the download thread evicts between the listing and its stat counts nothing
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def tars():
        return sum(size(p) for p in loader.manifest.root.rglob("*.tar"))

    got = []
    for e in (0, 1):
        loader.set_epoch(e)
        for x, y in loader:
            got.append((x.clone(), y.clone()))
            seen.append(tars())
    assert same(got, batches(CachedLoader(npy_cache, batch_size=16, shuffle_window=50, device="cpu")))
    assert loader._stager.evicted > 0
    assert max(seen) <= limit + shard_bytes  # the limit, plus the shard being read past it at most


@pytest.mark.parametrize("url, match", [
    ("s3://no-such-bucket-here/cache", "no cache at s3://no-such-bucket-here/cache/manifest.json"),
    ("s3://caches/no-such-prefix", "no cache at s3://caches/no-such-prefix/manifest.json"),
])
def test_missing_bucket_or_cache_is_one_line_naming_the_url(url, match, s3fs_fs, tmp_path):
    if not s3fs_fs.exists("caches"):
        s3fs_fs.mkdir("caches")
    with pytest.raises(ReaderError, match=match) as e:
        CachedLoader(url, local=tmp_path, batch_size=8, **FAST)
    assert "\n" not in str(e.value)


def test_unreachable_endpoint_is_one_line_naming_the_url(tmp_path):
    from s3server import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = {"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}, "retries": 1}
    with pytest.raises(ReaderError, match="cannot fetch s3://caches/x/manifest.json after 2 tries") as e:
        CachedLoader("s3://caches/x", local=tmp_path, batch_size=8, storage_options=options,
                     download_retries=1, download_backoff=0, device="cpu")
    assert "\n" not in str(e.value)


def test_remote_options_are_checked(remote, npy_cache, tmp_path):
    with pytest.raises(ValueError, match="give local="):
        CachedLoader(remote, batch_size=8)
    with pytest.raises(ValueError, match="cache_limit must be"):
        CachedLoader(remote, local=tmp_path, batch_size=8, cache_limit=-1)
    with pytest.raises(ValueError, match="local= and download options are for a remote cache"):
        CachedLoader(npy_cache, local=tmp_path, batch_size=8)
    with pytest.raises(TypeError, match="download_ahaed"):
        CachedLoader(remote, local=tmp_path, batch_size=8, download_ahaed=2)


def test_a_rebuilt_cache_under_the_same_url_is_staged_apart(npy_cache, caches, remote, s3fs_fs, tmp_path):
    from s3server import upload

    first = CachedLoader(remote, local=tmp_path / "scratch", batch_size=50, **FAST)
    batches(first, epochs=(0,))
    upload(s3fs_fs, caches["png"], remote)  # another cache replaces it (same shard names)
    second = CachedLoader(remote, local=tmp_path / "scratch", batch_size=50, **FAST)
    assert second.manifest.root != first.manifest.root
    expected = batches(CachedLoader(caches["png"], batch_size=50, device="cpu"), epochs=(0,))
    assert same(batches(second, epochs=(0,)), expected)
    digest = hashlib.sha256((caches["png"] / "manifest.json").read_bytes()).hexdigest()[:16]
    assert second.manifest.root.name == digest


def test_a_rank_stages_only_its_share(npy_cache, remote, tmp_path):
    loader = CachedLoader(remote, local=tmp_path / "scratch", batch_size=25, rank=1, world_size=3, shuffle_window=50,
                          **FAST)
    batches(loader, epochs=(0,))
    plan = loader.plan(0)
    mine = {loader.manifest.epochs[0][s.shard].relpath for w in plan.windows for s in w.segments}
    staged = {p.relative_to(loader.manifest.root).as_posix() for p in loader.manifest.root.rglob("*.tar")}
    assert staged == mine and len(mine) < len(loader.manifest.epochs[0])


@pytest.fixture
def live_remote(source, s3fs_fs, tmp_path) -> tuple[str, Path]:
    """A live cache of the test source, built here and uploaded: (url, local folder)."""
    from click.testing import CliRunner

    from cachegen.cli import main
    from s3server import upload

    result = CliRunner().invoke(main, ["build", str(source[0]), "--out", str(tmp_path / "live"), "--mode", "live",
                                       "--epochs", "2", "--shard-size", "100", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    upload(s3fs_fs, tmp_path / "live", url)
    return url, tmp_path / "live"


def test_open_loader_stages_a_live_cache_whole(live_remote, tmp_path):
    from readers import LiveLoader

    url, live = live_remote
    staged = open_loader(url, local=tmp_path / "scratch", batch_size=32, workers=0, **FAST)
    assert isinstance(staged, LiveLoader)
    assert same(batches(staged), batches(LiveLoader(live, batch_size=32, workers=0, device="cpu")))


def test_a_live_cache_with_a_corrupted_index_fails_on_construction_leaving_no_thread(live_remote, s3fs_fs, tmp_path):
    url, _ = live_remote
    rel = "source/shard-000001.idx"
    s3fs_fs.pipe_file(f"{url.removeprefix('s3://')}/{rel}", b"not an index")
    with pytest.raises(ReaderError, match=f"{url}/{rel}"):
        open_loader(url, local=tmp_path / "scratch", batch_size=32, workers=0, **FAST)


def test_a_corrupted_index_is_a_reader_error_and_leaves_no_thread(npy_cache, remote, s3fs_fs, tmp_path):
    rel = "epoch-0000/shard-000000.idx"
    data = bytearray((npy_cache / rel).read_bytes())
    data[-1] ^= 0xFF
    s3fs_fs.pipe_file(f"{remote.removeprefix('s3://')}/{rel}", bytes(data))
    loader = CachedLoader(remote, local=tmp_path / "scratch", batch_size=50, **FAST)
    with pytest.raises(ReaderError, match=f"{remote}/{rel}.*sha256"):
        batches(loader, epochs=(0,))  # the autouse fixture checks that the download threads are gone


@pytest.mark.parametrize("damage", ["deleted", "cut"])
def test_a_missing_or_cut_object_fails_the_open_before_anything_is_planned_or_staged(npy_cache, remote, s3fs_fs,
                                                                                    tmp_path, damage):
    """The listing bounds the manifest's counts by the objects: a shard whose claimed samples no
    object holds fails the construction, in one line naming its URL, with nothing downloaded."""
    rel = json.loads((npy_cache / "manifest.json").read_text())["epoch_list"][1]["shards"][2]["path"]
    key = f"{remote.removeprefix('s3://')}/{rel}"
    if damage == "deleted":
        s3fs_fs.rm(key)
    else:
        s3fs_fs.pipe_file(key, (npy_cache / rel).read_bytes()[:10240])
    message = "is missing (the manifest lists it)" if damage == "deleted" else "is 10240 bytes, the manifest says"
    with pytest.raises(ReaderError, match=re.escape(f"shard {remote}/{rel} {message}")) as e:
        CachedLoader(remote, local=tmp_path / "scratch", batch_size=50, **FAST)
    assert "\n" not in str(e.value)
    assert staged_files(tmp_path / "scratch") == []
