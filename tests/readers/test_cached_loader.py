"""CachedLoader on real caches: contents, epoch mapping, determinism, resume, threads, memory."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from loader_checks import SAMPLES, SHAPE, collect, epoch_contents, pairs
from readers import CachedLoader
from readers.manifest import load_index

H, W, C = SHAPE


def _loader(cache, **kw) -> CachedLoader:
    return CachedLoader(cache, **{"batch_size": 32, "device": "cpu", "normalize": False, **kw})


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_an_epoch_is_exactly_the_cached_epoch(npy_cache, prefetch, channels_last):
    loader = _loader(npy_cache, prefetch=prefetch, channels_last=channels_last)
    for epoch in range(2):
        loader.set_epoch(epoch)
        images, labels = collect(loader)
        assert [len(b) for b in images] == [32] * 9 + [12] and len(loader) == 10
        assert all(b.shape[1:] == SHAPE for b in images)
        assert pairs(images, labels) == epoch_contents(npy_cache, epoch)


def test_training_epochs_wrap_around_the_cache_in_a_fresh_order(npy_cache):
    loader = _loader(npy_cache)
    runs = {}
    for epoch in (0, 1, 2, 3):
        loader.set_epoch(epoch)
        images, labels = collect(loader)
        runs[epoch] = np.concatenate(images)
        assert pairs(images, labels) == epoch_contents(npy_cache, epoch % 2)
    assert not np.array_equal(runs[0], runs[2]) and not np.array_equal(runs[1], runs[3])
    assert pairs([runs[0]], [np.zeros(SAMPLES)]) == pairs([runs[2]], [np.zeros(SAMPLES)])


def test_the_same_seed_gives_the_same_batches(npy_cache):
    def run(seed, prefetch):
        loader = _loader(npy_cache, seed=seed, prefetch=prefetch)
        loader.set_epoch(1)
        return collect(loader)

    a, b, c = run(7, 0), run(7, 2), run(8, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not np.array_equal(np.concatenate(a[0]), np.concatenate(c[0]))


def test_a_batch_mixes_shards(npy_cache):
    loader = _loader(npy_cache, shuffle_window=200)  # four 50-sample shards
    plan = loader.plan()
    first = plan.samples()[:32, 0]
    assert len(set(first.tolist())) >= 3


def test_unshuffled_reads_in_manifest_order(npy_cache):
    loader = _loader(npy_cache, shuffle=False)
    images, labels = collect(loader)
    assert np.array_equal(np.concatenate(labels), np.concatenate([load_index(loader.manifest, s).labels for s in loader.manifest.epochs[0]]))


def test_normalised_batches_match_the_uint8_ones(npy_cache):
    raw = collect(_loader(npy_cache, seed=3))[0]
    loader = _loader(npy_cache, seed=3, normalize=True)
    mean = torch.tensor(loader.manifest.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.manifest.std).view(1, 3, 1, 1)
    batches = list(loader)
    assert all(x.dtype == torch.float32 and x.shape[1:] == (C, H, W) and y.dtype == torch.int64 for x, y in batches)
    for (x, _), u8 in zip(batches, raw):
        want = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - mean) / std
        torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_channels_last(npy_cache):
    x, y = next(iter(_loader(npy_cache, normalize=True, dtype=torch.bfloat16, channels_last=True)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_default_device_falls_back_to_the_cpu(npy_cache):
    loader = CachedLoader(npy_cache, batch_size=64)
    assert loader.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    x, y = next(iter(loader))
    assert x.device.type == loader.device.type and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize(("batch_size", "drop_last", "batches", "last"), [
    (32, False, 10, 12), (32, True, 9, 32), (100, False, 3, 100), (300, True, 1, 300), (7, False, 43, 6)])
def test_len_is_exact(npy_cache, batch_size, drop_last, batches, last):
    loader = _loader(npy_cache, batch_size=batch_size, drop_last=drop_last)
    sizes = [len(x) for x, _ in loader]
    assert len(loader) == len(sizes) == batches and sizes[-1] == last


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_resume_mid_epoch_gives_the_rest_of_the_epoch(npy_cache, stop_after, prefetch):
    full = _loader(npy_cache, seed=5, prefetch=prefetch)
    full.set_epoch(3)
    expected = collect(full)

    first = _loader(npy_cache, seed=5, prefetch=prefetch)
    first.set_epoch(3)
    for i, _ in enumerate(first):
        if i + 1 == stop_after:
            state = first.state_dict()
            break
    assert state["epoch"] == 3 and state["batches_done"] == stop_after

    resumed = _loader(npy_cache, seed=5, prefetch=prefetch)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    resumed.set_epoch(3)  # a training loop sets the epoch again: the position is kept
    rest = collect(resumed)
    assert len(rest[0]) == len(expected[0]) - stop_after
    for got, want in zip(rest[0] + rest[1], expected[0][stop_after:] + expected[1][stop_after:]):
        assert np.array_equal(got, want)
    # The next pass, and the next epoch, start from the beginning again.
    assert len(collect(resumed)[0]) == 10
    resumed.set_epoch(4)
    assert resumed.state_dict()["batches_done"] == 0


def test_a_finished_epoch_resumes_into_the_next_epoch(npy_cache):
    # As the saving loader itself would: its next pass reads epoch 1.
    loader = _loader(npy_cache)
    collect(loader)
    state = loader.state_dict()
    assert state["batches_done"] == 10
    expected = collect(loader)
    other = _loader(npy_cache)
    other.load_state_dict(state)
    got = collect(other)
    assert other.epoch == 1 and len(got[0]) == 10
    assert all(np.array_equal(x, y) for x, y in zip(got[0] + got[1], expected[0] + expected[1]))


def test_resume_refuses_a_different_order(npy_cache):
    state = _loader(npy_cache, seed=1).state_dict()
    with pytest.raises(ValueError, match="the state has seed=1, this loader 2"):
        _loader(npy_cache, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="the state has batch_size=32, this loader 16"):
        _loader(npy_cache, seed=1, batch_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_done 99 is not within epoch 0's 10 batches"):
        _loader(npy_cache, seed=1).load_state_dict({**state, "batches_done": 99})


@pytest.mark.parametrize("how", ["break", "del", "exhaust"])
def test_no_reader_thread_outlives_its_loop(npy_cache, how):
    before = threading.active_count()
    loader = _loader(npy_cache, prefetch=2)
    it = iter(loader)
    next(it)
    assert threading.active_count() == before + 1  # the reader thread runs while iterating
    if how == "break":
        it.close()
    elif how == "del":
        del it
    else:
        for _ in it:
            pass
    assert threading.active_count() == before


def test_memory_stays_flat_across_epochs(npy_cache):
    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    loader = _loader(npy_cache, batch_size=16, prefetch=2)
    for epoch in range(3):  # warm up: buffers, allocator caches
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    start = rss_kb()
    for epoch in range(3, 43):  # 40 epochs of 300 x 720 bytes: 8.6 MB of pixels in all
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    assert rss_kb() - start < 2 * 1024, "memory grew with the epochs read"


def test_readers_never_import_cachegen():
    code = ("import sys, readers, readers.cached, readers.shards, readers.plan, readers.device, readers.split; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'cachegen']; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

