"""`cachegen build` end to end: layout, determinism, growth, readability with plain webdataset."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from cachegen.build import build as run_build
from cachegen.config import BuildConfig
from cachegen.shards import index_shard
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli, shard_bytes


def test_cli_builds_the_cache_the_manifest_describes(build, npz_source):
    _, images, labels = npz_source
    out = build("--epochs", "3")
    m = manifest(out)
    assert m["epochs"] == 3 and len(m["epoch_list"]) == 3
    assert m["image"] == {"encoding": "npy", "shape": [32, 32, 3], "dtype": "uint8", "layout": "HWC",
                          "npy_header_bytes": 128}
    for entry in m["epoch_list"]:
        # every source sample once per epoch, in a shuffled order, 50 per shard
        indices = [i for s in entry["shards"] for i in s["indices"]]
        assert sorted(indices) == list(range(len(images))) and indices != sorted(indices)
        assert [s["samples"] for s in entry["shards"]] == [50, 50, 50, 50, 40]
        for s in entry["shards"]:
            assert s["labels"] == labels[s["indices"]].tolist()
            assert (out / s["path"]).stat().st_size == s["bytes"]
    orders = [[i for s in e["shards"] for i in s["indices"]] for e in m["epoch_list"]]
    assert orders[0] != orders[1]
    assert not list(out.glob("**/*.tmp*")) and not (out / ".cachegen-build.json").exists()


def test_epochs_differ_and_the_manifest_offsets_point_at_the_pixels(build):
    out = build("--epochs", "2")
    m = manifest(out)
    header = m["image"]["npy_header_bytes"]
    seen = {}
    for entry in m["epoch_list"]:
        for s in entry["shards"]:
            data = (out / s["path"]).read_bytes()
            for off, size, index in zip(s["offsets"], s["sizes"], s["indices"]):
                via_numpy = np.load(io.BytesIO(data[off:off + size]))
                raw = np.frombuffer(data, np.uint8, 32 * 32 * 3, off + header).reshape(32, 32, 3)
                assert np.array_equal(via_numpy, raw)
                seen.setdefault(index, []).append(raw)
    assert all(not np.array_equal(a, b) for a, b in seen.values())  # augmented differently per epoch


def test_shards_read_with_plain_webdataset_and_tar(build):
    out = build("--epochs", "1")
    m = manifest(out)
    shard = m["epoch_list"][0]["shards"][0]
    urls = str(out / shard["path"])
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("__key__", "npy", "cls"))
    assert [int(k.rsplit("_", 1)[1]) for k, _, _ in samples] == shard["indices"]
    assert [c for _, _, c in samples] == shard["labels"]
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for _, img, _ in samples)
    with tarfile.open(urls) as tar:
        names = tar.getnames()
        assert all(ti.mtime == 0 and ti.uname == "cachegen" for ti in tar.getmembers())
    assert names[:2] == [f"e0000_{shard['indices'][0]:08d}.cls", f"e0000_{shard['indices'][0]:08d}.npy"]


@pytest.mark.parametrize("encoding", ["png", "jpg"])
def test_compressed_formats_decode_with_webdataset(build, npz_source, encoding):
    out = build("--epochs", "1", "--format", encoding)
    m = manifest(out)
    shard = m["epoch_list"][0]["shards"][0]
    decoded = list(wds.WebDataset(str(out / shard["path"]), shardshuffle=False).decode("rgb8").to_tuple(encoding))
    assert len(decoded) == shard["samples"] and decoded[0][0].shape == (32, 32, 3)
    assert "npy_header_bytes" not in m["image"] and m["image"]["encoding"] == encoding


def test_same_bytes_whatever_the_worker_count(npz_source, tmp_path):
    common = dict(source=str(npz_source[0]), epochs=2, shard_size="30", quiet=True)
    one = run_build(BuildConfig(out=tmp_path / "w1", workers=1, **common))
    two = run_build(BuildConfig(out=tmp_path / "w2", workers=2, **common))
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    assert len(shard_bytes(tmp_path / "w1")) == 2 * 16  # 16 shards and their index files
    assert one == two


def test_a_different_seed_gives_different_shards(build, tmp_path):
    a = build("--epochs", "1", out=tmp_path / "a")
    b = build("--epochs", "1", "--seed", "1", out=tmp_path / "b")
    assert shard_bytes(a) != shard_bytes(b)


def test_writer_index_equals_index_parsed_back_from_the_tar(build):
    out = build("--epochs", "1")
    m = manifest(out)
    for s in m["epoch_list"][0]["shards"]:
        stats = {k: s.pop(k) for k in ("pixel_sum", "pixel_sqsum", "pixel_count")}
        s.pop("index")  # the index file's size and checksum; its columns are merged into `s`
        assert index_shard(out, s["path"], "npy", (32, 32, 3)) == s
        assert stats["pixel_count"] == s["samples"] * 32 * 32


def test_mean_and_std_are_exact_over_the_source(build, npz_source):
    out = build("--epochs", "2")
    m = manifest(out)
    pixels = npz_source[1].reshape(-1, 3) / 255
    assert np.allclose(m["mean"], pixels.mean(0), atol=1e-9)
    assert np.allclose(m["std"], pixels.std(0), atol=1e-9)


def test_raising_epochs_adds_epochs_and_keeps_the_old_ones(build, tmp_path):
    out = build("--epochs", "2")
    before = shard_bytes(out)
    build("--epochs", "3", out=out)
    after = shard_bytes(out)
    assert {k: after[k] for k in before} == before and len(after) == 2 * 15
    fresh = build("--epochs", "3", out=tmp_path / "fresh")
    assert shard_bytes(fresh) == after
    assert manifest(fresh) == manifest(out)
    build("--epochs", "1", out=out)  # asking for fewer keeps what is there
    assert manifest(out)["epochs"] == 3


def test_a_different_build_over_a_cache_is_refused_unless_overwrite(build):
    out = build("--epochs", "1")
    result = build("--epochs", "1", "--seed", "7", out=out, expect=1)
    assert_one_line_error(result, f"{out} holds a different cache (differs in: seed)", "use --overwrite")
    assert manifest(out)["seed"] == 0
    build("--epochs", "1", "--seed", "7", "--overwrite", out=out)
    assert manifest(out)["seed"] == 7


def test_val_preset_writes_one_deterministic_epoch(build, npz_source):
    out = build("--epochs", "5", "--transform", "val")
    m = manifest(out)
    assert m["epochs"] == 1 and m["transform"]["spec"] == "val"
    s = m["epoch_list"][0]["shards"][0]
    data = (out / s["path"]).read_bytes()
    first = np.frombuffer(data, np.uint8, 3072, s["offsets"][0] + 128).reshape(32, 32, 3)
    assert np.array_equal(first, npz_source[1][s["indices"][0]])  # 32x32 val of a 32x32 source: as is


FACTORY = '''
import torchvision.transforms as T

def make(epoch, epochs):
    return T.Compose([T.RandomCrop(24), T.ColorJitter(brightness=0.5 * (1 - epoch / epochs))])

def varying(epoch, epochs):
    return T.RandomResizedCrop((16, 16)) if epoch == 0 else T.CenterCrop(20)

def v2(epoch, epochs):
    import torch
    import torchvision.transforms.v2 as V
    return V.Compose([V.PILToTensor(), V.RandomHorizontalFlip(), V.ToDtype(torch.float32, scale=True)])
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_augs.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_augs"


def test_user_factory_follows_the_epoch(build, factories):
    out = build("--epochs", "2", "--transform", f"{factories}:make")
    m = manifest(out)
    assert m["image"]["shape"] == [24, 24, 3] and m["transform"]["spec"] == "my_augs:make"
    fps = m["epoch_fingerprints"]
    assert fps[0] != fps[1]  # brightness 0.5 then 0.25
    # the factory depends on the epoch count: growing would change epoch 1, so it is refused
    result = build("--epochs", "3", "--transform", f"{factories}:make", out=out, expect=1)
    assert_one_line_error(result, "epoch 1 would now be augmented differently", "use --overwrite")
    assert manifest(out)["epochs"] == 2


def test_v2_float_tensor_output_is_stored_as_uint8(build, factories, npz_source):
    out = build("--epochs", "1", "--transform", f"{factories}:v2")
    m = manifest(out)
    s = m["epoch_list"][0]["shards"][0]
    data = (out / s["path"]).read_bytes()
    img = np.frombuffer(data, np.uint8, 3072, s["offsets"][0] + 128).reshape(32, 32, 3)
    src = npz_source[1][s["indices"][0]]
    assert np.array_equal(img, src) or np.array_equal(img, src[:, ::-1])


def test_linear_schedule_weakens_augmentation(build):
    out = build("--epochs", "3", "--schedule", "linear")
    m = manifest(out)
    assert m["transform"]["schedule"] == "linear"
    assert len(set(m["epoch_fingerprints"])) == 3


def test_shard_size_in_bytes(build):
    out = build("--epochs", "1", "--shard-size", "300KB")
    assert [s["samples"] for s in manifest(out)["epoch_list"][0]["shards"]] == [97, 97, 46]


def test_info_json_and_text(build):
    out = build("--epochs", "2")
    info = json.loads(run_cli("info", out, "--json").output)
    assert info["epochs"] == 2 and info["samples_per_epoch"] == 240 and info["shards"] == 10
    assert info["bytes"] == sum(p.stat().st_size for p in out.glob("epoch-*/shard-*"))  # shards and indexes
    text = run_cli("info", out).output
    assert "2 augmented epochs, 10 shards, 240 samples per epoch" in text


def test_default_build_uses_the_sample_dataset(tmp_path):
    out = tmp_path / "cache"
    result = run_cli("build", "--epochs", "1", "--out", out, "--workers", "1")
    assert "1 augmented epoch, 5 shards, 5000 samples per epoch" in result.output  # one epoch, singular
    m = manifest(out)
    assert m["source"]["kind"] == "sample" and len(m["classes"]) == 10
    assert m["transform"]["spec"] == "cifar"


def test_an_edited_factory_or_other_library_versions_are_named_not_mixed_in(build, tmp_path, monkeypatch):
    # The manifest records the factory's source and the library versions a sample's bytes depend on;
    # growing a cache under a different one would mix two augmentations in one cache.
    factory = tmp_path / "myaug.py"
    factory.write_text("from torchvision import transforms as T\n"
                       "def make(epoch, epochs):\n    return T.RandomHorizontalFlip()\n")
    monkeypatch.chdir(tmp_path)
    out = build("--epochs", "2", "--transform", "myaug.py:make")
    m = manifest(out)
    assert m["versions"]["torch"] == torch.__version__ and len(m["transform"]["factory_sha256"]) == 64
    factory.write_text(factory.read_text() + "# tuned\n")
    result = build("--epochs", "3", "--transform", "myaug.py:make", out=out, expect=1)
    assert_one_line_error(result, "differs in: transform (the factory's source file was edited)", "--overwrite")
    build("--epochs", "3", "--transform", "myaug.py:make", "--overwrite", out=out)
    path = out / "manifest.json"
    raw = json.loads(path.read_text())
    raw["versions"]["torch"] = "2.3.0"  # as if built elsewhere
    path.write_text(json.dumps(raw))
    result = build("--epochs", "4", "--transform", "myaug.py:make", out=out, expect=1)
    assert_one_line_error(result, f"differs in: versions (torch 2.3.0 -> {torch.__version__})")
