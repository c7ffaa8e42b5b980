"""`--mode live` and `--mode auto`: one un-augmented pass plus the transform spec."""

from __future__ import annotations

import numpy as np

from cacheformat.layout import epoch_shards
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli
from tests.cachegen.test_errors import _folder


def test_live_cache_stores_the_source_once(build, npz_source):
    _, images, labels = npz_source
    out = build("--epochs", "7", "--mode", "live")
    m = manifest(out)
    assert m["mode"] == "live" and m["epochs"] == 7 and m["epoch_list"] == []
    assert [s["path"] for s in m["source_shards"]] == [f"source/shard-{i:06d}.tar" for i in range(5)]
    assert not list(out.glob("epoch-*"))
    indices = [i for s in m["source_shards"] for i in s["indices"]]
    assert indices == list(range(len(images)))  # index order, each once
    for s in m["source_shards"]:
        data = (out / s["path"]).read_bytes()
        for off, index, label in zip(s["offsets"], s["indices"], s["labels"]):
            stored = np.frombuffer(data, np.uint8, 3072, off + 128).reshape(32, 32, 3)
            assert np.array_equal(stored, images[index]) and label == labels[index]
    assert run_cli("verify", out).output.startswith("ok: 5 shards")
    assert m["transform"]["augment_on"] == "auto"  # the default: batched on a GPU, per sample on a CPU
    assert ("7 epochs, augmented live (auto: in batches on a GPU, else per sample), 5 shards, 240 samples per epoch"
            in run_cli("info", out).output)


def test_live_and_cached_record_the_same_normalisation(build, tmp_path):
    live = manifest(build("--epochs", "2", "--mode", "live", out=tmp_path / "live"))
    cached = manifest(build("--epochs", "2", "--mode", "cached", out=tmp_path / "cached"))
    assert live["mean"] == cached["mean"] and live["std"] == cached["std"]
    assert live["epoch_fingerprints"] == cached["epoch_fingerprints"]
    # the live reader recomputes the layout the cache stores
    for entry in cached["epoch_list"]:
        layout = epoch_shards(cached["seed"], entry["epoch"], 240, cached["shard_size"])
        assert [s["indices"] for s in entry["shards"]] == [a.tolist() for a in layout]


def test_auto_mode_falls_back_to_live_when_the_cache_would_be_too_big(npz_source, tmp_path):
    result = run_cli("build", npz_source[0], "--out", tmp_path / "a", "--workers", "1", "--epochs", "100",
                     "--max-cache-gb", "0.1")
    assert "over --max-cache-gb 0.1: writing a live cache" in result.output
    assert manifest(tmp_path / "a")["mode"] == "live"
    run_cli("build", npz_source[0], "--out", tmp_path / "b", "--workers", "1", "--epochs", "2", "--quiet")
    assert manifest(tmp_path / "b")["mode"] == "cached"


def test_live_needs_one_source_shape_or_resize(tmp_path):
    root = _folder(tmp_path)
    from PIL import Image
    Image.new("RGB", (60, 20)).save(root / "class0" / "wide.png")
    result = run_cli("build", root, "--out", tmp_path / "x", "--mode", "live", "--workers", "1", "--quiet",
                     "--transform", "imagenet", "--size", "24", expect=1)
    assert_one_line_error(result, "live cache stores the source un-augmented", "--resize")
    run_cli("build", root, "--out", tmp_path / "y", "--mode", "live", "--workers", "1", "--quiet",
            "--transform", "imagenet", "--size", "24", "--resize", "32")
    m = manifest(tmp_path / "y")
    assert m["image"]["shape"] == [32, 32, 3] and m["output_shape"] == [24, 24, 3]
    assert m["transform"]["resize"] == 32
