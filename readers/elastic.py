"""Elastic resume: the rest of an epoch, begun under one world size, planned for another.

Ranks advance in lockstep (each delivers batch k before any starts batch k + 1 of a collective
step), so one rank's position tells every rank's: `batches_done` under `world_size` W means rank
r of W has delivered the first batches_done x batch_size samples of its plan. What is left of the
epoch is every old rank's plan from there on, laid end to end in rank order (each keeps its own
window order, so batches still mix few shards). A new world size W' cuts that remainder as a fresh
epoch is cut: W' contiguous slices, DistributedSampler's semantics (without drop_last each rank
gets ceil(rest / W') samples, the last ranks repeating a few from the start of the remainder; with
drop_last floor(rest / W') and only full batches), so every rank gets the same number of batches.
A state taken during such an epoch carries its history, [(world size, batches done), ...], and
resumes again on any world size the same way. The next epoch is planned afresh for W'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from readers.plan import EpochPlan, Window, plan_epoch, rank_length

History = tuple[tuple[int, int], ...]  # (world size, batches each rank had delivered), oldest first


def resumed_length(total: int, history: History, *, batch_size: int, world_size: int,
                   drop_last: bool) -> tuple[int, int]:
    """(samples, batches) each rank of `world_size` gets of an epoch of `total` samples resumed
    after `history`."""
    if not history:
        return rank_length(total, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
    old_world, done = history[-1]
    old_samples, _ = resumed_length(total, history[:-1], batch_size=batch_size, world_size=old_world,
                                    drop_last=drop_last)
    rest = old_world * max(old_samples - done * batch_size, 0)
    return _share(rest, batch_size, world_size, drop_last)[1:]


def _share(rest: int, batch_size: int, world_size: int, drop_last: bool) -> tuple[int, int, int]:
    """(slice length, samples, batches) of each rank's share of a remainder of `rest` samples."""
    if rest == 0:
        return 0, 0, 0
    if drop_last:
        slice_len = rest // world_size
        batches = slice_len // batch_size
        return slice_len, batches * batch_size, batches
    slice_len = -(-rest // world_size)
    return slice_len, slice_len, -(-slice_len // batch_size)


def resumed_plan(shard_samples: Sequence[int], history: History, *, epoch: int, cache_epoch: int, seed: int,
                 batch_size: int, rank: int, world_size: int, drop_last: bool, shuffle: bool,
                 window: int) -> EpochPlan:
    """plan_epoch for `rank` of `world_size`, of what is left of the epoch after `history`."""
    options = dict(epoch=epoch, cache_epoch=cache_epoch, seed=seed, batch_size=batch_size, drop_last=drop_last,
                   shuffle=shuffle, window=window)
    if not history:
        return plan_epoch(shard_samples, rank=rank, world_size=world_size, **options)
    old_world, done = history[-1]
    rest: list[Window] = []
    for old_rank in range(old_world):
        old = resumed_plan(shard_samples, history[:-1], rank=old_rank, world_size=old_world, **options)
        rest += _cut(old.windows, done * batch_size, old.num_samples)
    slice_len, samples, batches = _share(sum(len(w) for w in rest), batch_size, world_size, drop_last)
    windows: list[Window] = []
    lo, hi = rank * slice_len, (rank + 1) * slice_len
    total = sum(len(w) for w in rest)
    while lo < hi:  # past the end of the remainder: from its start again (DistributedSampler's padding)
        a = lo % total
        b = min(a + hi - lo, total)
        windows += _cut(rest, a, b)
        lo += b - a
    return EpochPlan(epoch=epoch, cache_epoch=cache_epoch, windows=tuple(windows), batch_size=batch_size,
                     num_samples=samples, num_batches=batches)


def _cut(windows: Sequence[Window], lo: int, hi: int) -> list[Window]:
    """Delivery positions [lo, hi) of `windows` read one after another, as windows."""
    out, begin = [], 0
    for w in windows:
        a, b = max(lo, begin), min(hi, begin + len(w))
        if a < b:
            out.append(dataclasses.replace(w, skip=w.skip + a - begin, take=b - a))
        begin += len(w)
    return out
