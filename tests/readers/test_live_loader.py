"""LiveLoader and open_loader: live augmentation yields exactly what a cache of the same build does."""

from __future__ import annotations

import gc
import json
import multiprocessing
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachegen.cli import main
from loader_checks import epoch_batches
from readers import CachedLoader, LiveLoader, ReaderError, open_loader


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A cached and a live cache of the same 300-image source, cifar preset (really random), 2 epochs."""
    root = tmp_path_factory.mktemp("live")
    rng = np.random.default_rng(7)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 5, 300))
    for mode in ("cached", "live"):
        result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / mode), "--epochs", "2",
                                           "--shard-size", "40", "--workers", "1", "--quiet", "--mode", mode])
        assert result.exit_code == 0, result.output
    return root / "cached", root / "live"


@pytest.mark.parametrize("workers", [0, 2])
def test_live_equals_cached_batch_for_batch(pair, workers):
    cached_dir, live_dir = pair
    options = dict(batch_size=32, seed=5, device="cpu")
    cached, live = CachedLoader(cached_dir, **options), LiveLoader(live_dir, workers=workers, **options)
    for epoch in (0, 1, 2):  # epoch 2 wraps to cached epoch 0 with a fresh order
        a, b = epoch_batches(cached, epoch), epoch_batches(live, epoch)
        assert len(a) == len(b) == len(cached) == len(live) == 10
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert not torch.equal(epoch_batches(live, 0)[0][0], epoch_batches(live, 1)[0][0])


def test_live_equals_cached_per_rank_and_in_uint8(pair):
    cached_dir, live_dir = pair
    for rank in (0, 1):
        options = dict(batch_size=16, seed=1, device="cpu", rank=rank, world_size=2, normalize=False,
                       drop_last=True)
        a = epoch_batches(CachedLoader(cached_dir, **options), 1)
        b = epoch_batches(LiveLoader(live_dir, workers=0, **options), 1)
        assert [torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b)] == [True] * len(a)
        assert a[0][0].dtype == torch.uint8 and a[0][0].shape == (16, 3, 32, 32)


def test_open_loader_picks_by_the_manifest(pair):
    cached_dir, live_dir = pair
    assert type(open_loader(cached_dir, batch_size=8, workers=3)) is CachedLoader
    live = open_loader(live_dir, batch_size=8, workers=0, device="cpu")
    assert type(live) is LiveLoader and live.workers == 0
    with pytest.raises(ReaderError, match="read it with CachedLoader"):
        LiveLoader(cached_dir, batch_size=8)


@pytest.mark.parametrize("augment_on", ["cpu", "device"])  # per sample, and batched (cacheaug.batched)
def test_live_resumes_mid_epoch(pair, augment_on):
    _, live_dir = pair
    loader = LiveLoader(live_dir, batch_size=32, seed=2, device="cpu", workers=0, augment_on=augment_on)
    full = epoch_batches(loader, 1)
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    it.close()
    again = LiveLoader(live_dir, batch_size=32, seed=2, device="cpu", workers=0, augment_on=augment_on)
    again.load_state_dict(state)
    again.set_epoch(1)
    rest = [(x.clone(), y.clone()) for x, y in again]
    assert len(rest) == len(full) - 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, full[4:]))


def test_breaking_early_leaves_no_worker_behind(pair):
    _, live_dir = pair
    loader = LiveLoader(live_dir, batch_size=32, device="cpu", workers=2)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    # the autouse fixture in tests/conftest.py fails the test if a worker process is left


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def workers_now() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def gone_soon() -> bool:
    deadline = time.monotonic() + 5
    while workers_now() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not workers_now()


def test_workers_are_kept_across_epochs_and_stop_when_the_loader_is_dropped(pair):
    _, live_dir = pair
    options = dict(batch_size=32, seed=3, device="cpu")
    expected = [epoch_batches(LiveLoader(live_dir, workers=0, **options), e) for e in (0, 1, 2)]
    gc.disable()  # reference counting alone must free the loader: no cycle may keep its workers alive
    try:
        loader = LiveLoader(live_dir, workers=2, **options)
        assert same(epoch_batches(loader, 0), expected[0])
        workers = workers_now()
        assert len(workers) == 2  # kept after the pass
        assert same(epoch_batches(loader, 1), expected[1])  # another cached epoch: another transform
        assert same(epoch_batches(loader, 2), expected[2])
        assert workers_now() == workers  # the same processes served every epoch
        del loader
        assert gone_soon()
    finally:
        gc.enable()


def test_a_pass_left_early_is_read_again_whole_by_the_same_workers(pair):
    _, live_dir = pair
    options = dict(batch_size=32, seed=4, device="cpu")
    expected = epoch_batches(LiveLoader(live_dir, workers=0, **options), 0)
    with LiveLoader(live_dir, workers=2, prefetch=3, **options) as loader:
        loader.set_epoch(0)
        it = iter(loader)
        next(it), next(it)
        it.close()  # batches the workers made ahead for that pass are left in flight
        workers = workers_now()
        again = [(x.clone(), y.clone()) for x, y in loader]  # left early: the same epoch again, from its start
        assert same(again, expected) and workers_now() == workers
    assert gone_soon()  # close() stopped them


def test_a_newer_pass_takes_the_workers_over_and_the_older_one_says_so(pair):
    _, live_dir = pair
    options = dict(batch_size=32, seed=5, device="cpu")
    expected = epoch_batches(LiveLoader(live_dir, workers=0, **options), 0)
    loader = LiveLoader(live_dir, workers=2, **options)
    older = iter(loader)
    next(older)
    loader.set_epoch(0)
    newer = iter(loader)
    first = next(newer)
    with pytest.raises(ReaderError, match="a newer pass over this LiveLoader .* one pass at a time"):
        list(older)
    rest = [(x.clone(), y.clone()) for x, y in newer]
    assert same([(first[0].clone(), first[1].clone())] + rest, expected)  # never a batch of the other pass
    loader.close()
    assert gone_soon()
    assert same(epoch_batches(loader, 0), expected)  # a pass after close() starts workers again
    loader.close()


def test_damaged_source_pass_is_named(pair, tmp_path):
    import shutil

    _, live_dir = pair
    copy = tmp_path / "live"
    shutil.copytree(live_dir, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["source_shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    LiveLoader(copy, batch_size=8)  # same size: only a checksum finds it
    with pytest.raises(ReaderError, match=f"{shard}.*sha256"):
        LiveLoader(copy, batch_size=8, verify=True)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ReaderError, match=f"{shard} is .* bytes.*truncated"):
        LiveLoader(copy, batch_size=8)
    shard.unlink()
    with pytest.raises(ReaderError, match=f"{shard} is missing"):
        LiveLoader(copy, batch_size=8)


def test_the_dataset_view_of_a_live_epoch_equals_the_cached_one(pair):
    from readers import CacheDataset

    cached_dir, live_dir = pair
    for epoch in (0, 1):
        cached, live = CacheDataset(cached_dir, epoch=epoch), CacheDataset(live_dir, epoch=epoch)
        assert len(cached) == len(live) == 300
        for i in (0, 1, 77, 299, -1):
            (a, ya), (b, yb) = cached[i], live[i]
            assert torch.equal(a, b) and ya == yb


def test_a_live_cache_built_under_other_versions_says_so_once(pair, tmp_path):
    import shutil

    live = shutil.copytree(pair[1], tmp_path / "live")
    raw = json.loads((live / "manifest.json").read_text())
    raw["versions"]["torchvision"] = "0.18.0"
    (live / "manifest.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match=r"built under other conditions \(torchvision 0.18.0 -> .*\): .* not "
                                         r"promised bit-identical") as caught:
        LiveLoader(live, batch_size=32, device="cpu", workers=0)
    assert len(caught) == 1


def test_close_stops_the_workers_of_a_pass_still_held(pair):
    _, live_dir = pair
    gc.disable()  # reference counting alone must stop them: nothing may keep the workers' iterator alive
    try:
        loader = LiveLoader(live_dir, batch_size=32, device="cpu", workers=2)
        held = iter(loader)
        next(held)
        assert len(workers_now()) == 2
        loader.close()
        assert gone_soon()
        with pytest.raises(ReaderError, match="a newer pass over this LiveLoader"):
            next(held)
    finally:
        gc.enable()


def test_a_failed_pass_stops_its_workers_while_its_error_is_held(pair, tmp_path):
    import shutil

    live_dir = shutil.copytree(pair[1], tmp_path / "live")
    gc.disable()  # the error's traceback (kept by pytest.raises) must not keep the workers alive
    try:
        loader = LiveLoader(live_dir, batch_size=32, device="cpu", workers=2)
        shard = loader.manifest.source_shards[2].path
        shard.write_bytes(shard.read_bytes()[:-100])
        with pytest.raises(ReaderError, match=f"{shard} is .* bytes") as caught:
            list(loader)
        assert gone_soon() and caught.value.__traceback__ is not None
        shard.write_bytes((pair[1] / shard.relative_to(live_dir)).read_bytes())
        assert sum(len(y) for _, y in loader) == 300  # a pass after a failed one starts workers again
        loader.close()
        assert gone_soon()
    finally:
        gc.enable()
