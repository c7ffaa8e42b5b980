"""The shard writer: plain tar that tarfile, webdataset and `tar` read, byte-identical to webdataset's
TarWriter (what cachegen wrote before it built headers itself), with the manifest entry it returns."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import webdataset as wds

import cachegen.shards
from cachegen.shards import (_member_header, encode, index_shard, npy_header_bytes, sample_key, tar_header,
                             write_shard)

SHAPE = (32, 32, 3)


def samples(n: int, shape=SHAPE, seed: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """n (source index, label, image) triples; labels of 1 to 5 digits, indices out of order."""
    rng = np.random.default_rng(seed)
    indices = rng.permutation(10 * n + 1)[:n].tolist()
    labels = [int(x) for x in rng.integers(0, 10 ** rng.integers(1, 6, n))]
    return [(i, c, rng.integers(0, 256, shape, dtype=np.uint8)) for i, c in zip(indices, labels)]


def tarwriter_bytes(prefix: str, items, encoding: str) -> bytes:
    """The same samples through webdataset's TarWriter, configured as cachegen's writer used to be."""
    out = io.BytesIO()
    with wds.TarWriter(out, encoder=False, mtime=0, user="cachegen", group="cachegen") as writer:
        writer.tarstream.format = tarfile.USTAR_FORMAT
        for index, label, image in items:
            writer.write({"__key__": sample_key(prefix, index), "cls": str(label).encode(),
                          encoding: encode(image, encoding)})
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, 5, 511, 512, 513, 3200, 150_656, 8 ** 11 - 1])
@pytest.mark.parametrize("name", ["e0000_00000000.cls", "e9999_99999999.npy", "src_00001234.png", "x", "a" * 100])
def test_member_headers_are_the_standard_library_headers(name, size):
    header = _member_header(name, size)
    assert header == tar_header(name, size) and len(header) == tarfile.BLOCKSIZE
    info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")  # checks the checksum
    assert (info.name, info.size, info.mtime, info.mode, info.uname, info.gname, info.uid, info.gid) == (
        name, size, 0, 0o444, "cachegen", "cachegen", 0, 0)


def test_a_name_too_long_for_ustar_is_left_to_tarfile():
    name = "d" * 60 + "/" + "n" * 60
    assert _member_header(name, 7) == tar_header(name, 7)  # prefix + name, as tarfile splits it
    with pytest.raises(ValueError):
        _member_header("n" * 101, 7)


@pytest.mark.parametrize("encoding,n,shape", [("npy", 0, SHAPE), ("npy", 1, SHAPE), ("npy", 37, SHAPE), ("npy", 150, SHAPE),
                                              ("npy", 5, (7, 5, 1)), ("npy", 3, (300, 200, 3)),
                                              ("png", 9, SHAPE), ("jpg", 9, SHAPE)])
def test_shard_is_byte_identical_to_webdataset_tarwriter_and_reads_back(tmp_path, encoding, n, shape):
    items = samples(n, shape, seed=n)
    entry = write_shard(tmp_path, "shard.tar", "e0003", iter(items), encoding)
    data = (tmp_path / "shard.tar").read_bytes()
    assert data == tarwriter_bytes("e0003", items, encoding)
    assert not list(tmp_path.glob("*.tmp-*"))

    # The entry the manifest stores: what the bytes are, where each payload lies.
    assert list(entry) == ["path", "samples", "bytes", "sha256", "offsets", "sizes", "labels", "indices"]
    assert entry["path"] == "shard.tar" and entry["samples"] == n
    assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["labels"] == [c for _, c, _ in items] and entry["indices"] == [i for i, _, _ in items]
    payloads = [encode(image, encoding) for _, _, image in items]
    assert entry["sizes"] == [len(p) for p in payloads]
    assert [data[o:o + s] for o, s in zip(entry["offsets"], entry["sizes"])] == payloads
    if encoding == "npy":
        assert entry == index_shard(tmp_path, "shard.tar", encoding, shape)

    # What Python's tarfile reads back: names, payloads, fixed metadata, in order.
    with tarfile.open(tmp_path / "shard.tar") as tar:
        members = tar.getmembers()
        read = [(m.name, tar.extractfile(m).read()) for m in members]
    expected = []
    for (index, label, _), payload in zip(items, payloads):
        key = sample_key("e0003", index)
        expected += [(f"{key}.cls", str(label).encode()), (f"{key}.{encoding}", payload)]
    assert read == expected
    assert all((m.mtime, m.mode, m.uname, m.gname, m.type) == (0, 0o444, "cachegen", "cachegen", tarfile.REGTYPE)
               for m in members)
    assert [m.offset_data for m in members[1::2]] == entry["offsets"]
    assert len(data) % tarfile.RECORDSIZE == 0


def test_groups_cut_by_pixel_bytes_write_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(cachegen.shards, "GROUP_BYTES", 5000)  # groups of 2 samples of 3072 pixel bytes
    items = samples(7)
    groups = list(cachegen.shards._groups(iter(items)))
    assert [len(g) for g in groups] == [2, 2, 2, 1] and [s for g in groups for s in g] == items
    write_shard(tmp_path, "shard.tar", "e0000", iter(items), "npy")
    assert (tmp_path / "shard.tar").read_bytes() == tarwriter_bytes("e0000", items, "npy")


def test_webdataset_decodes_what_was_written(tmp_path):
    items = samples(20)
    write_shard(tmp_path, "shard.tar", "e0000", iter(items), "npy")
    decoded = list(wds.WebDataset(str(tmp_path / "shard.tar"), shardshuffle=False).decode()
                   .to_tuple("__key__", "cls", "npy"))
    assert [k for k, _, _ in decoded] == [sample_key("e0000", i) for i, _, _ in items]
    assert [c for _, c, _ in decoded] == [c for _, c, _ in items]
    assert all(np.array_equal(got, image) for (_, _, got), (_, _, image) in zip(decoded, items))


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command")
def test_tar_lists_what_was_written(tmp_path):
    items = samples(4)
    write_shard(tmp_path, "shard.tar", "e0000", iter(items), "npy")
    listed = subprocess.run(["tar", "tf", str(tmp_path / "shard.tar")], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == [f"{sample_key('e0000', i)}.{ext}" for i, _, _ in items for ext in ("cls", "npy")]


def test_non_contiguous_images_are_written_as_their_pixels(tmp_path):
    image = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    items = [(0, 1, image[:, ::-1]), (1, 2, np.asfortranarray(image))]
    entry = write_shard(tmp_path, "shard.tar", "e0000", iter(items), "npy")
    data = (tmp_path / "shard.tar").read_bytes()
    header = npy_header_bytes(image.shape)
    got = [np.frombuffer(data, np.uint8, image.size, o + header).reshape(image.shape) for o in entry["offsets"]]
    assert np.array_equal(got[0], image[:, ::-1]) and np.array_equal(got[1], image)
    assert data == tarwriter_bytes("e0000", items, "npy")


def test_a_failing_sample_leaves_nothing_behind(tmp_path):
    def failing():
        yield from samples(3)
        raise RuntimeError("transform failed")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path, "shard.tar", "e0000", failing(), "npy")
    assert list(tmp_path.iterdir()) == []
