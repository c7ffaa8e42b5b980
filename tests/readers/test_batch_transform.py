"""Batch-level stages: a seeded within-batch order on the live device path, and batch_transform=
(torchvision's v2.MixUp / v2.CutMix / RandomChoice, or the user's own) seeded per batch, resumable,
checked; CacheDataset over a device-augmented cache."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision.transforms import v2

from cacheaug.transforms import TransformError
from cachegen.cli import main
from loader_checks import CLASSES, epoch_batches
from readers import CacheDataset, CachedLoader, LiveLoader, ReaderError, open_loader
from readers.batch_transform import BatchTransform, BatchTransformError

cuda = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)
SORTED_CLASSES = 10

KORNIA_FACTORY = '''
import kornia.augmentation as K

def pipeline(epoch, epochs):
    return K.AugmentationSequential(K.RandomHorizontalFlip(), K.RandomResizedCrop((24, 24), scale=(0.5, 1.0)))

def broken_later(epoch, epochs):  # fails once the environment says so (after the build)
    import os

    def transform(image):
        if os.environ.get("KAUG_BROKEN"):
            raise ZeroDivisionError("division by zero\\nsecond line")
        return image
    return transform
'''


def _build(root: Path, out: str, *args: str) -> Path:
    result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / out), "--epochs", "2",
                                       "--shard-size", "40", "--workers", "1", "--quiet", *args])
    assert result.exit_code == 0, result.output
    return root / out


@pytest.fixture(scope="module")
def sorted_live(tmp_path_factory) -> Path:
    """A live `--augment-on device` cache of a class-sorted source (as an ImageFolder is): 400 32x32
    images, 40 of each of 10 classes in a row."""
    root = tmp_path_factory.mktemp("sorted_live")
    rng = np.random.default_rng(7)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8),
             labels=np.repeat(np.arange(SORTED_CLASSES), 40))
    return _build(root, "live", "--mode", "live", "--augment-on", "device")


def _neighbours_agree(batches) -> float:
    """The share of neighbouring samples within a batch that share a label."""
    same = total = 0
    for _, labels in batches:
        same += int((labels[1:] == labels[:-1]).sum())
        total += len(labels) - 1
    return same / total


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_device_batches_of_a_class_sorted_source_are_not_class_sorted(sorted_live):
    batches = epoch_batches(LiveLoader(sorted_live, batch_size=64, seed=1, device="cpu"), 0)
    # random order: ~1/10 of neighbours share a label; in source order ~93 % would
    assert _neighbours_agree(batches) < 0.25
    # the per-sample path's batches hold the same samples (its order is the cached epoch's, random already)
    per_sample = epoch_batches(LiveLoader(sorted_live, batch_size=64, seed=1, device="cpu", augment_on="cpu",
                                          workers=0), 0)
    assert [sorted(y.tolist()) for _, y in batches] == [sorted(y.tolist()) for _, y in per_sample]
    again = epoch_batches(LiveLoader(sorted_live, batch_size=64, seed=1, device="cpu"), 0)
    assert _equal(batches, again)  # the order is seeded
    other = epoch_batches(LiveLoader(sorted_live, batch_size=64, seed=1, device="cpu"), 1)
    assert [y.tolist() for _, y in other] != [y.tolist() for _, y in batches]


def test_device_batch_order_resumes_exactly_mid_epoch(sorted_live):
    loader = LiveLoader(sorted_live, batch_size=48, seed=2, device="cpu")
    whole = epoch_batches(loader, 0)
    first = LiveLoader(sorted_live, batch_size=48, seed=2, device="cpu")
    first.set_epoch(0)
    it = iter(first)
    next(it), next(it), next(it)
    state = first.state_dict()
    resumed = LiveLoader(sorted_live, batch_size=48, seed=2, device="cpu")
    resumed.load_state_dict(state)
    assert _equal(list(resumed), whole[3:])


def test_each_rank_gets_its_own_order(sorted_live):
    ranks = [epoch_batches(LiveLoader(sorted_live, batch_size=32, device="cpu", rank=r, world_size=2), 0)
             for r in range(2)]
    assert all(_neighbours_agree(b) < 0.3 for b in ranks)
    assert [y.tolist() for _, y in ranks[0]] != [y.tolist() for _, y in ranks[1]]


def _mixup_weight(plain: torch.Tensor, mixed: torch.Tensor) -> float:
    """lam with mixed == lam * plain + (1 - lam) * plain.roll(1), solved by least squares and checked."""
    a, b = plain - plain.roll(1, 0), mixed - plain.roll(1, 0)
    lam = float((a * b).sum() / (a * a).sum())
    assert torch.allclose(mixed, lam * plain + (1 - lam) * plain.roll(1, 0), atol=1e-4)
    return lam


def test_mixup_on_a_cached_loader_is_seeded_checked_and_leaves_the_caller_alone(npy_cache):
    mixup = v2.MixUp(alpha=1.0, num_classes=CLASSES)
    options = dict(batch_size=32, seed=5, device="cpu")
    plain = epoch_batches(CachedLoader(npy_cache, **options), 0)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    mixed = epoch_batches(CachedLoader(npy_cache, batch_transform=mixup, **options), 0)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert _equal(mixed, epoch_batches(CachedLoader(npy_cache, batch_transform=mixup, **options), 0))
    lams = []
    for (x, y), (mx, targets) in zip(plain, mixed):
        assert targets.shape == (len(y), CLASSES) and targets.dtype == torch.float32
        lam = _mixup_weight(x, mx)
        one_hot = torch.nn.functional.one_hot(y, CLASSES).float()
        assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0), atol=1e-5)
        lams.append(lam)
    assert len(set(round(v, 6) for v in lams)) == len(lams)  # a weight per batch, not one for all
    other_epoch = epoch_batches(CachedLoader(npy_cache, batch_transform=mixup, **options), 1)
    assert not torch.equal(other_epoch[0][1], mixed[0][1])


def test_a_transformed_pass_resumes_exactly_mid_epoch(npy_cache):
    cutmix_or_mixup = v2.RandomChoice([v2.MixUp(num_classes=CLASSES), v2.CutMix(num_classes=CLASSES)])
    options = dict(batch_size=24, seed=9, device="cpu", batch_transform=cutmix_or_mixup)
    whole = epoch_batches(CachedLoader(npy_cache, **options), 1)
    first = CachedLoader(npy_cache, **options)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(4):
        next(it)
    torch.manual_seed(123)  # the caller's draws between save and resume change nothing
    resumed = CachedLoader(npy_cache, **options)
    resumed.load_state_dict(first.state_dict())
    assert _equal(list(resumed), whole[4:])


def test_live_loaders_and_open_loader_take_it_too(sorted_live):
    cutmix = v2.CutMix(alpha=1.0, num_classes=SORTED_CLASSES)
    for loader in (LiveLoader(sorted_live, batch_size=40, device="cpu", batch_transform=cutmix),
                   LiveLoader(sorted_live, batch_size=40, device="cpu", augment_on="cpu", workers=0,
                              batch_transform=cutmix),
                   open_loader(sorted_live, batch_size=40, device="cpu", batch_transform=cutmix)):
        images, targets = next(iter(loader))
        assert images.shape == (40, 3, 32, 32) and targets.shape == (40, SORTED_CLASSES)
        assert torch.allclose(targets.sum(1), torch.ones(40))


def test_replay_mixes_other_targets_with_the_same_pairs_and_weights():
    images = torch.rand(16, 3, 20, 12)
    labels = torch.randint(0, 5, (16,))
    teacher = torch.softmax(torch.randn(16, 5), 1)
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    for transform in (v2.MixUp(num_classes=5), v2.CutMix(num_classes=5),
                      v2.RandomChoice([v2.MixUp(num_classes=5), v2.CutMix(num_classes=5)])):
        for seed in (1, 2, 3):
            mixed, targets, mixed_teacher = BatchTransform(transform)(images, labels, seed=seed, also=(teacher,))
            # the label weights (MixUp's lam, CutMix's box area) of this call, read off the targets
            # (targets . (one_hot - rolled)) = (2 lam - 1) |one_hot - rolled|^2 / 2
            rolled = one_hot.roll(1, 0)
            lam = (float((targets * (one_hot - rolled)).sum() / ((one_hot - rolled) ** 2).sum()) * 2 + 1) / 2
            assert torch.allclose(mixed_teacher, lam * teacher + (1 - lam) * teacher.roll(1, 0), atol=1e-5)
            again = BatchTransform(transform).replay(images, teacher, seed=seed)
            assert torch.equal(again, mixed_teacher)


def test_a_transform_that_mixes_in_place_still_replays_on_the_original_images():
    def in_place(images, labels):  # as timm's Mixup: images mixed in place, weights from numpy's global RNG
        lam = float(np.random.beta(1.0, 1.0))
        flipped = images.flip(0).mul_(1 - lam)
        images.mul_(lam).add_(flipped)
        targets = labels.float() if labels.ndim == 2 else torch.nn.functional.one_hot(labels, 4).float()
        return images, lam * targets + (1 - lam) * targets.flip(0)

    images, labels = torch.rand(8, 3, 4, 4), torch.randint(0, 4, (8,))
    teacher = torch.softmax(torch.randn(8, 4), 1)
    original = images.clone()
    mixed, targets, mixed_teacher = BatchTransform(in_place)(images, labels, seed=4, also=(teacher,))
    lam = _flip_weight(original, mixed)
    assert torch.allclose(mixed_teacher, lam * teacher + (1 - lam) * teacher.flip(0), atol=1e-5)


def _flip_weight(plain: torch.Tensor, mixed: torch.Tensor) -> float:
    a, b = plain - plain.flip(0), mixed - plain.flip(0)
    return float((a * b).sum() / (a * a).sum())


@pytest.mark.parametrize(("transform", "message"), [
    (lambda x, y: x, r"batch_transform .*<lambda> returned Tensor for batch 0 of epoch 0: it must return "
                     r"\(images, targets\), two tensors of 32 rows on cpu"),
    (lambda x, y: (x[:-1], y), r"returned images of shape \(31, 3, 12, 20\) on cpu for batch 0 of epoch 0"),
    (lambda x, y: (x, y.tolist()), r"returned a tuple of Tensor, list for batch 0"),
    (v2.MixUp(num_classes=3), r"batch_transform MixUp\(.*\) failed on batch 0 of epoch 0 of shape "
                              r"\(32, 3, 12, 20\): (ValueError|IndexError|RuntimeError): "),
])
def test_a_bad_transform_is_one_line_naming_it(npy_cache, transform, message):
    loader = CachedLoader(npy_cache, batch_size=32, device="cpu", batch_transform=transform)
    with pytest.raises(BatchTransformError, match=message) as raised:
        next(iter(loader))
    assert "\n" not in str(raised.value) and isinstance(raised.value, ReaderError)


def test_a_batch_transform_must_be_callable(npy_cache):
    with pytest.raises(ValueError, match="batch_transform must be callable .* got int"):
        CachedLoader(npy_cache, batch_size=32, device="cpu", batch_transform=3)


@pytest.fixture(scope="module")
def kornia_live(tmp_path_factory) -> Path:
    """A live `--augment-on device` cache of 60 images whose transform is a Kornia-only factory."""
    root = tmp_path_factory.mktemp("kornia_live")
    rng = np.random.default_rng(5)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, 60))
    (root / "kaug_ds.py").write_text(KORNIA_FACTORY)
    return _build(root, "k", "--mode", "live", "--augment-on", "device", "--transform",
                  f"{root / 'kaug_ds.py'}:pipeline")


def test_cache_dataset_of_a_device_cache_uses_the_batched_augmentation(kornia_live):
    # a per-sample path would fail: the factory is batch-only
    dataset = CacheDataset(kornia_live, epoch=0, trust_code=True)
    state = torch.get_rng_state()
    image, label = dataset[5]
    assert torch.equal(torch.get_rng_state(), state)
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and isinstance(label, int)
    assert torch.equal(CacheDataset(kornia_live, epoch=0, trust_code=True)[5][0], image)  # seeded per sample
    assert not torch.equal(CacheDataset(kornia_live, epoch=1, trust_code=True)[5][0], image)
    assert not torch.equal(dataset[6][0], image)


def test_cache_dataset_names_a_failing_factory_in_one_line(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "src.npz", images=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, 20))
    (tmp_path / "kaug_bad.py").write_text(KORNIA_FACTORY)
    cache = _build(tmp_path, "bad", "--mode", "live", "--augment-on", "cpu", "--transform",
                   f"{tmp_path / 'kaug_bad.py'}:broken_later")
    monkeypatch.setenv("KAUG_BROKEN", "1")
    with pytest.raises(TransformError, match=r"transform .*:broken_later failed on sample \d+ of epoch 0: "
                                             r"ZeroDivisionError: division by zero$"):
        CacheDataset(cache, epoch=0, trust_code=True)[0]


@cuda
def test_cuda_batch_transform_and_modules_move_to_the_device(sorted_live, npy_cache):
    module = v2.MixUp(num_classes=CLASSES)
    loader = CachedLoader(npy_cache, batch_size=32, device="cuda", batch_transform=module)
    state = torch.cuda.get_rng_state()
    a = epoch_batches(loader, 0)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert a[0][0].device.type == "cuda" and a[0][1].shape == (32, CLASSES) and a[0][1].device.type == "cuda"
    assert _equal(a, epoch_batches(CachedLoader(npy_cache, batch_size=32, device="cuda", batch_transform=module), 0))
    live = LiveLoader(sorted_live, batch_size=64, device="cuda", augment_on="device")
    batches = epoch_batches(live, 0)
    assert _neighbours_agree([(x, y.cpu()) for x, y in batches]) < 0.25
    cpu = epoch_batches(LiveLoader(sorted_live, batch_size=64, device="cpu", augment_on="device"), 0)
    assert [y.cpu().tolist() for _, y in batches] == [y.tolist() for _, y in cpu]  # the same order on both
