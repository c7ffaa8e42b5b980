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


def _draws() -> tuple:
    return random.random(), float(np.random.random()), float(torch.rand(()))


def test_seeding_in_two_threads_at_once_gives_each_its_draws_and_the_callers_generators_back():
    """The generators are the process's: a second thread's seeded_everything, begun while a first
    one's is under way, neither disturbs the first one's draws nor leaves its own seed behind."""
    import threading

    from readers.batch_transform import seeded_everything

    cpu = torch.device("cpu")
    expected = {}
    for seed in (1, 2):
        with seeded_everything(seed, cpu):
            expected[seed] = _draws()
    before = _seed_caller()
    inside, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    got = {}

    def first():
        with seeded_everything(1, cpu):
            inside.set()
            second_in.wait(0.5)  # the second's seeding lands here, unless it waits for this borrow to end
            got[1] = _draws()
        first_out.set()

    def second():
        inside.wait()
        with seeded_everything(2, cpu):
            second_in.set()
            first_out.wait(10)  # draws after the first has given its states back
            got[2] = _draws()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == expected
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert repr(np.random.get_state()) == before[2]
