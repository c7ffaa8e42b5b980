"""A live cache with a compressed source (`--mode live --format jpg|png`): stored once as JPEG or
PNG, decoded per sample in the workers or per batch before device augmentation, read as the same
build stored as npy reads (exactly for png, within JPEG's error for jpg)."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachegen.cli import main
from loader_checks import epoch_batches
from readers import LiveLoader, load_manifest


def smooth(n: int, size: int, seed: int) -> np.ndarray:
    """Photo-like images (smooth gradients, a little texture): what JPEG is for, unlike noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 4, 4), dtype=np.float32))
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The same 120-image source as three live caches (npy, png, jpg), cifar preset, 2 epochs."""
    root = tmp_path_factory.mktemp("live-compressed")
    np.savez(root / "src.npz", images=smooth(120, 32, 3), labels=np.arange(120) % 4)
    for encoding in ("npy", "png", "jpg"):
        result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / encoding), "--epochs",
                                           "2", "--shard-size", "40", "--workers", "1", "--quiet", "--mode", "live",
                                           "--format", encoding, "--transform", "cifar"])
        assert result.exit_code == 0, result.output
    return {encoding: root / encoding for encoding in ("npy", "png", "jpg")}


def _payload_bytes(cache) -> int:
    """The image members' bytes (at 32 px a tar's 512-byte headers would outweigh them)."""
    total = 0
    for shard in load_manifest(cache).source_shards:
        with tarfile.open(shard.path) as tar:
            total += sum(x.size for x in tar.getmembers() if not x.name.endswith(".cls"))
    return total


def test_a_live_cache_stores_its_source_in_the_format_asked(live):
    for encoding in ("png", "jpg"):
        m = load_manifest(live[encoding])
        assert m.mode == "live" and m.encoding == encoding and m.shape == (32, 32, 3)
        shard = m.source_shards[0]
        with tarfile.open(shard.path) as tar:
            assert {name.rsplit(".", 1)[1] for name in tar.getnames()} == {"cls", encoding}
    # Smooth images: JPEG at quality 95 takes a fraction of the raw pixels.
    assert _payload_bytes(live["jpg"]) < _payload_bytes(live["npy"]) / 2


@pytest.mark.parametrize("encoding", ["png", "jpg"])
@pytest.mark.parametrize(("augment_on", "workers"), [("cpu", 0), ("cpu", 1), ("device", 0)])
def test_a_compressed_live_cache_reads_as_its_npy_twin(live, encoding, augment_on, workers):
    # The same seeds, so the same crops and flips: png is lossless, so exactly the npy cache's
    # batches; jpg within a few levels (its decode of smooth images at quality 95).
    options = dict(batch_size=32, seed=5, device="cpu", augment_on=augment_on, workers=workers, normalize=False)
    twin, compressed = LiveLoader(live["npy"], **options), LiveLoader(live[encoding], **options)
    try:
        for epoch in (0, 1):
            a, b = epoch_batches(twin, epoch), epoch_batches(compressed, epoch)
            assert len(a) == len(b) == 4
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(ya, yb)
                error = (xa.float() - xb.float()).abs()
                if encoding == "png":
                    assert torch.equal(xa, xb)
                else:
                    assert 0 < error.mean() <= 3 and error.max() <= 64
    finally:
        twin.close()
        compressed.close()


def test_quality_sets_the_jpeg_quality_and_is_recorded(live, tmp_path):
    src = live["npy"].parent / "src.npz"
    out = tmp_path / "q40"
    result = CliRunner().invoke(main, ["build", str(src), "--out", str(out), "--epochs", "2", "--shard-size", "40",
                                       "--workers", "1", "--quiet", "--mode", "live", "--format", "jpg",
                                       "--transform", "cifar", "--quality", "40"])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).raw["image"]["quality"] == 40
    assert "quality" not in load_manifest(live["jpg"]).raw["image"]  # the default: as before --quality
    assert _payload_bytes(out) < _payload_bytes(live["jpg"])
    batches = epoch_batches(LiveLoader(out, batch_size=32, seed=5, device="cpu", workers=0, normalize=False), 0)
    assert sum(len(y) for _, y in batches) == 120


def test_the_device_path_decodes_in_threads_or_in_batches_alike(live):
    # decode_threads and decode_on, as CachedLoader's, through open_loader: the same batches.
    from readers import open_loader

    options = dict(batch_size=32, seed=6, device="cpu", augment_on="device", normalize=False)
    reference = epoch_batches(open_loader(live["jpg"], decode_threads=1, decode_on="cpu", **options), 1)
    for extra in (dict(decode_threads=3), dict(decode_on="device")):
        got = epoch_batches(open_loader(live["jpg"], **extra, **options), 1)
        assert all(torch.equal(x, a) and torch.equal(y, b) for (x, y), (a, b) in zip(got, reference))
    with pytest.raises(ValueError, match="decode_on='device' decodes JPEGs"):
        LiveLoader(live["png"], decode_on="device", **options)
