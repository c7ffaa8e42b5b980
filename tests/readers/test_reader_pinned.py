"""Batches pinned to the values the reader gave before its per-batch cost was cut: the same
(seed, epoch, rank layout, window, resume point) must keep giving exactly the same batches.

The digests were computed with the previous code path (plans expanded window by window, one
np.unique and one sort per chunk of 16 batches, a per-batch label copy); a faster path that changes
any sample, its order within a batch, a label or a pixel fails here. Plans are pinned on synthetic
shard sizes (a pure function: large enough to span many chunks and windows); loaders on the test
npy cache, whose bytes follow from its seeded source and build (batch sizes small enough that an
epoch spans several chunks).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from readers import CachedLoader
from readers.elastic import resumed_plan
from readers.plan import plan_epoch


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# (shard sizes, plan options, (start, stop) samples asked for, digest of plan.samples(start, stop))
_BIG = [1000] * 99 + [731]  # 99,731 samples: many windows and chunks
_PLANS = [
    (_BIG, dict(epoch=3, seed=0, batch_size=256), (0, None), "e55ae7651feeb741"),
    (_BIG, dict(epoch=3, seed=0, batch_size=256), (256 * 16, 256 * 57), "53fad1a8d27cfce8"),
    (_BIG, dict(epoch=1, seed=9, batch_size=256, rank=1, world_size=3), (0, None), "3c6d19d08c7bdaa7"),
    (_BIG, dict(epoch=2, seed=9, batch_size=100, rank=2, world_size=3, drop_last=True, window=700), (0, None),
     "4aae0024e8a47be1"),
    (_BIG, dict(epoch=0, seed=1, batch_size=256, window=100_000), (512, 256 * 70), "abeb6fb02a5ff931"),
    (_BIG, dict(epoch=0, seed=1, batch_size=64, shuffle=False), (0, None), "72989ee24aea01ef"),
    ([50, 50, 50, 50, 50, 37, 13], dict(epoch=5, seed=3, batch_size=32, window=1), (0, None), "b5374b54c4f4e8ae"),
]


@pytest.mark.parametrize(("sizes", "options", "span", "expected"), _PLANS)
def test_plans_are_pinned(sizes, options, span, expected):
    plan = plan_epoch(sizes, cache_epoch=0, **options)
    assert _digest(plan.samples(*span)) == expected


def test_a_resumed_plan_is_pinned():
    # A state taken at world size 3 after 40 batches, resumed at world size 2: rank 1's rest.
    plan = resumed_plan(_BIG, ((3, 40),), epoch=4, cache_epoch=0, seed=2, batch_size=128, rank=1,
                        world_size=2, drop_last=False, shuffle=True, window=2048)
    assert _digest(plan.samples()) == "92a3f79d77bfa151"


def _epoch(loader: CachedLoader, epoch: int | None = None) -> str:
    if epoch is not None:
        loader.set_epoch(epoch)
    batches = [(x.contiguous().numpy(), y.numpy()) for x, y in loader]
    return _digest(*(a for batch in batches for a in batch))


# (loader options, epoch, digest of every batch of it: images in NCHW order, then labels)
_LOADERS = [
    (dict(batch_size=32, seed=7, channels_last=True), 0, "14791dafffa93cbd"),
    (dict(batch_size=32, seed=7, channels_last=True), 1, "208ce6ca3a47d93d"),
    (dict(batch_size=32, seed=7, channels_last=True), 2, "f3461e67f46fdb1d"),  # wraps to cached epoch 0 in a new order
    (dict(batch_size=4, seed=7, channels_last=True, shuffle_window=64), 1, "4f77b4a31d6fafca"),  # 75 batches: several chunks
    (dict(batch_size=3, seed=1, rank=1, world_size=2), 0, "1939fa2931cdbc8a"),  # NCHW
    (dict(batch_size=5, seed=2, rank=2, world_size=3, drop_last=True, shuffle_window=1), 3, "fb9838f0bc6007c8"),
    (dict(batch_size=4, seed=0, shuffle=False, channels_last=True), 0, "ea31c1517e680729"),
]


@pytest.mark.parametrize(("options", "epoch", "expected"), _LOADERS)
def test_loader_batches_are_pinned(npy_cache, options, epoch, expected):
    loader = CachedLoader(npy_cache, device="cpu", normalize=False, **options)
    assert _epoch(loader, epoch) == expected


def test_resumed_and_skipped_batches_are_pinned(npy_cache):
    saver = CachedLoader(npy_cache, batch_size=4, device="cpu", normalize=False, seed=3, rank=0, world_size=3)
    saver.set_epoch(1)
    for k, _ in enumerate(saver):
        if k == 6:
            break
    state = saver.state_dict()
    resumed = CachedLoader(npy_cache, batch_size=4, device="cpu", normalize=False, seed=3, rank=1, world_size=2,
                           channels_last=True)
    resumed.load_state_dict(state)
    skipped = CachedLoader(npy_cache, batch_size=4, device="cpu", normalize=False, seed=3)
    skipped.set_epoch(2)
    got = (_epoch(resumed), _epoch(skipped.skip_first_batches(30)))
    assert got == ("21bdada454b8b314", "c3a37e760076ac14")
