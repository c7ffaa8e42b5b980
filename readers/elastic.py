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

import bisect
import dataclasses
import itertools
from collections.abc import Sequence

from readers.plan import EpochPlan, Window, plan_epoch, rank_length

History = tuple[tuple[int, int], ...]  # (world size, batches each rank had delivered), oldest first
# What a state's history may ask of the planner (it is read from a file): resumes within one epoch,
# and old ranks planned in all (resumed_plan plans each old rank of each step once).
MAX_RESUMES = 64
MAX_RESUMED_RANKS = 1 << 14


def history_problem(history: History) -> str | None:
    """Why planning after `history` would cost more than a state may ask (MAX_RESUMES steps,
    MAX_RESUMED_RANKS old ranks in all), or None."""
    if len(history) > MAX_RESUMES:
        return f"{len(history)} resumes within one epoch, more than {MAX_RESUMES}"
    ranks = sum(w for w, _ in history)
    if ranks > MAX_RESUMED_RANKS:
        return f"{ranks} ranks over its resumes, more than {MAX_RESUMED_RANKS}"
    return None


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
    """plan_epoch for `rank` of `world_size`, of what is left of the epoch after `history`.

    The remainder is laid out one step of the history at a time (every old rank's share of the
    last remainder, cut at the batches it delivered), so planning costs the sum of the history's
    world sizes, not their product."""
    options = dict(epoch=epoch, cache_epoch=cache_epoch, seed=seed, batch_size=batch_size, drop_last=drop_last,
                   shuffle=shuffle, window=window)
    if not history:
        return plan_epoch(shard_samples, rank=rank, world_size=world_size, **options)
    (old_world, done), rest = history[0], []
    for old_rank in range(old_world):
        old = plan_epoch(shard_samples, rank=old_rank, world_size=old_world, **options)
        rest += _cut(old.windows, done * batch_size, old.num_samples)
    for old_world, done in history[1:]:
        ends, later = _ends(rest), []
        for old_rank in range(old_world):
            windows, samples, _ = _share_of(rest, ends, old_rank, old_world, batch_size, drop_last)
            later += _cut(windows, done * batch_size, samples)
        rest = later
    windows, samples, batches = _share_of(rest, _ends(rest), rank, world_size, batch_size, drop_last)
    return EpochPlan(epoch=epoch, cache_epoch=cache_epoch, windows=tuple(windows), batch_size=batch_size,
                     num_samples=samples, num_batches=batches)


def _ends(windows: Sequence[Window]) -> list[int]:
    return list(itertools.accumulate(len(w) for w in windows))


def _share_of(rest: Sequence[Window], ends: list[int], rank: int, world_size: int, batch_size: int,
              drop_last: bool) -> tuple[list[Window], int, int]:
    """(windows, samples, batches) of `rank`'s share of the remainder `rest` (`ends`: its windows'
    cumulative lengths); past its end, from its start again (DistributedSampler's padding)."""
    total = ends[-1] if ends else 0
    slice_len, samples, batches = _share(total, batch_size, world_size, drop_last)
    windows: list[Window] = []
    lo, hi = rank * slice_len, (rank + 1) * slice_len
    while lo < hi:
        a = lo % total
        b = min(a + hi - lo, total)
        windows += _cut(rest, a, b, ends)
        lo += b - a
    return windows, samples, batches


def _cut(windows: Sequence[Window], lo: int, hi: int, ends: list[int] | None = None) -> list[Window]:
    """Delivery positions [lo, hi) of `windows` read one after another, as windows (`ends`: their
    cumulative lengths, to start at the first window the range touches rather than scan to it)."""
    first = bisect.bisect_right(ends, lo) if ends is not None else 0
    out, begin = [], ends[first - 1] if ends is not None and first else 0
    for k in range(first, len(windows)):
        w = windows[k]
        if begin >= hi:
            break
        a, b = max(lo, begin), min(hi, begin + len(w))
        if a < b:
            out.append(dataclasses.replace(w, skip=w.skip + a - begin, take=b - a))
        begin += len(w)
    return out
