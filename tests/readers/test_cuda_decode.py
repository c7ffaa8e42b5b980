"""jpg payloads decoded on a real GPU (nvJPEG through torchvision), against the CPU decode: how close
they are, that the device path after them (normalise, channels_last, device augmentation) runs, and
that no pass waits on the host per batch. Every test is `@pytest.mark.cuda` (skipped without a GPU).

How close: nvJPEG and libjpeg-turbo implement the same standard with other IDCT and chroma
upsampling arithmetic, so a value may differ by a few levels; the tests bound the mean difference
by 1.5 levels and the largest by 48 (a chroma edge), and print what they measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachegen.cli import main
from loader_checks import batches_without_host_waits, epoch_batches
from readers import CachedLoader, LiveLoader

pytestmark = pytest.mark.cuda
MEAN_LEVELS, MAX_LEVELS = 1.5, 48


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """A cached jpg build and a live jpg one (device-augmented) of 192 smooth 64x64 images."""
    root = tmp_path_factory.mktemp("cuda-jpg")
    rng = np.random.default_rng(8)
    coarse = torch.from_numpy(rng.random((192, 3, 8, 8), dtype=np.float32))
    images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    np.savez(root / "src.npz", images=(images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
             labels=rng.integers(0, 10, 192))
    out = {}
    for name, args in (("cached", ["--mode", "cached", "--transform", "none"]),
                       ("live", ["--mode", "live", "--augment-on", "device", "--transform", "imagenet", "--size",
                                 "48", "--epochs", "2"])):
        result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / name), "--format",
                                           "jpg", "--shard-size", "64", "--workers", "1", "--quiet", *args])
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def _levels(gpu: list, cpu: list) -> torch.Tensor:
    assert len(gpu) == len(cpu) > 0
    diffs = []
    for (x, y), (a, b) in zip(gpu, cpu):
        assert x.device.type == "cuda" and torch.equal(y.cpu(), b)
        diffs.append((x.cpu().float() - a.float()).abs().flatten())
    return torch.cat(diffs)


def test_nvjpeg_batches_are_within_a_few_levels_of_the_cpu_decode(caches):
    options = dict(batch_size=32, seed=1, normalize=False)
    gpu = epoch_batches(CachedLoader(caches["cached"], device="cuda", **options), 0)  # auto: decoded on the GPU
    cpu = epoch_batches(CachedLoader(caches["cached"], device="cpu", decode_on="cpu", **options), 0)
    diff = _levels(gpu, cpu)
    print(f"nvJPEG against libjpeg-turbo: mean {diff.mean():.3f} levels, max {diff.max():.0f}, "
          f"{(diff > 0).float().mean() * 100:.1f} % of values differ")
    assert diff.mean() <= MEAN_LEVELS and diff.max() <= MAX_LEVELS


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_device_path_after_the_decode(caches, channels_last):
    options = dict(batch_size=32, seed=2, channels_last=channels_last)
    gpu = epoch_batches(CachedLoader(caches["cached"], device="cuda", **options), 0)
    cpu = epoch_batches(CachedLoader(caches["cached"], device="cpu", decode_on="cpu", **options), 0)
    assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last if channels_last
                                                            else torch.contiguous_format) for x, _ in gpu)
    std = torch.tensor(CachedLoader(caches["cached"], batch_size=1).std).view(1, -1, 1, 1)
    assert len(gpu) == len(cpu) > 0
    for (x, y), (a, b) in zip(gpu, cpu):  # normalised: a level is 1 / (255 std)
        assert x.device.type == "cuda" and torch.equal(y.cpu(), b)
        assert ((x.cpu() - a).abs() * std * 255).mean() <= MEAN_LEVELS


def test_a_live_jpg_cache_is_decoded_then_augmented_on_the_gpu(caches):
    options = dict(batch_size=32, seed=3, augment_on="device", normalize=False)
    gpu = epoch_batches(LiveLoader(caches["live"], device="cuda", **options), 0)
    cpu = epoch_batches(LiveLoader(caches["live"], device="cpu", **options), 0)
    diff = _levels(gpu, cpu)  # the same crops (Kornia draws them on the CPU), resampled from near-equal pixels
    print(f"live jpg, decoded and augmented on the GPU against the CPU: mean {diff.mean():.3f} levels")
    assert diff.mean() <= 2 * MEAN_LEVELS


@pytest.mark.parametrize("cache", ["cached", "live"])
def test_no_host_waits_per_batch_with_nvjpeg(caches, cache):
    """A pass after the first makes no synchronising call: torch raises on any in sync debug mode."""
    loader = CachedLoader(caches["cached"], batch_size=32, device="cuda") if cache == "cached" else \
        LiveLoader(caches["live"], batch_size=32, device="cuda", augment_on="device")
    assert batches_without_host_waits(loader) == len(loader)
