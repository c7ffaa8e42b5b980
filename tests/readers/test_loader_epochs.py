"""Epochs that advance like a DataLoader's, set_epoch through `loader.sampler`, skip_first_batches,
resume across advanced epochs, the split resolved when a pass starts, and mean/std overrides."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from loader_checks import collect, epoch_contents, pairs
from readers import CachedLoader, LiveLoader, ReaderError, open_loader


def _loader(cache, **kw) -> CachedLoader:
    return CachedLoader(cache, **{"batch_size": 32, "device": "cpu", "normalize": False, "seed": 3, **kw})


def _same(a, b) -> bool:
    return len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def _epoch(cache, epoch, **kw):
    loader = _loader(cache, **kw)
    loader.set_epoch(epoch)
    return collect(loader)


def test_passes_advance_through_the_epochs_without_set_epoch(npy_cache):
    loader = _loader(npy_cache)
    passes = [collect(loader) for _ in range(3)]
    assert [_same(p, _epoch(npy_cache, e)) for e, p in enumerate(passes)] == [True] * 3
    assert loader.epoch == 2
    # Each pass covers its cached epoch (2 cached: pass 2 wraps to 0) and starts with a different batch.
    assert [pairs(*p) == epoch_contents(npy_cache, e % 2) for e, p in enumerate(passes)] == [True] * 3
    firsts = [p[0][0].tobytes() for p in passes]
    assert len(set(firsts)) == 3


def test_a_pass_left_early_is_read_again_from_its_start(npy_cache):
    loader = _loader(npy_cache)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert loader.epoch == 0 and _same(collect(loader), _epoch(npy_cache, 0))
    assert _same(collect(loader), _epoch(npy_cache, 1))  # that pass completed: the next epoch


def test_set_epoch_since_the_last_pass_wins(npy_cache):
    loader = _loader(npy_cache)
    collect(loader)
    loader.set_epoch(0)  # the same epoch again, from its start
    assert _same(collect(loader), _epoch(npy_cache, 0))
    loader.set_epoch(5)
    loader.set_epoch(5)  # twice: still epoch 5 from its start
    assert _same(collect(loader), _epoch(npy_cache, 5)) and loader.epoch == 5
    assert _same(collect(loader), _epoch(npy_cache, 6))


def test_frameworks_reach_set_epoch_through_the_sampler(npy_cache):
    # Lightning calls set_epoch on a dataloader's `sampler` (lightning.fabric.utilities.data._set_sampler_epoch).
    from lightning.fabric.utilities.data import _set_sampler_epoch

    loader = _loader(npy_cache)
    _set_sampler_epoch(loader, 4)
    assert loader.epoch == 4 and _same(collect(loader), _epoch(npy_cache, 4))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_skip_first_batches_starts_the_next_pass_later(npy_cache, prefetch):
    loader = _loader(npy_cache, prefetch=prefetch)
    full = _epoch(npy_cache, 0)
    skipped = collect(loader.skip_first_batches(3))
    assert _same(skipped, (full[0][3:], full[1][3:]))
    assert _same(collect(loader), _epoch(npy_cache, 1))  # then whole epochs again
    loader.skip_first_batches(10)  # the whole of epoch 2: an empty pass
    assert collect(loader)[0] == [] and loader.epoch == 2
    assert _same(collect(loader), _epoch(npy_cache, 3))
    with pytest.raises(ValueError, match="cannot skip 11 batches: epoch 4 has 10 on this rank"):
        loader.skip_first_batches(11)
    with pytest.raises(ValueError, match="num_batches must be an int >= 0, got -1"):
        loader.skip_first_batches(-1)


@pytest.mark.parametrize("stop_after", [1, 7])
def test_resume_is_exact_in_an_epoch_reached_without_set_epoch(npy_cache, stop_after):
    first = _loader(npy_cache)
    collect(first)
    collect(first)
    for i, _ in enumerate(first):  # the third pass: epoch 2
        if i + 1 == stop_after:
            state = first.state_dict()
            break
    assert (state["epoch"], state["batches_done"]) == (2, stop_after)
    resumed = _loader(npy_cache)
    resumed.load_state_dict(state)
    full = _epoch(npy_cache, 2)
    assert _same(collect(resumed), (full[0][stop_after:], full[1][stop_after:]))
    assert _same(collect(resumed), _epoch(npy_cache, 3))


def test_len_and_passes_use_the_split_resolved_when_they_start(npy_cache, monkeypatch):
    loader = _loader(npy_cache)
    assert len(loader) == 10 and (loader.rank, loader.world_size) == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's environment, but no process group
    for what in (lambda: len(loader), lambda: iter(loader), lambda: loader.state_dict()):
        with pytest.raises(ReaderError, match=r"^WORLD_SIZE=2 in the environment but torch.distributed has no "
                                              r"process group .*init_process_group.*rank= and world_size=$"):
            what()
    explicit = _loader(npy_cache, rank=1, world_size=2)  # explicit values win: 150 samples, 5 batches
    assert len(explicit) == 5 and len(collect(explicit)[0]) == 5
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert len(loader) == 10


def _normalised(cache, **kw):
    loader = CachedLoader(cache, batch_size=300, device="cpu", shuffle=False, **kw)
    images, _ = next(iter(loader))
    return loader, images


def test_mean_and_std_override_the_manifests(npy_cache):
    raw = _normalised(npy_cache, normalize=False)[1].float() / 255
    own, images = _normalised(npy_cache)
    mean, std = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)
    given, overridden = _normalised(npy_cache, mean=mean, std=std)
    expected = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(overridden, expected, atol=1e-5)
    assert (given.mean, given.std) == (mean, std) and own.mean == own.manifest.mean
    assert not torch.allclose(images, overridden)
    # One given, the other from the manifest.
    half, only_mean = _normalised(npy_cache, mean=np.array(mean))
    assert half.std == half.manifest.std and torch.allclose(
        only_mean, (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(half.std).view(1, 3, 1, 1), atol=1e-5)


@pytest.mark.parametrize(("kw", "message"), [
    ({"mean": [0.5, 0.5]}, r"mean \[0.5, 0.5\] has 2 value\(s\); .* has 3 channel\(s\): give one per channel"),
    ({"std": [0.1, -0.1, 0.1]}, r"std must be > 0 for every channel, got \[0.1, -0.1, 0.1\]"),
    ({"std": [0.1, 0.1, 0.0]}, r"std must be > 0 for every channel, got \[0.1, 0.1, 0.0\]"),
    ({"mean": ["a", "b", "c"]}, r"mean must be one finite number per channel, got \['a', 'b', 'c'\]"),
    ({"std": 0.2}, "std must be one finite number per channel, got 0.2"),
])
def test_bad_mean_or_std_is_quoted(npy_cache, kw, message):
    with pytest.raises(ValueError, match=message):
        CachedLoader(npy_cache, batch_size=8, device="cpu", **kw)


def test_every_loader_takes_mean_and_std(npy_cache):
    for cls in (CachedLoader, LiveLoader):
        params = inspect.signature(cls).parameters
        assert params["mean"].default is None and params["std"].default is None
    loader = open_loader(npy_cache, batch_size=8, device="cpu", mean=[0.1, 0.2, 0.3], std=[1, 1, 1])
    assert loader.mean == (0.1, 0.2, 0.3) and loader.std == (1.0, 1.0, 1.0)


def test_every_loader_lists_the_shared_options_with_their_defaults():
    from readers.loader import Loader

    shared = {n: p.default for n, p in inspect.signature(Loader).parameters.items() if p.kind is p.KEYWORD_ONLY}
    decoding = {"decode_threads": None, "decode_on": "auto"}
    own = {CachedLoader: {"verify": False, "targets": "labels", **decoding},
           LiveLoader: {"workers": None, "verify": False, "augment_on": None, "trust_code": False, "factory": None,
                        "targets": "labels", **decoding}}
    for cls, extra in own.items():
        params = inspect.signature(cls).parameters
        assert list(params)[0] == "cache" and list(params)[-1] == "staging"
        assert {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY} == {**shared, **extra}
        with pytest.raises(TypeError, match=f"{cls.__name__}.* missing 1 required keyword-only argument: 'batch_size'"):
            cls("anywhere")


def test_rank_alone_is_resolved_at_the_first_pass(npy_cache):
    # Built before init_process_group with only rank=: world size comes from torch.distributed later;
    # without a process group by then, the first pass says what is missing.
    loader = _loader(npy_cache, rank=1)
    with pytest.raises(ValueError, match="rank=1 was given without world_size"):
        iter(loader)
