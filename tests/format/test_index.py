"""A shard's index file, checked in one place (cacheformat.index): a cut, flipped, missing or
foreign index is caught by its size and checksum; a consistent hand edit (the manifest's checksum
updated too) by the format's rules. Each case once, a FormatError naming the index file."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest

from cacheformat import FormatError
from cacheformat.index import COLUMNS, encode_index, read_index
from cacheformat.manifest import read_manifest
from tests.format.conftest import CLASSES, SAMPLES

SHARD = "epoch-0000/shard-000001.tar"
INDEX = "epoch-0000/shard-000001.idx"


def _rewrite(cache, data: bytes) -> None:
    """Replace the index and record its size and checksum in the manifest: a consistent edit."""
    (cache / INDEX).write_bytes(data)
    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    entry = next(s for e in m["epoch_list"] for s in e["shards"] if s["path"] == SHARD)
    entry["index"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(m))


def _table(change):
    def edit(cache) -> None:
        table = np.load(cache / INDEX)
        table = change(table.copy())
        out = io.BytesIO()
        np.save(out, table)
        _rewrite(cache, out.getvalue())
    return edit


def _set(row: int, column: str, value):
    def change(t):
        t[row, COLUMNS.index(column)] = value
        return t
    return change


def _shift(row: int, by: int):
    def change(t):
        t[row, 0] += by
        return t
    return change


def _swap(t):
    t[[0, 1], 0] = t[[1, 0], 0]
    return t


def _foreign(cache) -> None:
    shutil.copy(cache.parent / "other" / INDEX, cache / INDEX)


FAULTS = {  # fault: (damage, what the error says)
    "missing": (lambda c: (c / INDEX).unlink(), "is missing"),
    "cut by a byte": (lambda c: (c / INDEX).write_bytes((c / INDEX).read_bytes()[:-1]), "bytes, the manifest says"),
    "one byte longer": (lambda c: (c / INDEX).write_bytes((c / INDEX).read_bytes() + b"\0"), "more than"),
    "a byte flipped": (lambda c: (c / INDEX).write_bytes(_flip((c / INDEX).read_bytes(), 200)), "sha256 check"),
    "from another cache": (_foreign, "sha256 check"),
    # consistent edits: the checksum matches, the contents break the format
    # (of the size the manifest's sample count makes: another size fails the manifest, test_bounds.py)
    "not .npy": (lambda c: _rewrite(c, b"offsets,sizes\n1,2\n".ljust((c / INDEX).stat().st_size)), "not a .npy array"),
    "float columns": (lambda c: _rewrite(c, encode_float(c)), "not int64"),
    "rows missing, a column more": (_table(lambda t: np.concatenate([t, t[:, :1]], axis=1)[:40]),  # same size
                                    r"shape \(40, 5\), not int64 \(50, 4\)"),
    "offset past the end": (_table(_set(49, "offset", 10**9)), "a sample lies outside the shard"),
    "offset negative": (_table(_set(5, "offset", -512)), "a sample lies outside the shard"),
    "offsets swapped": (_table(_swap), "overlap or are out of order"),
    "offset moved inside the file": (_table(_shift(7, 512)), "are not .* every .* bytes"),
    "size edited": (_table(_set(3, "size", 100)), "are not .*-byte payloads"),
    "label past the classes": (_table(_set(3, "label", CLASSES)), rf"labels run \d\.\.{CLASSES}, outside the"),
    "label negative": (_table(_set(3, "label", -1)), r"labels run -1\.\.\d"),
    "source index past the source": (_table(_set(0, "index", SAMPLES)), rf"source indices run .*\.\.{SAMPLES}"),
}


def _flip(data: bytes, at: int) -> bytes:
    data = bytearray(data)
    data[at] ^= 0x55
    return bytes(data)


def encode_float(cache) -> bytes:
    out = io.BytesIO()
    np.save(out, np.load(cache / INDEX).astype(np.float64))
    return out.getvalue()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_index_is_one_line_naming_it(copy, fault):
    cache = copy()
    copy("other")
    damage, message = FAULTS[fault]
    damage(cache)
    m = read_manifest(cache)
    shard = next(s for s in m.epochs[0] if s.relpath == SHARD)
    with pytest.raises(FormatError, match=message) as e:
        read_index(m, shard)
    assert str(cache / INDEX) in str(e.value) and "\n" not in str(e.value)


def test_an_index_holds_what_the_tar_holds(built):
    # Columns as written: each payload's offset and size, label and source index, against tarfile.
    import tarfile

    m = read_manifest(built["png"])
    for shard in m.epochs[0]:
        index = read_index(m, shard)
        with tarfile.open(shard.path) as tar:
            members = tar.getmembers()
        images, labels = members[1::2], members[0::2]
        assert index.offsets.tolist() == [i.offset_data for i in images]
        assert index.sizes.tolist() == [i.size for i in images]
        with tarfile.open(shard.path) as tar:
            assert index.labels.tolist() == [int(tar.extractfile(c).read()) for c in labels]
        assert index.indices.tolist() == [int(i.name.split(".")[0].rpartition("_")[2]) for i in images]


def test_encode_index_is_deterministic_npy():
    data = encode_index([1536, 6656], [3200, 3200], [1, 0], [7, 3])
    assert data == encode_index(np.array([1536, 6656]), [3200, 3200], [1, 0], [7, 3])
    table = np.load(io.BytesIO(data))
    assert table.dtype == np.dtype("<i8") and table.tolist() == [[1536, 3200, 1, 7], [6656, 3200, 0, 3]]
