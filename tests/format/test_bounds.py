"""Numbers in a manifest are bounded by file sizes before anything costs O(samples): a shard's bytes
bound its samples (exactly for npy), an index's size is exactly header + rows, and the readers
stat every file before they plan an epoch. An inflated manifest fails in one line with no big
allocation (measured with tracemalloc: memory, not time)."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from cacheformat import FormatError
from cacheformat.index import read_index
from cacheformat.layout import index_bytes, tar_bytes
from cacheformat.manifest import MAX_MANIFEST_BYTES, parse_manifest, read_manifest
from readers import CachedLoader, ReaderError, load_manifest

INFLATED = 30_000_000  # samples claimed by a cache of 240
PEAK = 16 << 20  # bytes: what opening a 20-shard cache may allocate at most (a 30 M sample plan takes > 200 MB)


def inflate(cache: Path, *, sizes: bool) -> None:
    """Claim INFLATED samples in the same 5 shards an epoch, every count consistent with the others;
    with `sizes`, each shard's and index's byte count too (so only the files' real sizes can tell)."""
    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    per_shard = INFLATED // 5
    m["source"]["num_samples"], m["shard_size"], m["skipped"] = INFLATED, per_shard, []
    image = m["image"]
    pitch = 3 * 512 + -(-(image.get("npy_header_bytes", 0) + 32 * 32 * 3) // 512) * 512  # an npy sample
    for epoch in m["epoch_list"]:
        assert len(epoch["shards"]) == 5
        for s in epoch["shards"]:
            s["samples"] = per_shard
            if sizes:
                s["bytes"] = tar_bytes(per_shard * (pitch if image["encoding"] == "npy" else 4 * 512))
                s["index"]["bytes"] = index_bytes(per_shard)
        epoch["samples"] = INFLATED
    path.write_text(json.dumps(m))


def peak_of(fn) -> tuple[BaseException, int]:
    """(what fn raised, the most memory Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned for the test to check
        raised = e
    else:
        raised = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


def one_line(e: BaseException | None, kind: type, *fragments: str) -> None:
    assert isinstance(e, kind) and "\n" not in str(e), repr(e)
    for fragment in fragments:
        assert fragment in str(e), (fragment, str(e))


@pytest.mark.parametrize("name", ["npy", "png"])
def test_samples_the_shard_bytes_cannot_hold_fail_the_manifest(copy, name):
    cache = copy(name)
    inflate(cache, sizes=False)
    raised, peak = peak_of(lambda: CachedLoader(cache, batch_size=8))
    one_line(raised, ReaderError, str(cache / "manifest.json"), "epoch-0000/shard-000000.tar: 6000000 ")
    assert peak < PEAK, peak


@pytest.mark.parametrize("name", ["npy", "png"])
def test_byte_counts_inflated_with_them_fail_on_the_real_file_sizes(copy, name):
    cache = copy(name)
    inflate(cache, sizes=True)
    read_manifest(cache)  # consistent in itself: only the files can tell
    raised, peak = peak_of(lambda: CachedLoader(cache, batch_size=8))
    one_line(raised, ReaderError, f"shard {cache / 'epoch-0000/shard-000000.tar'} is ", "the manifest says",
             "(truncated or replaced)")
    assert peak < PEAK, peak


def test_verify_of_an_inflated_manifest_names_the_shards_without_planning_30m_samples(copy):
    from cachegen.inspect import verify

    cache = copy("png")
    inflate(cache, sizes=True)
    verify(copy("npy"))  # imports and first-use allocations, outside the measure
    result = {}
    raised, peak = peak_of(lambda: result.update(zip(("checked", "problems"), verify(cache))))
    assert raised is None and result["checked"] == 5 and len(result["problems"]) == 5, (raised, result)
    assert all("(truncated or replaced)" in p and "\n" not in p for p in result["problems"])
    assert peak < PEAK, peak


def test_an_index_size_other_than_header_plus_rows_fails_the_manifest(copy):
    cache = copy()
    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    m["epoch_list"][0]["shards"][1]["index"]["bytes"] = 2**40
    path.write_text(json.dumps(m))
    with pytest.raises(FormatError) as e:
        read_manifest(cache)
    one_line(e.value, FormatError, "epoch-0000/shard-000001.tar: the index of 50 samples is 1728 bytes, not 1099511627776")


def test_an_index_recorded_as_two_to_the_40_bytes_is_read_to_its_real_size(copy):
    # Counts inflated to match (2**35 samples: an index of ~2**40 bytes) pass the manifest's own
    # checks; reading the index is bounded by its file, not by the number: one line, no MemoryError.
    cache = copy("png")
    raw = json.loads((cache / "manifest.json").read_text())
    n = 2**35
    shard = raw["epoch_list"][0]["shards"][0]
    shard.update(samples=n, bytes=tar_bytes(n * 4 * 512))
    shard["index"]["bytes"] = index_bytes(n)
    raw["epoch_list"][0]["samples"] += n - 50
    raw["source"]["num_samples"] += n - 50
    raw["shard_size"] = n
    m = parse_manifest(raw, cache)
    raised, peak = peak_of(lambda: read_index(m, m.epochs[0][0]))
    one_line(raised, FormatError, f"index {cache / 'epoch-0000/shard-000000.idx'} is 1728 bytes, "
                                  f"the manifest says {index_bytes(n)}")
    assert peak < PEAK, peak
    with pytest.raises(ReaderError, match="truncated or replaced"):
        load_manifest_of(raw, cache)


def load_manifest_of(raw: dict, cache: Path):
    (cache / "manifest.json").write_text(json.dumps(raw))
    return load_manifest(cache)


def test_an_npy_shard_size_is_exact(copy):
    cache = copy()
    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    m["epoch_list"][0]["shards"][0]["bytes"] += 10240  # whole records more: a png shard could be that size
    path.write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"shard-000000.tar: 50 npy samples make a \d+-byte shard, not \d+"):
        read_manifest(cache)


def test_a_manifest_bigger_than_any_manifest_is_not_read(copy):
    cache = copy()
    os.truncate(cache / "manifest.json", MAX_MANIFEST_BYTES + 1)  # sparse: nothing written, nothing read
    raised, peak = peak_of(lambda: read_manifest(cache))
    one_line(raised, FormatError, f"is {MAX_MANIFEST_BYTES + 1} bytes, more than any manifest")
    assert peak < PEAK, peak


def test_a_normal_cache_opens_and_its_files_are_stat_checked(copy):
    cache = copy()
    assert len(load_manifest(cache).all_shards()) == 10
    index = cache / "epoch-0001/shard-000002.idx"
    index.write_bytes(index.read_bytes() + b"\0")
    with pytest.raises(ReaderError, match=rf"index {index} is 1729 bytes, the manifest says 1728 \(cut or replaced\)"):
        load_manifest(cache)


def test_a_payload_too_small_for_the_manifests_shape_is_refused_before_decoding():
    """A shape a payload cannot hold (more pixels than MAX_EXPANSION times its bytes): refused from the
    sizes alone, so a manifest cannot make a png/jpg decode allocate what no file bounds."""
    from cacheformat.payload import MAX_EXPANSION, decode_payload

    payload = b"\xff\xd8" + bytes(998)
    side = int((MAX_EXPANSION * len(payload) / 3) ** 0.5) + 1
    for encoding in ("png", "jpg"):
        with pytest.raises(FormatError, match=f"1000 bytes cannot hold a {side}x{side} 3-channel image"):
            decode_payload(payload, encoding, (side, side, 3), where="s: sample 0")


@pytest.mark.parametrize("forged,says", [
    (lambda jpg: jpg[:2] + b"\xff\xfe\x00\x04ab" * 70 + jpg[2:], "more than 64 segments"),
    (lambda jpg: jpg.replace(b"\xff\xc0", b"\xff\xc1\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00\xff\xc0", 1),
     "2 frame headers"),
    (lambda jpg: jpg[:jpg.index(b"\xff\xc0")] + b"\xff\xd9", "ends before its image data"),
    (lambda jpg: jpg[:2] + b"\xff\xff\xff" + jpg[3:], None),  # fill bytes before a marker: a valid JPEG
])
def test_jpeg_headers_are_walked_bounded(forged, says):
    import numpy as np
    import torch
    from torchvision.io import encode_jpeg

    from cacheformat.payload import jpeg_problem

    pixels = torch.from_numpy(np.full((3, 16, 16), 90, np.uint8))
    jpg = encode_jpeg(pixels).numpy().tobytes()
    assert jpeg_problem(jpg, (16, 16, 3)) is None and "says 16x16, the manifest 8x16" in jpeg_problem(jpg, (16, 8, 3))
    problem = jpeg_problem(forged(jpg), (16, 16, 3))
    assert problem is None if says is None else says in problem, problem


def test_missing_shards_claiming_30m_samples_fail_the_open_before_any_plan(copy):
    """A missing file bounds nothing: it fails the open (a stat each), before an epoch of the
    claimed 30 M samples is planned (the plan of one shard's 6 M alone takes 48 MB)."""
    cache = copy("npy")
    inflate(cache, sizes=True)
    for path in [*cache.glob("epoch-*/*.tar"), *cache.glob("epoch-*/*.idx")]:
        path.unlink()
    raised, peak = peak_of(lambda: next(iter(CachedLoader(cache, batch_size=8, device="cpu"))))
    one_line(raised, ReaderError, f"shard {cache / 'epoch-0000/shard-000000.tar'} is missing (the manifest lists it)")
    assert peak < PEAK, peak
