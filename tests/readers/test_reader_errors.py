"""Clear errors: no cache, a missing, truncated or corrupted shard, too many ranks, bad options."""

from __future__ import annotations

import json

import pytest

from loader_checks import index_columns

from readers import CachedLoader, ReaderError


def _loader(cache, **kw) -> CachedLoader:
    return CachedLoader(cache, **{"batch_size": 32, "device": "cpu", "shuffle": False, **kw})


def _first_shard(cache):
    return _loader(cache).manifest.epochs[0][0]


def test_no_cache(tmp_path):
    with pytest.raises(ReaderError, match=r"no cache at .*: manifest.json not found; build one with `cachegen build`"):
        CachedLoader(tmp_path / "nowhere", batch_size=8)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_missing_shard_is_named(damaged_cache, prefetch):
    shard = _first_shard(damaged_cache)
    loader = _loader(damaged_cache, prefetch=prefetch)
    shard.path.unlink()
    with pytest.raises(ReaderError, match=rf"shard {shard.path} is missing") as e:
        list(loader)
    if prefetch:  # raised in the reader thread, re-raised here, saying so
        assert any("background thread" in note for note in getattr(e.value, "__notes__", []))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_truncated_shard_is_named_with_its_sizes(damaged_cache, prefetch):
    shard = _first_shard(damaged_cache)
    with open(shard.path, "r+b") as f:
        f.truncate(shard.bytes - 1000)
    with pytest.raises(ReaderError, match=rf"shard {shard.path} is {shard.bytes - 1000} bytes, "
                                          rf"the manifest says {shard.bytes} \(truncated"):
        list(_loader(damaged_cache, prefetch=prefetch))


def test_corrupted_shard_fails_verify(damaged_cache):
    shard = _first_shard(damaged_cache)
    data = bytearray(shard.path.read_bytes())
    data[int(index_columns(shard)[0][3]) + 200] ^= 0xFF  # one pixel of sample 3
    shard.path.write_bytes(bytes(data))
    assert len(list(_loader(damaged_cache))) == 10  # unverified, the bad pixel goes through
    with pytest.raises(ReaderError, match=rf"shard {shard.path} fails its sha256 check"):
        list(_loader(damaged_cache, verify=True))


def test_shard_that_does_not_match_the_manifest(damaged_cache):
    shard = _first_shard(damaged_cache)
    data = bytearray(shard.path.read_bytes())
    data[int(index_columns(shard)[0][0]):int(index_columns(shard)[0][0]) + 6] = b"\0" * 6
    shard.path.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match=rf"shard {shard.path}: no .npy payload at offset {int(index_columns(shard)[0][0])}"):
        list(_loader(damaged_cache))


def test_a_missing_shard_is_named_before_the_epoch_starts(damaged_cache):
    # Sizes are checked once an epoch, for every shard the rank will read: a missing one ends the
    # epoch before its first batch, not after a part of it trained.
    loader = _loader(damaged_cache, shuffle_window=1, prefetch=2)
    loader.manifest.epochs[0][-1].path.unlink()
    got = []
    with pytest.raises(ReaderError, match="shard-000005.tar is missing"):
        for x, _ in loader:
            got.append(len(x))
    assert got == []


def test_a_shard_deleted_during_an_epoch_is_named_when_reached(damaged_cache):
    loader = _loader(damaged_cache, shuffle_window=1, prefetch=2)
    got = []
    with pytest.raises(ReaderError, match="shard-000005.tar is missing"):
        for x, _ in loader:
            if not got:
                loader.manifest.epochs[0][-1].path.unlink()  # after the epoch's check, before it is mapped
            got.append(len(x))
    assert 0 < sum(got) <= 250  # the batches before the last shard


@pytest.mark.parametrize(("options", "message"), [
    ({"world_size": 400, "rank": 0}, r"world_size 400 is larger than the 300 samples of an epoch"),
    ({"world_size": 16, "rank": 3, "drop_last": True, "batch_size": 32},
     r"world_size 16 is too large for batch_size 32 with drop_last: 300 samples give 18 per rank"),
])
def test_too_many_ranks_name_the_numbers(npy_cache, options, message):
    with pytest.raises(ReaderError, match=message):
        _loader(npy_cache, **options)


def test_a_live_cache_is_refused(damaged_cache):
    path = damaged_cache / "manifest.json"
    raw = json.loads(path.read_text())
    source = raw["epoch_list"][0]["shards"]
    path.write_text(json.dumps({**raw, "mode": "live", "epoch_list": [], "source_shards": source}))
    with pytest.raises(ReaderError, match="is a 'live'-mode cache: read it with LiveLoader"):
        _loader(damaged_cache)


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"shuffle_window": 0}, "shuffle_window must be an int >= 1"),
    ({"device": "meta"}, "device 'meta' is not supported"),
])
def test_bad_options_are_quoted(npy_cache, options, message):
    with pytest.raises(ValueError, match=message):
        _loader(npy_cache, **options)


def test_set_epoch_checks_its_argument(npy_cache):
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        _loader(npy_cache).set_epoch(-1)
