"""load_manifest: a real cache loads; a missing or damaged manifest is a clear ReaderError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loader_checks import SAMPLES, SHAPE
from readers import ReaderError, load_manifest
from readers.manifest import live_shards


def test_a_built_cache_loads(npy_cache):
    m = load_manifest(npy_cache)
    assert (m.mode, m.encoding, m.shape, m.num_epochs) == ("cached", "npy", SHAPE, 2)
    assert m.npy_header_bytes > 0 and len(m.mean) == len(m.std) == 3
    assert all(m.epoch_samples(e) == SAMPLES for e in range(2))
    shard = m.epochs[0][0]
    assert shard.path.is_file() and shard.path.stat().st_size == shard.bytes
    assert shard.stride is not None and shard.stride >= np.prod(SHAPE)  # fixed-size members
    assert shard.offsets.dtype == np.int64 and len(shard.labels) == shard.samples


def test_missing_manifest_says_how_to_build_one(tmp_path):
    with pytest.raises(ReaderError) as e:
        load_manifest(tmp_path)
    assert str(e.value) == f"no cache at {tmp_path}: manifest.json not found; build one with `cachegen build`"


def _edit(cache: Path, change) -> Path:
    path = cache / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    return cache


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(format_version=2), r"not a cachegen format 1 manifest .*format_version=2"),
    (lambda m: m["image"].update(encoding="webp"), r"image encoding 'webp'"),
    (lambda m: m["image"].update(shape=[32, 32]), r"image shape \[32, 32\]"),
    (lambda m: m.update(std=[0.2, 0.0, 0.2]), r"std .* <= 0"),
    (lambda m: m.update(mean=[0.5]), r"mean \[0.5\] is not 3 numbers"),
    (lambda m: m.update(epochs=5), r"epochs is 5 but epoch_list has 2 entries"),
    (lambda m: m.update(mode="live"), r"a live cache lists 2 cached epochs"),
    (lambda m: m.update(output_shape=[8, 8, 3]), r"output_shape \[8, 8, 3\] differs from the stored image shape"),
    (lambda m: m["epoch_list"][0]["shards"][1]["offsets"].pop(), r"shard-000001.tar: offsets has 49 entries for 50"),
    (lambda m: m["epoch_list"][1]["shards"][0].update(path="../elsewhere.tar"), r"'../elsewhere.tar' is not a path"),
    (lambda m: m["epoch_list"][0]["shards"][0].update(bytes=100), r"outside the file's 100 bytes"),
    (lambda m: m["epoch_list"][0].update(samples=299), r"epoch 0 says 299 samples but its shards hold 300"),
    (lambda m: m.pop("epoch_list"), r"missing or malformed field"),
])
def test_a_damaged_manifest_is_named(damaged_cache, change, message):
    _edit(damaged_cache, change)
    with pytest.raises(ReaderError, match=message):
        load_manifest(damaged_cache)


def test_unreadable_json_is_named(damaged_cache):
    (damaged_cache / "manifest.json").write_text("{not json")
    with pytest.raises(ReaderError, match=r"manifest.json is unreadable or not JSON"):
        load_manifest(damaged_cache)


def test_a_live_manifest_lists_its_source_pass(damaged_cache, npy_cache):
    def to_live(m):
        m.update(mode="live", source_shards=m["epoch_list"][0]["shards"], epoch_list=[])
    _edit(damaged_cache, to_live)
    m = load_manifest(damaged_cache)
    assert (m.mode, m.num_epochs, m.epochs) == ("live", 2, ())
    assert sum(s.samples for s in live_shards(m)) == SAMPLES
    assert sorted(np.concatenate([s.indices for s in live_shards(m)]).tolist()) == list(range(SAMPLES))
    with pytest.raises(ReaderError, match="'cached'-mode cache: it has no source pass"):
        live_shards(load_manifest(npy_cache))


def test_uneven_offsets_have_no_stride(damaged_cache):
    def shift(m):
        shard = m["epoch_list"][0]["shards"][0]
        shard["offsets"][3] += 512  # still inside the file; no longer evenly spaced
    _edit(damaged_cache, shift)
    assert load_manifest(damaged_cache).epochs[0][0].stride is None
