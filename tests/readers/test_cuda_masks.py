"""Segmentation batches on a real GPU: CachedLoader(targets="mask") and a live cache's Kornia path
put int64 masks on the loader's GPU, aligned with their images, the same masks as on the CPU.
Every test is `@pytest.mark.cuda`: without a GPU they are skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachegen.cli import main
from readers import CachedLoader, LiveLoader
from tests.conftest import make_seg_npz

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda-seg")
    path, _, _ = make_seg_npz(root / "seg.npz", n=128, size=24)
    out = {}
    for name, args in (("cached", ["--transform", "seg", "--size", "16"]), ("none", ["--mode", "live"]),
                       ("live", ["--mode", "live", "--transform", "seg", "--size", "16"])):
        result = CliRunner().invoke(main, ["build", str(path), "--out", str(root / name), "--shard-size", "32",
                                           "--workers", "1", "--quiet", *args])
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_cached_masks_on_the_gpu_equal_the_cpus(seg, channels_last):
    options = dict(batch_size=32, targets="mask", seed=1, channels_last=channels_last)
    gpu = list(CachedLoader(seg["cached"], device="cuda", **options))
    cpu = list(CachedLoader(seg["cached"], device="cpu", **options))
    assert len(gpu) == len(cpu) == 4
    for (images, masks), (cimages, cmasks) in zip(gpu, cpu):
        assert masks.device.type == "cuda" and masks.dtype == torch.int64 and masks.shape == (32, 16, 16)
        assert torch.equal(masks.cpu(), cmasks) and torch.allclose(images.cpu(), cimages, atol=1e-5)


def test_the_kornia_path_on_the_gpu_keeps_masks_aligned(seg):
    options = dict(batch_size=32, targets="mask", normalize=False, augment_on="device", device="cuda")
    for images, masks in LiveLoader(seg["none"], **options):
        assert masks.device.type == "cuda" and torch.equal(images[:, 0].to(torch.int64), masks * 20)
    for images, masks in LiveLoader(seg["live"], **options):
        assert masks.shape == (32, 16, 16) and int(masks.max()) < 5
        pair = torch.stack([images[:, 0].flatten().float(), masks.flatten().float()])
        assert float(torch.corrcoef(pair)[0, 1]) > 0.5
