"""The manifest's schema, checked in one place (cacheformat.manifest) for both sides: every bad
case once, each a FormatError of one line naming manifest.json and what is wrong."""

from __future__ import annotations

import json

import pytest

from cacheformat import FormatError
from cacheformat.manifest import FORMAT_VERSION, read_manifest
from tests.format.conftest import SAMPLES, SHARD_SIZE


def _shard(epoch: int, k: int, change):
    return lambda m: change(m["epoch_list"][epoch]["shards"][k])


# (edit of the parsed manifest, or the new bytes / a cut; what the error says)
FAULTS = {
    "cut to 0 bytes": (b"", "is unreadable or not JSON"),
    "cut to half": (0.5, "is unreadable or not JSON"),
    "last byte lost": (-1, "is unreadable or not JSON"),
    "not UTF-8": (b'{"format": "cachegen\xff"}', "is unreadable or not JSON"),
    "nested 100000 deep": (b"[" * 100000 + b"]" * 100000, r"is unreadable or not JSON \(Recursion"),
    "not an object": (b"[1, 2, 3]", "is not a JSON object"),
    "another format": (lambda m: m.update(format="ffcv"), "is not a cachegen manifest"),
    "format 1 (older)": (lambda m: m.update(format_version=1), "was built by an older cachegen .*rebuild it"),
    "a newer format": (lambda m: m.update(format_version=FORMAT_VERSION + 1), "built by a newer cachegen"),
    "version true": (lambda m: m.update(format_version=True), "is not a cachegen manifest"),
    "a field deleted": (lambda m: m.pop("skipped"), "missing or malformed field: KeyError: 'skipped'"),
    "mode unknown": (lambda m: m.update(mode="lazy"), "mode 'lazy' is not one of cached, live"),
    "seed negative": (lambda m: m.update(seed=-1), "seed -1 is not a count"),
    "epochs a float": (lambda m: m.update(epochs=2.0), "epochs 2.0 .* is not a count"),
    "a text field a number": (lambda m: m.update(created_by=3), "a text field is not text"),
    "transform size 0": (lambda m: m["transform"].update(size=0), "transform size 0"),
    "factory checksum not hex": (lambda m: m["transform"].update(factory_sha256="x"), "factory_sha256 or versions"),
    "versions not strings": (lambda m: m.update(versions={"torch": 2}), "factory_sha256 or versions"),
    "factory checksum deleted": (lambda m: m["transform"].pop("factory_sha256"), "KeyError: 'factory_sha256'"),
    "versions deleted": (lambda m: m.pop("versions"), "KeyError: 'versions'"),
    "stats_from a number": (lambda m: m.update(stats_from=3), "stats_from 3 is not the path"),
    "augment_on unknown": (lambda m: m["transform"].update(augment_on="gpu"), "augment_on 'gpu' is not one of cpu"),
    "augment_on auto, cached": (lambda m: m["transform"].update(augment_on="auto"), r"\(auto: a live cache only\)"),
    "augment_device unknown": (lambda m: m["transform"].update(augment_on="device", augment_device="tpu"),
                               "augment_device 'tpu' is not one of cpu, cuda"),
    "augment_device, per sample": (lambda m: m["transform"].update(augment_device="cuda"),
                                   r"augment_device 'cuda' .*\(a cached build augmented on the device only\)"),
    "encoding webp": (lambda m: m["image"].update(encoding="webp"), "image encoding 'webp'"),
    "image shape 2-d": (lambda m: m["image"].update(shape=[32, 32]), r"image shape \[32, 32\]"),
    "dtype float": (lambda m: m["image"].update(dtype="float32"), "image dtype/layout 'float32'/'HWC'"),
    "npy header 0": (lambda m: m["image"].update(npy_header_bytes=0), "npy_header_bytes 0"),
    "output shape differs": (lambda m: m.update(output_shape=[8, 8, 3]), r"output_shape \[8, 8, 3\] differs"),
    "classes not a list": (lambda m: m.update(classes=None), "classes None is not a list"),
    "classes empty": (lambda m: m.update(classes=[]), r"classes \[\] is not a list"),
    "mean one channel": (lambda m: m.update(mean=[0.5]), r"mean \[0.5\] is not 3 numbers"),
    "std zeroed": (lambda m: m.update(std=[0.2, 0.0, 0.2]), r"std .* outside \[1e-09, 1\] \(std <= 0\)"),
    "mean a string": (lambda m: m.update(mean=["0.5", 0.5, 0.5]), "mean .* is not 3 numbers"),
    "mean a huge integer": (lambda m: m.update(mean=[10**400, 0.5, 0.5]), r"mean .* has a value outside \[0, 1\]"),
    "skipped unsorted": (lambda m: m.update(skipped=[5, 3]), "skipped is not a sorted list"),
    "skipped past the source": (lambda m: m.update(skipped=[SAMPLES]), "skipped is not a sorted list"),
    "fingerprints one short": (lambda m: m["epoch_fingerprints"].pop(), "epoch_fingerprints is not 2"),
    "epochs edited": (lambda m: m.update(epochs=5, epoch_fingerprints=["x"] * 5), "epochs is 5 but epoch_list has 2"),
    "live with cached epochs": (lambda m: m.update(mode="live", source_shards=[]), "a live cache lists 2 cached epochs"),
    "epoch numbers swapped": (lambda m: m["epoch_list"].reverse(), r"epoch_list\[0\] is not epoch 0"),
    "epoch count edited": (lambda m: m["epoch_list"][0].update(samples=239), "epoch 0 says 239 samples"),
    "num_samples edited": (lambda m: m["source"].update(num_samples=241), "epoch 0 holds 240 samples, not the 241"),
    "shard samples over shard_size": (lambda m: m.update(shard_size=40), "more than shard_size 40"),
    "shard path out of the cache": (_shard(1, 0, lambda s: s.update(path="../elsewhere.tar")),
                                    "shard path '../elsewhere.tar' is not a .tar path inside"),
    "shard path absolute": (_shard(0, 1, lambda s: s.update(path="/etc/passwd.tar")), "is not a .tar path inside"),
    "shard path not a tar": (_shard(0, 1, lambda s: s.update(path="epoch-0000/shard-000001.idx")),
                             "is not a .tar path inside"),
    "a shard listed twice": (_shard(0, 1, lambda s: s.update(path="epoch-0000/shard-000000.tar")),
                             "shard epoch-0000/shard-000000.tar is listed twice"),
    "shard samples negative": (_shard(0, 2, lambda s: s.update(samples=-1)), "samples -1 / bytes .* are not counts"),
    "shard bytes 2^70": (_shard(0, 2, lambda s: s.update(bytes=2**70)), "shard epoch-0000/shard-000002.tar: samples"),
    "sha256 not hex": (_shard(0, 3, lambda s: s.update(sha256="z" * 64)), "sha256 'zzz.*' is not a sha256"),
    "index sha256 short": (_shard(0, 3, lambda s: s["index"].update(sha256="ab")), "index sha256 'ab' is not"),
    "index bytes 0": (_shard(0, 4, lambda s: s["index"].update(bytes=0)), "index bytes 0 is not a count"),
    "index record gone": (_shard(0, 4, lambda s: s.pop("index")), "KeyError: 'index'"),
    "pixel sums not counts": (_shard(0, 0, lambda s: s.update(pixel_sum=[1.5, 2, 3])), "pixel statistics"),
    # Sides no stored image justifies (MAX_SCALE x its longest side): preview's and bench's Resize of
    # the originals, the live transform's size.
    "transform resize 16000": (lambda m: m["transform"].update(resize=16000),
                               "transform resize 16000 is more than 8x the stored images' longest side 32"),
    "transform size 20000": (lambda m: m["transform"].update(size=20000), "transform size 20000 is more than 8x"),
}


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["transform"].update(size=20000), "transform size 20000 is more than 8x the stored images' longest"),
    (lambda m: m.update(output_shape=[60000, 60000, 3]), "output_shape height 60000 is more than 8x"),
    (lambda m: m.update(output_shape=[32, 32, 4000], mean=[0.5] * 4000, std=[0.2] * 4000),
     "output_shape has 4000 channels, more than 4"),
])
def test_a_live_cache_asks_for_no_side_its_stored_images_do_not_justify(copy, edit, message):
    """In a live cache no file bounds what the transform makes: the stored images do."""
    cache = copy("live")
    _damage(cache / "manifest.json", edit)
    with pytest.raises(FormatError, match=message) as e:
        read_manifest(cache)
    assert "\n" not in str(e.value)


def _damage(path, edit) -> None:
    text = path.read_bytes()
    if isinstance(edit, bytes):
        text = edit
    elif isinstance(edit, (int, float)):
        text = text[:int(len(text) * edit)] if isinstance(edit, float) else text[:edit]
    else:
        raw = json.loads(text)
        edit(raw)
        text = json.dumps(raw).encode()
    path.write_bytes(text)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_manifest_is_one_line_naming_it(copy, fault):
    cache = copy()
    path = cache / "manifest.json"
    edit, message = FAULTS[fault]
    _damage(path, edit)
    with pytest.raises(FormatError, match=message) as e:
        read_manifest(cache)
    text = str(e.value)
    assert "\n" not in text and (str(path) in text or str(cache) in text), text


def test_a_good_manifest_reads_and_lists_shards_not_samples(built):
    m = read_manifest(built["npy"])
    assert (m.mode, m.encoding, m.num_epochs, m.num_samples, m.shard_size) == ("cached", "npy", 2, SAMPLES, SHARD_SIZE)
    assert [s.samples for s in m.epochs[0]] == [50, 50, 50, 50, 40]
    assert all(s.index_path.is_file() and s.index_path.stat().st_size == s.index_bytes for s in m.all_shards())
    raw = json.loads((built["npy"] / "manifest.json").read_text())
    assert not {"offsets", "sizes", "labels", "indices"} & set(raw["epoch_list"][0]["shards"][0])
    live = read_manifest(built["live"])
    assert (live.mode, live.epochs, sum(s.samples for s in live.source_shards)) == ("live", (), SAMPLES)


def test_no_manifest_says_how_to_build_one(tmp_path):
    with pytest.raises(FormatError, match=r"no cache at .*: manifest.json not found; build one with `cachegen build`"):
        read_manifest(tmp_path)


def test_an_interrupted_build_says_resume(tmp_path):
    (tmp_path / ".cachegen-build.json").write_text("{}")  # what a build writes first
    with pytest.raises(FormatError, match=r"no cache at .* yet: a build there was interrupted before writing "
                                          r"manifest.json; re-run the same `cachegen build` command to resume it"):
        read_manifest(tmp_path)
