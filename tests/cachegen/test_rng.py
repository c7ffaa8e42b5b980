"""Per-sample seeding covers every generator a transform may draw from (torch, Python's `random`,
numpy's global RNG; torchvision v1 and v2), and the caller's generators are given back untouched
wherever augmentation runs in the caller's process."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cacheaug.transforms import augment, sample_seed, seed_sample, to_pil
from tests.cachegen.conftest import run_cli, shard_bytes

# Each factory draws from one generator the old seeding left alone (or from all of them).
FACTORIES = '''
import random

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as V
from PIL import Image


def _python_and_numpy(image):
    a = np.roll(np.array(image), random.randint(-8, 8), axis=1)  # Python's random
    noise = np.random.randint(-30, 31, a.shape)  # numpy's global RNG
    return Image.fromarray((a.astype(np.int16) + noise).clip(0, 255).astype(np.uint8))


def v1(epoch, epochs):  # RandomChoice and RandomOrder draw from Python's random
    return T.Compose([
        T.RandomChoice([T.RandomHorizontalFlip(1.0), T.RandomVerticalFlip(1.0), T.RandomRotation(30)]),
        T.RandomOrder([T.ColorJitter(brightness=0.5), T.RandomPosterize(3, p=1.0), T.RandomInvert(p=1.0)]),
    ])


def v2(epoch, epochs):  # torch's generator
    return V.Compose([V.PILToTensor(), V.RandomChoice([V.RandomHorizontalFlip(1.0), V.RandomRotation(30)]),
                      V.ColorJitter(brightness=0.5), V.ToDtype(torch.float32, scale=True)])


def python_numpy(epoch, epochs):
    return _python_and_numpy


def everything(epoch, epochs):
    return T.Compose([v1(epoch, epochs), _python_and_numpy, T.RandomCrop(32, padding=4)])
'''


@pytest.fixture
def rng_factories(tmp_path, monkeypatch):
    (tmp_path / "rng_augs.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rng_augs"


def rng_states():
    """The caller's three generator states, comparable with ==."""
    return (torch.get_rng_state().tolist(), random.getstate(), repr(np.random.get_state()))


def seed_caller():
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    return rng_states()


@pytest.mark.parametrize("factory", ["v1", "v2", "python_numpy", "everything"])
def test_same_bytes_8_times_and_for_1_or_2_workers(build, rng_factories, tmp_path, factory):
    spec = f"{rng_factories}:{factory}"
    first = shard_bytes(build("--epochs", "2", "--transform", spec, out=tmp_path / "run-0"))
    for k in range(1, 8):
        random.seed(k)  # whatever the caller's generators hold, the cache is the same
        np.random.seed(k)
        torch.manual_seed(k)
        assert shard_bytes(build("--epochs", "2", "--transform", spec, out=tmp_path / f"run-{k}")) == first, k
    two = build("--epochs", "2", "--transform", spec, "--workers", "2", out=tmp_path / "two-workers")
    assert shard_bytes(two) == first and len(first) == 2 * 10  # shards and index files


def test_the_seed_rule_is_unchanged_for_torch():
    """Caches of torch-only transforms keep their bytes: torch's generator gets sample_seed as before."""
    with torch.random.fork_rng():
        seed_sample(3, 4, 5)
        drawn = torch.rand(4)
    assert torch.equal(drawn, torch.rand(4, generator=torch.Generator().manual_seed(sample_seed(3, 4, 5))))
    assert sample_seed(3, 4, 5) == 4780114647005286066


def test_augment_gives_the_callers_generators_back():
    before = seed_caller()
    image = to_pil(np.zeros((8, 8, 3), np.uint8))
    out = augment(lambda im: (random.random(), np.random.rand(), torch.rand(1)) and im, image, seed=0, epoch=1, index=2)
    assert out.shape == (8, 8, 3) and rng_states() == before


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_build_gives_the_callers_generators_back(build, rng_factories, workers):
    before = seed_caller()
    build("--epochs", "2", "--transform", f"{rng_factories}:everything", "--workers", workers)
    assert rng_states() == before


@pytest.mark.parametrize("mode", ["cached", "live"])
def test_a_preview_gives_the_callers_generators_back(build, rng_factories, tmp_path, mode):
    out = build("--epochs", "2", "--transform", f"{rng_factories}:everything", "--mode", mode)
    before = seed_caller()
    run_cli("preview", out, "--out", tmp_path / "grid.png", "--trust-code")
    assert rng_states() == before
