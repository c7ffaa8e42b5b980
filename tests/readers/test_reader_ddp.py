"""Two real processes (torch.distributed, gloo, CPU): equal batch counts, disjoint ranks, full cover."""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from loader_checks import ddp_epoch, digest, epoch_contents, spawn_ranks

WORLD_SIZE = 2
TIMEOUT_S = 90  # a hang (one rank waiting in a collective) fails the test instead of blocking CI
EPOCHS = (0, 1, 2)


def _worker(rank: int, cache: str, port: int, out: str, batch_size: int, drop_last: bool, built_before: bool) -> None:
    from readers import CachedLoader

    def make():  # rank and world size from torch.distributed, resolved when a pass starts
        return CachedLoader(cache, batch_size=batch_size, device="cpu", normalize=False, drop_last=drop_last,
                            prefetch=2)

    # Built before init_process_group (as a LightningModule's __init__ or a torchrun script may):
    # it must still read only this rank's share.
    loader = make() if built_before else None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        loader = loader or make()
        result = {"rank": loader.rank, "world_size": loader.world_size, "epochs": {}}
        for epoch in EPOCHS:
            result["epochs"][epoch] = ddp_epoch(loader, epoch)
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cache: Path, out: Path, batch_size: int, drop_last: bool, built_before: bool = False) -> list[dict]:
    spawn_ranks(_worker, (str(cache), _free_port(), str(out), batch_size, drop_last, built_before), WORLD_SIZE,
                TIMEOUT_S)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize(("drop_last", "built_before"), [(True, True), (False, False)])
def test_two_ranks_split_every_epoch(npy_cache, tmp_path, drop_last, built_before):
    batch_size = 32  # 300 samples: 150 per rank; drop_last keeps 4 batches each, else 5 (the last of 22)
    results = _run(npy_cache, tmp_path, batch_size, drop_last, built_before)
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    for epoch in EPOCHS:
        per_rank = [r["epochs"][str(epoch)] for r in results]
        assert [p["batches"] for p in per_rank] == [p["len"] for p in per_rank] == [4 if drop_last else 5] * 2
        ranks = [Counter(p["samples"]) for p in per_rank]
        assert not set(ranks[0]) & set(ranks[1])  # disjoint
        cached = epoch_contents(npy_cache, epoch % 2)
        everything = Counter({digest(img, label): n for (img, label), n in cached.items()})
        union = ranks[0] + ranks[1]
        assert all(n == 1 for n in union.values()) and set(union) <= set(everything)
        if drop_last:
            assert sum(union.values()) == 2 * 4 * batch_size
        else:
            assert union == everything  # 300 = 2 x 150: covered exactly, no padding needed
    # Each epoch orders samples afresh, also when training wraps around the 2 cached epochs.
    first = [r["epochs"]["0"]["samples"] for r in results]
    wrapped = [r["epochs"]["2"]["samples"] for r in results]
    assert first != wrapped
