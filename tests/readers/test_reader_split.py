"""resolve_rank and LoaderOptions: explicit values, defaults outside torch.distributed, bad values quoted."""

from __future__ import annotations

import pytest
import torch

from readers import LoaderOptions
from readers.split import available_cores, default_workers, local_world_size, resolve_rank


def test_defaults_outside_torch_distributed():
    assert resolve_rank() == (0, 1)
    assert resolve_rank(2, 4) == (2, 4)


@pytest.mark.parametrize(("rank", "world_size", "message"), [
    (4, 4, "rank 4 / world_size 4"),
    (-1, 2, "rank -1 / world_size 2"),
    (0, 0, "rank 0 / world_size 0"),
    (None, 2, "world_size=2 was given without rank"),
    (1, None, "rank=1 was given without world_size"),
    (1.0, 2, "rank must be an int, got 1.0"),
])
def test_bad_splits_are_quoted(rank, world_size, message):
    with pytest.raises(ValueError, match=message):
        resolve_rank(rank, world_size)


def test_options_resolve_and_check():
    o = LoaderOptions(batch_size=8, device="cpu")  # rank and world size: resolved when a pass starts
    assert (o.rank, o.world_size, o.device) == (None, None, torch.device("cpu"))
    for bad, message in (({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
                         ({"seed": -1}, "seed must be an int >= 0, got -1"),
                         ({"prefetch": -1}, "prefetch must be an int >= 0, got -1"),
                         ({"shuffle": "yes"}, "shuffle must be True or False, got 'yes'"),
                         ({"dtype": torch.float64}, "dtype torch.float64"),
                         ({"rank": 2, "world_size": 2}, "rank 2 / world_size 2"),
                         ({"rank": "0"}, "rank must be an int, got '0'"),
                         ({"mean": "0.5"}, "mean must be one finite number per channel, got '0.5'"),
                         ({"mean": [0.5, float("nan")]}, r"mean must be one finite number per channel, got \[0.5, nan\]"),
                         ({"std": [0.2, 0.0, 0.3]}, r"std must be > 0 for every channel, got \[0.2, 0.0, 0.3\]"),
                         ({"std": []}, r"std must be one finite number per channel, got \[\]"),
                         ({"mean": [0.5], "std": [0.2, 0.2]}, "must have one value per channel each")):
        with pytest.raises(ValueError, match=message):
            LoaderOptions(**{"batch_size": 8, "device": "cpu", **bad})


@pytest.mark.parametrize(("cores", "env", "share", "expected"), [
    (96, {}, 1.0, 96),
    (96, {"LOCAL_WORLD_SIZE": "8"}, 1.0, 12),  # 8 ranks on one machine: 12 cores each
    (96, {"LOCAL_WORLD_SIZE": "8"}, 0.75, 9),
    (4, {"LOCAL_WORLD_SIZE": "8"}, 0.75, 1),  # never 0
    (16, {"LOCAL_WORLD_SIZE": "junk"}, 1.0, 16),  # not a launcher's value: ignored
    (16, {"LOCAL_WORLD_SIZE": "0"}, 1.0, 16),
])
def test_default_workers_split_the_cores_between_local_ranks(cores, env, share, expected):
    assert default_workers(share, cores=cores, env=env) == expected


def test_the_loader_and_the_build_defaults_follow_local_world_size(monkeypatch):
    from cachegen.config import BuildConfig
    from cachegen.config import default_workers as build_workers
    from readers.live import default_workers as live_workers

    cores = available_cores()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert build_workers() == BuildConfig(workers=0).workers == cores
    assert live_workers() == max(1, int(0.75 * cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more ranks than cores: one worker each
    assert build_workers() == BuildConfig(workers=0).workers == live_workers() == 1
    assert local_world_size() == 2 * cores
