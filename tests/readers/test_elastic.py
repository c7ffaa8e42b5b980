"""Elastic resume with real process groups (gloo, CPU): a mid-epoch state taken at world size W
resumes at W' != W; over the epoch every sample is delivered (none twice beyond padding), every
new rank gets the same number of batches, and the next epoch is a fresh W' run's."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from loader_checks import ddp_epoch, digest, epoch_contents, spawn_ranks
from test_reader_ddp import _free_port

TIMEOUT_S = 120
BATCH = 16  # 300 samples: 10 batches a rank at W=2 (150 each), 7 at W=3 (100 each)
EPOCH = 1  # the epoch saved mid-way (a cached epoch that is mirrored: odd)


def _read(loader, batches: int | None) -> tuple[list[str], int]:
    """Digests of the samples of up to `batches` batches (None: the rest of the pass), and the
    batch count; one all_reduce per batch, so ranks with uneven batch counts hang, not pass."""
    seen, count = [], 0
    for images, labels in loader:
        dist.all_reduce(torch.tensor([len(images)]))
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        seen += [digest(img.tobytes(), int(y)) for img, y in zip(hwc, labels)]
        count += 1
        if count == batches:
            break
    return seen, count


def _worker(rank: int, world_size: int, phase: str, cache: str, port: int, out: str, drop_last: bool,
            stop_after: int) -> None:
    from readers import CachedLoader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        def make():
            return CachedLoader(cache, batch_size=BATCH, device="cpu", normalize=False, drop_last=drop_last, seed=3)

        loader, result = make(), {}
        if phase == "save":
            loader.set_epoch(EPOCH)
            result["samples"], result["batches"] = _read(loader, stop_after)
            if rank == 0:  # one rank's state is the whole job's: ranks advance in lockstep
                Path(out, "state.json").write_text(json.dumps(loader.state_dict()))
        else:
            loader.load_state_dict(json.loads(Path(out, "state.json").read_text()))
            loader.set_epoch(EPOCH)  # a loop that calls set_epoch each epoch keeps the loaded position
            result["len"] = len(loader)
            result["samples"], result["batches"] = _read(loader, None)
            result["next"] = ddp_epoch(loader, EPOCH + 1)
            result["fresh"] = ddp_epoch(make(), EPOCH + 1)
        dist.barrier()
        Path(out, f"{phase}{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run(world_size: int, phase: str, cache: Path, out: Path, drop_last: bool, stop_after: int) -> list[dict]:
    spawn_ranks(_worker, (world_size, phase, str(cache), _free_port(), str(out), drop_last, stop_after), world_size,
                TIMEOUT_S)
    return [json.loads((out / f"{phase}{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.parametrize(("old", "new", "drop_last", "stop_after"), [(2, 3, False, 4), (3, 2, True, 3)])
def test_a_state_resumes_on_another_world_size(npy_cache, tmp_path, old, new, drop_last, stop_after):
    saved = _run(old, "save", npy_cache, tmp_path, drop_last, stop_after)
    assert [r["batches"] for r in saved] == [stop_after] * old
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["world_size"], state["batches_done"], state["epoch"]) == (old, stop_after, EPOCH)
    resumed = _run(new, "resume", npy_cache, tmp_path, drop_last, stop_after)

    # Every new rank gets the same number of batches, as many as len() said.
    assert len({r["batches"] for r in resumed}) == 1 and all(r["batches"] == r["len"] for r in resumed)
    before = Counter(d for r in saved for d in r["samples"])
    after = Counter(d for r in resumed for d in r["samples"])
    everything = Counter(digest(img, label) for (img, label), n in epoch_contents(npy_cache, EPOCH % 2).items()
                         for _ in range(n))
    delivered = before + after
    assert set(delivered) <= set(everything)
    if drop_last:  # nothing twice; what is left out is less than a batch per new rank, plus the first run's tail
        assert all(n == 1 for n in delivered.values())
        assert sum(everything.values()) - sum(delivered.values()) < new * BATCH + old
    else:  # every sample, and repeats only as padding: at most one per new rank (300 splits evenly at 2 and 3)
        assert set(delivered) == set(everything)
        assert sum(delivered.values()) - sum(everything.values()) <= new - 1
    # The next epoch is a fresh run's at the new world size, rank by rank.
    for r in resumed:
        assert r["next"] == r["fresh"] and r["next"]["batches"] == r["next"]["len"]


def _delivered(plans, batches: int | None = None) -> Counter:
    out = Counter()
    for plan in plans:
        samples = plan.samples()
        out.update(map(tuple, (samples if batches is None else samples[:batches * plan.batch_size]).tolist()))
    return out


@pytest.mark.parametrize("drop_last", [False, True])
def test_resumed_plans_cover_the_epoch_through_several_world_sizes(drop_last):
    # 2 ranks read 3 batches, then 3 ranks read 2 of the rest, then 5 ranks read what is left.
    from readers.elastic import resumed_length, resumed_plan
    from readers.plan import plan_epoch

    sizes = [37, 50, 41, 50, 13, 50, 49]  # 290 samples, shards of uneven sizes
    options = dict(epoch=4, cache_epoch=0, seed=9, batch_size=8, drop_last=drop_last, shuffle=True, window=60)
    first = [plan_epoch(sizes, rank=r, world_size=2, **options) for r in range(2)]
    second = [resumed_plan(sizes, ((2, 3),), rank=r, world_size=3, **options) for r in range(3)]
    third = [resumed_plan(sizes, ((2, 3), (3, 2)), rank=r, world_size=5, **options) for r in range(5)]
    for plans, history in ((second, ((2, 3),)), (third, ((2, 3), (3, 2)))):
        assert len({p.num_batches for p in plans}) == 1
        assert all((len(p.samples()), p.num_batches) == resumed_length(290, history, batch_size=8,
                                                                        world_size=len(plans), drop_last=drop_last)
                   for p in plans)
    delivered = _delivered(first, 3) + _delivered(second, 2) + _delivered(third)
    epoch = Counter((k, j) for k, n in enumerate(sizes) for j in range(n))
    if drop_last:
        assert all(n == 1 for n in delivered.values()) and set(delivered) <= set(epoch)
    else:  # fresh padding (290 splits evenly at 2), then at most world size - 1 per resume
        assert set(delivered) == set(epoch) and sum(delivered.values()) - 290 <= 2 + 4


def _loaded(npy_cache, resumed_from):
    from readers import CachedLoader

    loader = CachedLoader(npy_cache, batch_size=BATCH, device="cpu", prefetch=0, normalize=False)
    state = {**loader.state_dict(), "epoch": EPOCH, "batches_done": 0, "resumed_from": resumed_from}
    loader.load_state_dict(state)
    return loader


@pytest.mark.parametrize("resumed_from,says", [
    ([[2, 1]] * 3000, "3000 resumes within one epoch, more than 64"),  # was a RecursionError
    ([[10_000, 0], [10_000, 0]], "20000 ranks over its resumes, more than 16384"),  # was hours of planning
])
def test_a_crafted_history_is_refused_in_one_line_before_any_planning(npy_cache, resumed_from, says):
    with pytest.raises(ValueError, match=f"state resumed_from has {says}") as e:
        _loaded(npy_cache, resumed_from)
    assert "\n" not in str(e.value)


def test_a_history_of_three_resumes_at_64_ranks_plans_each_old_rank_once(npy_cache):
    """3 steps at world size 64 (64**3 old-rank plans, planned the recursive way: 26 s): each step's
    old ranks planned once. Resumed at world size 1 with nothing delivered, it reads the whole epoch
    (64-rank padding repeats a few samples)."""
    loader = _loaded(npy_cache, [[64, 0]] * 3)
    got = Counter()
    for images, labels in loader:
        got.update(digest(x.permute(1, 2, 0).contiguous().numpy().tobytes(), int(y)) for x, y in zip(images, labels))
    expected = {digest(image, label) for image, label in epoch_contents(npy_cache, EPOCH)}
    assert set(got) == expected
    assert sum(got.values()) == 320  # 300 samples padded to 64 x 5, then split evenly at every later step
