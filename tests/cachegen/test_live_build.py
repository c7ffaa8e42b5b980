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


def test_a_live_cache_stores_the_format_asked_and_refuses_what_it_cannot_store(build, tmp_path):
    m = manifest(build("--epochs", "2", "--mode", "live", "--format", "jpg", "--quality", "80", out=tmp_path / "j"))
    assert m["image"]["encoding"] == "jpg" and m["image"]["quality"] == 80 and "npy_header_bytes" not in m["image"]
    assert run_cli("verify", tmp_path / "j").output.startswith("ok: 5 shards")
    from tests.conftest import make_npz
    rgba = make_npz(tmp_path / "rgba.npz", n=20, size=16, channels=4)[0]
    for how in (("--augment-on", "cpu"), ("--augment-on", "device")):  # the stored source is checked either way
        result = run_cli("build", rgba, "--out", tmp_path / "rgba", "--mode", "live", "--format", "jpg", *how,
                         "--quiet", expect=1)
        assert_one_line_error(result, "--format jpg stores 1 or 3 channels, these images have 4 (RGBA)")
        assert not (tmp_path / "rgba").exists()


def test_quality_is_refused_where_it_means_nothing(build, tmp_path):
    for args, message in ((("--quality", "90"), "--quality sets a JPEG's quality, and --format is npy"),
                          (("--format", "png", "--quality", "90"), "--format is png: add --format jpg"),
                          (("--format", "jpg", "--quality", "0"), "--quality must be 1 to 100"),
                          (("--format", "jpg", "--quality", "101"), "--quality must be 1 to 100")):
        assert_one_line_error(build("--mode", "live", *args, expect=1, out=tmp_path / "x"), message)
        assert not (tmp_path / "x").exists()
