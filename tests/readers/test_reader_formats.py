"""Caches written with --format png and jpg read like raw ones (decoded with torchvision.io)."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch

from loader_checks import SHAPE, collect, epoch_contents, pairs, index_columns
from readers import CachedLoader, ReaderError, load_manifest


def _loader(cache, **kw) -> CachedLoader:
    return CachedLoader(cache, **{"batch_size": 32, "device": "cpu", "normalize": False, **kw})


@pytest.mark.parametrize("encoding", ["png", "jpg"])
def test_compressed_epochs_hold_the_cached_images(caches, encoding):
    loader = _loader(caches[encoding], prefetch=2)
    assert loader.manifest.encoding == encoding
    for epoch in range(loader.manifest.num_epochs):
        loader.set_epoch(epoch)
        images, labels = collect(loader)
        assert all(b.shape[1:] == SHAPE for b in images)
        assert pairs(images, labels) == epoch_contents(caches[encoding], epoch)


@pytest.mark.parametrize(("encoding", "max_error"), [("npy", 0.0), ("png", 0.0), ("jpg", 55.0)])
def test_pixels_match_the_source(caches, source, encoding, max_error):
    # Epoch 0 is the source unchanged; unshuffled, batches follow the manifest's source indices.
    _, originals, labels = source
    loader = _loader(caches[encoding], shuffle=False)
    indices = np.concatenate([index_columns(s)[3] for s in loader.manifest.epochs[0]])
    images, got_labels = collect(loader)
    got = np.concatenate(images).reshape(len(indices), -1).astype(np.float32)
    flat = originals.reshape(len(originals), -1).astype(np.float32)
    errors = np.abs(got[:, None, :] - flat[None, :, :]).mean(axis=2)  # (delivered, source) mean abs error
    assert np.array_equal(errors.argmin(axis=1), indices)  # each image is nearest to its own source
    # The test images are uniform noise, JPEG's worst case (~46 at quality 95); png and npy are exact.
    assert errors[np.arange(len(indices)), indices].max() <= max_error
    assert np.array_equal(np.concatenate(got_labels), labels[indices])


def test_the_same_seed_reads_the_same_batches_in_every_format(caches):
    orders = {}
    for encoding in ("npy", "png"):
        loader = _loader(caches[encoding], seed=11)
        orders[encoding] = np.concatenate(collect(loader)[0])
    assert np.array_equal(orders["npy"], orders["png"])  # same plan, lossless decode


def test_normalised_png_batches(caches):
    x, y = next(iter(_loader(caches["png"], normalize=True, dtype=torch.float16)))
    assert x.dtype == torch.float16 and x.shape == (32, 3, SHAPE[0], SHAPE[1]) and y.dtype == torch.int64


def test_an_undecodable_payload_is_named(caches, tmp_path):
    cache = shutil.copytree(caches["png"], tmp_path / "png")
    shard = _loader(cache).manifest.epochs[0][0]
    data = bytearray(shard.path.read_bytes())
    start = int(index_columns(shard)[0][2])
    data[start:start + 16] = b"\0" * 16  # the PNG signature of sample 2
    shard.path.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match=rf"{shard.path}: sample 2 does not decode as png"):
        list(_loader(cache, shuffle=False))


def test_the_periodic_npy_rows_are_the_tar_payloads_byte_for_byte(npy_cache):
    # A shard mapped as (samples, H*W*C) rows at first + j * pitch: each row is exactly the pixels
    # of the j-th .npy member, as Python's tarfile finds it.
    import tarfile

    from readers.shards import ShardFiles

    m = load_manifest(npy_cache)
    files = ShardFiles(m)
    for shard in (*m.epochs[0], *m.epochs[1]):
        with tarfile.open(shard.path) as tar:
            payloads = [tar.extractfile(x).read() for x in tar.getmembers() if x.name.endswith(".npy")]
        rows = files.get(shard).rows
        assert rows.shape == (len(payloads), m.image_bytes)
        for j, payload in enumerate(payloads):
            assert rows[j].numpy().tobytes() == payload[m.npy_header_bytes:]


@pytest.mark.parametrize("encoding", ["png", "jpg"])
def test_decode_threads_give_the_same_bytes_as_one(caches, encoding):
    # A batch's payloads are decoded by a pool of threads: the same batches, in the same order,
    # whatever the count, channels first (the CPU default) and HWC (normalize off, channels last).
    for channels_last in (False, True):
        got = {}
        for threads in (1, 2, 3):
            loader = _loader(caches[encoding], decode_threads=threads, seed=5, channels_last=channels_last)
            images, labels = collect(loader)
            got[threads] = (np.concatenate(images), np.concatenate(labels))
        for threads in (2, 3):
            assert np.array_equal(got[threads][0], got[1][0]) and np.array_equal(got[threads][1], got[1][1])


def test_decode_threads_run_while_a_pass_reads_and_end_with_it(caches):
    def decoding():
        return [t for t in threading.enumerate() if t.name.startswith("readers-decode")]

    loader = _loader(caches["png"], decode_threads=3)
    batches = iter(loader)
    next(batches)
    assert len(decoding()) == 2  # with the reading thread: 3
    list(batches)
    assert decoding() == []  # the pass is over: its pool is shut down
    batches = iter(_loader(caches["png"], decode_threads=1))
    next(batches)
    assert decoding() == []  # 1: decoded in the reading thread, no pool
    batches.close()


def test_decode_threads_name_the_first_damaged_sample_in_order(caches, tmp_path):
    cache = shutil.copytree(caches["png"], tmp_path / "png")
    shard = _loader(cache).manifest.epochs[0][0]
    data = bytearray(shard.path.read_bytes())
    for k in (5, 2):  # two damaged samples: the later one's thread may fail first; sample 2 is named
        start = int(index_columns(shard)[0][k])
        data[start:start + 16] = b"\0" * 16
    shard.path.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match=rf"{shard.path}: sample 2 does not decode as png"):
        list(_loader(cache, shuffle=False, decode_threads=4))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_decode_threads_out_of_range_is_refused(caches, bad):
    with pytest.raises(ValueError, match="decode_threads must be an int >= 1"):
        _loader(caches["png"], decode_threads=bad)


@pytest.mark.parametrize("options", [dict(normalize=False), dict(normalize=False, channels_last=True),
                                     dict(normalize=True), dict(normalize=True, prefetch=2)])
def test_jpg_payloads_decoded_in_batches_on_the_device_read_as_in_threads(caches, options):
    # decode_on="device": each batch's payloads travel compressed and are decoded in one call on the
    # loader's device (here the CPU, libjpeg-turbo, as the threads use): the same values exactly.
    threads = [(x.clone(), y) for x, y in _loader(caches["jpg"], decode_on="cpu", seed=3, **options)]
    batched = [(x.clone(), y) for x, y in _loader(caches["jpg"], decode_on="device", seed=3, **options)]
    assert len(threads) == len(batched) > 1
    batches = iter(_loader(caches["jpg"], decode_on="device", decode_threads=3, **options))
    next(batches)
    assert not [t for t in threading.enumerate() if t.name.startswith("readers-decode")]  # not decoded in threads
    batches.close()
    for (xa, ya), (xb, yb) in zip(threads, batched):
        assert xa.dtype == xb.dtype and xa.shape == xb.shape and xa.stride() == xb.stride()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_decode_on_is_checked_against_the_cache(caches):
    with pytest.raises(ValueError, match="decode_on='device' decodes JPEGs .* this cache stores png"):
        _loader(caches["png"], decode_on="device")
    with pytest.raises(ValueError, match="decode_on must be one of auto, cpu, device, got 'gpu'"):
        _loader(caches["jpg"], decode_on="gpu")
    assert _loader(caches["png"], decode_on="cpu").decode_on == "cpu"


def test_a_damaged_payload_decoded_on_the_device_is_named(caches, tmp_path):
    cache = shutil.copytree(caches["jpg"], tmp_path / "jpg")
    shard = _loader(cache).manifest.epochs[0][0]
    data = bytearray(shard.path.read_bytes())
    start = int(index_columns(shard)[0][3])
    data[start:start + 64] = b"\0" * 64  # sample 3's JPEG header
    shard.path.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match=rf"{shard.path}: sample 3 does not decode as jpg"):
        list(_loader(cache, shuffle=False, decode_on="device"))
