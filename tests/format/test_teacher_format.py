"""The teacher block of a reinforced cache's manifest, checked by the contract: every bad case one
line naming manifest.json; and an index that does not leave room for the teacher members the
manifest promises is refused before any byte of a shard is read."""

from __future__ import annotations

import json

import pytest

from cacheformat import FormatError
from cacheformat.manifest import read_manifest
from cacheformat.teacher import payload_bytes
from tests.format.conftest import CLASSES


def block(**changes) -> dict:
    good = {"spec": "teacher.py:make", "factory_sha256": "0" * 64, "weights_sha256": "0" * 64, "topk": 3,
            "classes": CLASSES, "device": "cpu", "batch": 64, "member": "teacher.npy",
            "record": "[('class', '<i4'), ('prob', '<f2')]", "payload_bytes": payload_bytes(3)}
    return {**good, **changes}


FAULTS = {
    "not an object": ([1, 2], "teacher is not an object"),
    "topk 0": (block(topk=0), "teacher topk 0 / classes 4 are not counts with topk <= classes"),
    "topk over the classes": (block(topk=5, payload_bytes=payload_bytes(5)), "topk 5 / classes 4"),
    "topk true": (block(topk=True), "teacher topk True"),
    "another class count": (block(classes=10), "teacher classes 10 is not the cache's 4 classes"),
    "another member": (block(member="soft.npy"), "teacher member 'soft.npy' of .* is not teacher.npy"),
    "member size edited": (block(payload_bytes=2**40), f"of 1099511627776 bytes is not teacher.npy of {payload_bytes(3)}"),
    "spec a number": (block(spec=3), "teacher spec / device is not text"),
}


def _edit(path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_teacher_block_is_one_line_naming_the_manifest(copy, fault):
    cache = copy()
    value, message = FAULTS[fault]
    _edit(cache / "manifest.json", lambda m: m.update(teacher=value))
    with pytest.raises(FormatError, match=message) as e:
        read_manifest(cache)
    assert "\n" not in str(e.value) and str(cache / "manifest.json") in str(e.value)


def test_a_live_cache_with_teacher_targets_is_refused(copy):
    cache = copy("live")
    _edit(cache / "manifest.json", lambda m: m.update(teacher=block()))
    with pytest.raises(FormatError, match="a live cache has teacher targets"):
        read_manifest(cache)


def test_a_teacher_block_added_to_a_plain_npy_cache_fails_its_size_checks(copy):
    """The manifest says every sample has a teacher member after its image; the shards have none:
    the npy pitch no longer fits the shards' recorded sizes, so the manifest itself is refused, in
    one line, before any index or shard is read."""
    cache = copy("npy")
    _edit(cache / "manifest.json", lambda m: m.update(teacher=block()))
    with pytest.raises(FormatError, match=r"shard epoch-0000/shard-000000\.tar: 50 npy samples make a \d+-byte "
                                          r"shard, not \d+"):
        read_manifest(cache)


def test_a_teacher_block_added_to_a_plain_png_cache_is_refused_where_the_members_would_be(copy):
    """In a png shard the index still fits (the next sample's label lies where a member would), so
    the reader checks each member's npy header before using it: targets='teacher' refuses the
    shard in one line, and the images and labels still read."""
    from readers import CachedLoader, ReaderError

    cache = copy("png")
    _edit(cache / "manifest.json", lambda m: m.update(teacher=block()))
    with pytest.raises(ReaderError, match=r"no teacher member of 3 records after sample \d+'s image"):
        list(CachedLoader(cache, batch_size=32, device="cpu", targets="teacher"))
    assert sum(len(y) for _, y in CachedLoader(cache, batch_size=32, device="cpu")) == 240


def test_classes_beyond_the_stated_multiple_of_the_top_k_are_refused(copy):
    """3 M class names (12 MB of manifest) with a top-1 teacher: a reader would scatter every sample's
    one record into 3 M float32 per batch row. Refused: at most MAX_CLASSES_PER_RECORD per record."""
    from cacheformat.teacher import MAX_CLASSES_PER_RECORD

    cache = copy()
    n = 3_000_000

    def forge(m):
        m["classes"] = [f"c{i}" for i in range(n)]
        m["teacher"] = block(topk=1, classes=n, payload_bytes=payload_bytes(1))
    _edit(cache / "manifest.json", forge)
    with pytest.raises(FormatError, match=f"3000000 classes are more than {MAX_CLASSES_PER_RECORD}x the teacher's "
                                          "top-1 .*store a top-733 or more") as e:
        read_manifest(cache)
    assert "\n" not in str(e.value)
    # At the bound itself: refused for other reasons (the plain cache has no teacher members), not this.
    _edit(cache / "manifest.json", lambda m: m["teacher"].update(classes=MAX_CLASSES_PER_RECORD, topk=1) or
          m.update(classes=m["classes"][:MAX_CLASSES_PER_RECORD]))
    with pytest.raises(FormatError) as e:
        read_manifest(cache)
    assert "more than" not in str(e.value), str(e.value)
