"""A resume state names the cache it was taken on: a state from another cache (the same data built
with another seed) or another augmentation path is refused in one line; the same cache, wherever
it lies, resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachegen.cli import main
from readers import CachedLoader, LiveLoader, open_loader

OPTIONS = dict(batch_size=20, seed=7, device="cpu", normalize=False)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Cached builds of one 120-image source with --seed 0 and --seed 1 (same sizes, other samples),
    and a live one (cifar preset, recorded --augment-on device)."""
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(2)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, 120))
    builds = {"seed0": ("--seed", "0"), "seed1": ("--seed", "1"),
              "live": ("--mode", "live", "--augment-on", "device")}
    for name, extra in builds.items():
        result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / name), "--epochs", "2",
                                           "--shard-size", "30", "--workers", "1", "--quiet", *extra])
        assert result.exit_code == 0, result.output
    return {name: root / name for name in builds}


def _state_after(loader, batches: int) -> dict:
    for i, _ in enumerate(loader):
        if i + 1 == batches:
            return loader.state_dict()
    raise AssertionError("the epoch is shorter than asked")


def _rest(loader) -> list[torch.Tensor]:
    return [x for x, _ in loader]


def test_a_state_from_the_same_data_built_with_another_seed_is_refused(caches):
    state = _state_after(CachedLoader(caches["seed0"], **OPTIONS), 2)
    other = CachedLoader(caches["seed1"], **OPTIONS)
    assert len(other) == len(CachedLoader(caches["seed0"], **OPTIONS))  # nothing else tells them apart
    with pytest.raises(ValueError) as refused:
        other.load_state_dict(state)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("cannot resume: the state was taken on another cache")
    assert other.epoch == 0 and other.state_dict()["batches_done"] == 0  # left where it was


def test_a_state_from_the_same_cache_resumes_exactly_even_from_a_copy(caches, tmp_path):
    expected = _rest(CachedLoader(caches["seed0"], **OPTIONS))[2:]
    state = _state_after(CachedLoader(caches["seed0"], **OPTIONS), 2)
    assert isinstance(state["cache"], str) and len(state["cache"]) == 64 and state["augment_on"] is None
    json.dumps(state)  # a checkpoint can hold it as it is
    copy = shutil.copytree(caches["seed0"], tmp_path / "elsewhere")  # staged, moved or copied: the same cache
    for where in (caches["seed0"], copy):
        resumed = CachedLoader(where, **OPTIONS)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        got = _rest(resumed)
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_live_state_names_its_augmentation_path(caches):
    state = _state_after(LiveLoader(caches["live"], **OPTIONS), 1)
    assert state["augment_on"] == "device"
    LiveLoader(caches["live"], **OPTIONS).load_state_dict(state)  # the same path: accepted
    per_sample = LiveLoader(caches["live"], workers=0, augment_on="cpu", **OPTIONS)
    with pytest.raises(ValueError, match="taken augmenting on 'device', this loader augments on 'cpu': "
                                         "pass augment_on='device'"):
        per_sample.load_state_dict(state)
    with pytest.raises(ValueError, match="taken on another cache"):  # a cached build is another cache too
        open_loader(caches["seed0"], **OPTIONS).load_state_dict(state)


def test_a_state_saved_before_states_named_their_cache_resumes_with_a_warning(caches):
    state = _state_after(CachedLoader(caches["seed0"], **OPTIONS), 2)
    older = {k: v for k, v in state.items() if k not in ("cache", "augment_on")}
    resumed = CachedLoader(caches["seed0"], **OPTIONS)
    with pytest.warns(UserWarning, match="does not name the cache it was taken on"):
        resumed.load_state_dict(older)
    assert resumed.state_dict()["batches_done"] == 2
