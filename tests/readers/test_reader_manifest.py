"""What the readers make of a cache's manifest and index files. The format's rules and every bad
case are tested once, in tests/format; here: a real cache loads, and a cache that breaks the
format reaches every loader as one ReaderError naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loader_checks import SAMPLES, SHAPE
from readers import CachedLoader, LiveLoader, ReaderError, load_manifest, open_loader
from readers.manifest import live_shards, load_index


def test_a_built_cache_loads(npy_cache):
    m = load_manifest(npy_cache)
    assert (m.mode, m.encoding, m.shape, m.num_epochs) == ("cached", "npy", SHAPE, 2)
    assert m.npy_header_bytes > 0 and len(m.mean) == len(m.std) == 3
    assert all(m.epoch_samples(e) == SAMPLES for e in range(2))
    shard = m.epochs[0][0]
    assert shard.path.is_file() and shard.path.stat().st_size == shard.bytes
    index = load_index(m, shard)
    first, pitch = m.npy_rows()
    assert pitch >= np.prod(SHAPE) and (index.offsets + m.npy_header_bytes == first + pitch * np.arange(50)).all()
    assert index.labels.dtype == np.int64 and len(index.labels) == shard.samples
    with pytest.raises(ReaderError, match="'cached'-mode cache: it has no source pass"):
        live_shards(m)


def test_missing_manifest_says_how_to_build_one(tmp_path):
    with pytest.raises(ReaderError) as e:
        load_manifest(tmp_path)
    assert str(e.value) == f"no cache at {tmp_path}: manifest.json not found; build one with `cachegen build`"


def _loaders(cache):
    return [lambda: CachedLoader(cache, batch_size=32, device="cpu"),
            lambda: open_loader(cache, batch_size=32, device="cpu")]


def test_a_cache_of_the_older_format_says_rebuild(damaged_cache):
    path = damaged_cache / "manifest.json"
    raw = json.loads(path.read_text())
    raw["format_version"] = 1
    path.write_text(json.dumps(raw))
    for make in _loaders(damaged_cache):
        with pytest.raises(ReaderError, match=r"was built by an older cachegen \(format 1.*\): rebuild it"):
            make()


def test_a_damaged_manifest_reaches_every_loader_as_a_reader_error(damaged_cache):
    path = damaged_cache / "manifest.json"
    path.write_bytes(path.read_bytes()[:-1])
    for make in _loaders(damaged_cache):
        with pytest.raises(ReaderError, match=r"manifest.json is unreadable or not JSON"):
            make()


def test_a_damaged_index_is_named_when_its_shard_is_read(damaged_cache):
    shard = load_manifest(damaged_cache).epochs[1][2]
    data = bytearray(shard.index_path.read_bytes())
    data[-3] ^= 0x10  # a label or source index
    shard.index_path.write_bytes(bytes(data))
    loader = CachedLoader(damaged_cache, batch_size=32, device="cpu")
    assert sum(len(x) for x, _ in loader) == SAMPLES  # epoch 0 does not read that shard
    loader.set_epoch(1)
    with pytest.raises(ReaderError, match=rf"index {shard.index_path} fails its sha256 check"):
        list(loader)


def test_a_live_cache_reads_its_labels_from_the_source_index(live_copy):
    cache, shard = live_copy
    shard.index_path.unlink()
    with pytest.raises(ReaderError, match=rf"index {shard.index_path} is missing"):
        next(iter(LiveLoader(cache, batch_size=64, device="cpu", workers=0)))


@pytest.fixture
def live_copy(tmp_path, source):
    from click.testing import CliRunner

    from cachegen.cli import main

    out = tmp_path / "live"
    result = CliRunner().invoke(main, ["build", str(source[0]), "--out", str(out), "--mode", "live", "--epochs", "2",
                                       "--shard-size", "50", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, load_manifest(out).source_shards[2]
