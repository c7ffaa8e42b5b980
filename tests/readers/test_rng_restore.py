"""A live cache augmented with a transform that draws from Python's `random`, numpy's global RNG
and torchvision v1/v2 yields the cached build's bytes; an in-process LiveLoader gives the
caller's generators back."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachegen.cli import main
from loader_checks import epoch_batches
from readers import CachedLoader, LiveLoader

FACTORY = '''
import random

import numpy as np
import torchvision.transforms as T
import torchvision.transforms.v2 as V
from PIL import Image


def _python_and_numpy(image):
    a = np.roll(np.array(image), random.randint(-8, 8), axis=1)
    noise = np.random.randint(-30, 31, a.shape)
    return Image.fromarray((a.astype(np.int16) + noise).clip(0, 255).astype(np.uint8))


def everything(epoch, epochs):
    return T.Compose([T.RandomChoice([T.RandomHorizontalFlip(1.0), T.RandomRotation(30)]),
                      T.RandomOrder([T.ColorJitter(brightness=0.5), T.RandomInvert(p=1.0)]),
                      _python_and_numpy, V.RandomCrop(32, padding=4)])
'''


@pytest.fixture(scope="module")
def rng_pair(tmp_path_factory):
    """A cached and a live cache of one source, built with the `everything` transform."""
    root = tmp_path_factory.mktemp("rng")
    (root / "rng_live_augs.py").write_text(FACTORY)
    rng = np.random.default_rng(3)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (160, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 4, 160))
    sys.path.insert(0, str(root))  # DataLoader workers fork from here and import the factory
    try:
        for mode in ("cached", "live"):
            result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / mode), "--epochs",
                                               "2", "--shard-size", "40", "--workers", "2", "--quiet", "--mode", mode,
                                               "--transform", "rng_live_augs:everything"])
            assert result.exit_code == 0, result.output
        yield root / "cached", root / "live"
    finally:
        sys.path.remove(str(root))


@pytest.mark.parametrize("workers", [0, 2])
def test_live_equals_cached_for_random_and_numpy_transforms(rng_pair, workers):
    cached_dir, live_dir = rng_pair
    options = dict(batch_size=32, seed=4, device="cpu", normalize=False)
    cached, live = CachedLoader(cached_dir, **options), LiveLoader(live_dir, workers=workers, trust_code=True, **options)
    for epoch in (0, 1):
        a, b = epoch_batches(cached, epoch), epoch_batches(live, epoch)
        assert len(a) == len(b) == 5
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def _seed_caller():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    return torch.get_rng_state(), random.getstate(), repr(np.random.get_state())


def test_in_process_live_epoch_gives_the_callers_generators_back(rng_pair):
    _, live_dir = rng_pair
    loader = LiveLoader(live_dir, batch_size=32, device="cpu", workers=0, shuffle=False, trust_code=True)
    before = _seed_caller()
    assert len(epoch_batches(loader, 1)) == 5
    assert random.getstate() == before[1] and repr(np.random.get_state()) == before[2]


def test_in_process_live_epoch_leaves_torchs_generator_alone(rng_pair):
    _, live_dir = rng_pair
    loader = LiveLoader(live_dir, batch_size=32, device="cpu", workers=0, shuffle=False, trust_code=True)
    before = _seed_caller()
    epoch_batches(loader, 1)
    assert torch.equal(torch.get_rng_state(), before[0])
