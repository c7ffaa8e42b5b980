"""The per-epoch sample plan: determinism, rank split, padding, windows, errors (pure numpy)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from readers.errors import ReaderError
from readers.plan import EpochPlan, plan_epoch, rank_length

SIZES = [50, 50, 50, 50, 50, 37, 13]  # 300 samples, uneven shards


def _plan(sizes=SIZES, **kw) -> EpochPlan:
    return plan_epoch(sizes, **{"epoch": 0, "cache_epoch": 0, "seed": 0, "batch_size": 32, **kw})


def _keys(plan: EpochPlan) -> list[tuple[int, int]]:
    return [tuple(x) for x in plan.samples().tolist()]


_IN_ANOTHER_PROCESS = """
import json, sys
from readers.plan import plan_epoch
sizes, world = json.loads(sys.argv[1]), int(sys.argv[2])
print(json.dumps([plan_epoch(sizes, epoch=5, cache_epoch=0, seed=3, batch_size=32, rank=r,
                             world_size=world).samples().tolist() for r in range(world)]))
"""


@pytest.mark.parametrize("world_size", [1, 3])
def test_same_arguments_give_the_same_plan_in_another_process(world_size):
    """The plan is a function of its arguments alone: a fresh interpreter (another hash seed, no
    state of this one) plans the same samples in the same order, rank by rank."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = [_plan(seed=3, epoch=5, rank=r, world_size=world_size).samples().tolist() for r in range(world_size)]
    done = subprocess.run([sys.executable, "-c", _IN_ANOTHER_PROCESS, json.dumps(SIZES), str(world_size)],
                          capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(Path(__file__).parents[2])})
    assert json.loads(done.stdout) == here


def test_seed_and_epoch_change_the_order_but_not_the_samples():
    base = _keys(_plan())
    for other in (_plan(seed=1), _plan(epoch=1)):
        assert _keys(other) != base
        assert sorted(_keys(other)) == sorted(base)


def test_a_wrapped_epoch_gets_a_fresh_order_of_the_same_cached_epoch():
    # Training epochs 0 and 2 both read cached epoch 0 (of 2): same samples, new order.
    first, wrapped = _plan(epoch=0, cache_epoch=0), _plan(epoch=2, cache_epoch=0)
    assert _keys(wrapped) != _keys(first)
    assert sorted(_keys(wrapped)) == sorted(_keys(first))


def test_training_epoch_e_reads_cached_epoch_e_mod_n(npy_cache):
    """The loader maps training epoch e to cached epoch e mod N (N = 2 here), and reads its samples:
    each epoch's images and labels against the cached epoch's, parsed from its tar shards."""
    from loader_checks import epoch_contents

    from readers import CachedLoader

    loader = CachedLoader(npy_cache, batch_size=64, device="cpu", normalize=False, prefetch=0)
    cached = [epoch_contents(npy_cache, c) for c in range(2)]
    assert cached[0] != cached[1]  # mirrored: the two cached epochs differ
    for e in range(5):
        assert loader.plan(e).cache_epoch == e % 2
        loader.set_epoch(e)
        read = Counter((x.permute(1, 2, 0).contiguous().numpy().tobytes(), int(y)) for images, labels in loader
                       for x, y in zip(images, labels))
        assert read == cached[e % 2], e


def test_a_wrapped_epoch_reads_the_shards_in_a_fresh_order():
    def shard_order(epoch):
        return [s.shard for w in _plan(epoch=epoch, cache_epoch=0).windows for s in w.segments]

    assert shard_order(2) != shard_order(0) and sorted(shard_order(2)) == sorted(shard_order(0))


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ranks_read_one_shard_order_cut_into_slices(world_size):
    """One epoch's shard order, whatever the world size: the ranks' shards, rank after rank (a shard
    cut at a slice boundary counted once), are the one-rank plan's."""
    def shards(plan):
        return [s.shard for w in plan.windows for s in w.segments]

    together = []
    for r in range(world_size):
        for shard in shards(_plan(epoch=3, rank=r, world_size=world_size)):
            if not together or together[-1] != shard:
                together.append(shard)
    assert together == shards(_plan(epoch=3))


def test_one_rank_reads_every_sample_once():
    keys = _keys(_plan())
    assert sorted(keys) == [(s, i) for s, n in enumerate(SIZES) for i in range(n)]


def test_unshuffled_plan_reads_in_manifest_order():
    assert _keys(_plan(shuffle=False)) == [(s, i) for s, n in enumerate(SIZES) for i in range(n)]


def test_batches_mix_shards_within_a_window():
    plan = _plan(window=200)  # samples: four 50-sample shards
    first_batch = plan.samples()[:32]
    assert len(set(first_batch[:, 0].tolist())) >= 3
    assert all(len(w) <= 200 for w in plan.windows)
    for w in plan.windows:
        assert sorted(w.order.tolist()) == list(range(sum(s.stop - s.start for s in w.segments)))


def test_window_of_one_shard_keeps_each_shard_together():
    plan = _plan(window=1)
    assert [len(w.segments) for w in plan.windows] == [1] * len(SIZES)
    samples = plan.samples()
    for start in range(0, len(samples), 32):  # a batch holds the shards around it, not others
        batch = samples[start:start + 32]
        shards = {s.shard for w in plan.windows for s in w.segments}
        window_order = [w.segments[0].shard for w in plan.windows]
        touched = sorted(window_order.index(s) for s in set(batch[:, 0].tolist()))
        assert touched == list(range(touched[0], touched[-1] + 1)) and shards == set(range(len(SIZES)))


def test_each_batch_is_sorted_by_shard_and_sample():
    # One gather per shard a batch touches, in file order.
    samples = _plan(window=200).samples()
    for start in range(0, len(samples), 32):
        batch = [tuple(x) for x in samples[start:start + 32].tolist()]
        assert batch == sorted(batch)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_drop_last_ranks_are_disjoint_and_equal(world_size):
    plans = [_plan(rank=r, world_size=world_size, drop_last=True, batch_size=16) for r in range(world_size)]
    keys = [_keys(p) for p in plans]
    assert len({p.num_batches for p in plans}) == 1
    assert all(len(k) == p.num_batches * 16 for k, p in zip(keys, plans))
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat))  # disjoint
    assert len(set(flat)) > sum(SIZES) - world_size * 16  # only the remainders are left out


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_padded_ranks_cover_the_epoch_and_repeat_only_the_padding(world_size):
    total = sum(SIZES)
    plans = [_plan(rank=r, world_size=world_size, batch_size=16) for r in range(world_size)]
    per_rank = -(-total // world_size)
    assert {p.num_samples for p in plans} == {per_rank}
    assert {p.num_batches for p in plans} == {-(-per_rank // 16)}
    counts = Counter(k for p in plans for k in _keys(p))
    assert len(counts) == total  # every sample read
    assert sum(counts.values()) - total == per_rank * world_size - total  # the padding, and nothing else


def test_ranks_read_contiguous_shares_of_the_shard_order():
    # Each rank touches about 1/world_size of the shards, not all of them.
    plans = [_plan(rank=r, world_size=3, drop_last=True, window=400) for r in range(3)]
    for p in plans:
        assert len({s.shard for w in p.windows for s in w.segments}) <= 4


def test_drop_last_drops_the_partial_batch():
    plan = _plan(batch_size=64, drop_last=True)
    assert plan.num_batches == 300 // 64 and plan.num_samples == 256
    plan = _plan(batch_size=64)
    assert plan.num_batches == 5 and plan.num_samples == 300


def test_too_many_ranks_name_the_numbers():
    with pytest.raises(ReaderError, match=r"world_size 400 .* 300 samples"):
        _plan(world_size=400)
    with pytest.raises(ReaderError, match=r"world_size 16 .*batch_size 32.* 18 per rank"):
        _plan(world_size=16, drop_last=True)


def test_rank_length_matches_the_plan():
    for world_size, drop_last in ((1, False), (2, True), (5, False)):
        p = _plan(world_size=world_size, drop_last=drop_last, rank=world_size - 1)
        assert rank_length(300, batch_size=32, world_size=world_size, drop_last=drop_last) == (
            p.num_samples, p.num_batches)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda s: sum(s) > 0),
       world_size=st.integers(1, 5), batch_size=st.integers(1, 17), drop_last=st.booleans(),
       window=st.integers(1, 120), seed=st.integers(0, 2**32), epoch=st.integers(0, 50))
def test_plan_properties(sizes, world_size, batch_size, drop_last, window, seed, epoch):
    total = sum(sizes)
    try:
        samples, batches = rank_length(total, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
    except ReaderError:
        assert total < world_size or (drop_last and total // world_size < batch_size)
        return
    plans = [plan_epoch(sizes, epoch=epoch, cache_epoch=0, seed=seed, batch_size=batch_size, rank=r,
                        world_size=world_size, drop_last=drop_last, window=window) for r in range(world_size)]
    keys = [p.samples() for p in plans]
    for p, k in zip(plans, keys):
        assert (p.num_samples, p.num_batches) == (samples, batches)
        assert len(k) == samples
        assert all(0 <= i < sizes[s] for s, i in k.tolist())
    flat = Counter(tuple(x) for k in keys for x in k.tolist())
    if drop_last:
        assert max(flat.values()) == 1 and len(flat) == world_size * samples
    else:
        assert len(flat) == total and sum(flat.values()) == world_size * samples


def _spelled_out(plan: EpochPlan) -> list[tuple[int, int]]:
    """A plan's samples as the plan defines them, the slow way: each window's (shard, row) pairs
    laid end to end and permuted by numpy's generator of the window's seed tuple, cut to the
    rank's samples, each batch sorted."""
    pairs: list[tuple[int, int]] = []
    for w in plan.windows:
        laid = [(s.shard, r) for s in w.segments for r in range(s.start, s.stop)]
        full = np.arange(len(laid)) if w.seed is None else np.random.default_rng(w.seed).permutation(len(laid))
        pairs += [laid[i] for i in full[w.skip:w.skip + len(w)].tolist()]
    pairs = pairs[:plan.num_samples]
    b = plan.batch_size
    return [pair for k in range(0, len(pairs), b) for pair in sorted(pairs[k:k + b])]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda s: sum(s) > 0),
       batch_size=st.integers(1, 17), window=st.integers(1, 120), seed=st.integers(0, 2**70),
       epoch=st.integers(0, 2**33), shuffle=st.booleans())
def test_the_plan_is_its_windows_permuted_by_their_seeds(sizes, batch_size, window, seed, epoch, shuffle):
    # Pins the batches of a seed: the packed keys and the seed's uint32 words (seed_words) give
    # what numpy's generator of the seed tuple and the laid-out pairs give, also for ints of
    # more than 32 bits.
    plan = plan_epoch(sizes, epoch=epoch, cache_epoch=0, seed=seed, batch_size=batch_size, window=window,
                      shuffle=shuffle)
    assert [tuple(p) for p in plan.samples().tolist()] == _spelled_out(plan)
    for start in range(0, plan.num_samples, 3 * batch_size):  # a chunk at a time, as a pass asks
        assert (plan.samples(start, start + 3 * batch_size) == plan.samples()[start:start + 3 * batch_size]).all()


@pytest.mark.parametrize("seed", [(0, 0, 0), (1, 2**32 - 1, 2**32, 2**64 + 5), (3, -1), (True, 2)])
def test_seed_words_give_numpys_generator_of_the_tuple(seed):
    from readers.plan import seed_words

    try:
        expected = np.random.default_rng(seed).permutation(50)
    except ValueError:
        with pytest.raises(ValueError):
            np.random.default_rng(seed_words(seed))
        return
    assert (np.random.default_rng(seed_words(seed)).permutation(50) == expected).all()
