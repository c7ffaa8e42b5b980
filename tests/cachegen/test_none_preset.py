"""The `none` preset: store the source as is, in one epoch, at the source's own size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cacheaug.transforms import epoch_fingerprint, is_random, make_transform
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli


@pytest.mark.parametrize("shape", [(60, 20, 28, 3), (60, 20, 28)])  # not square; RGB and grayscale
def test_none_writes_one_epoch_of_the_source_pixels_at_their_size(tmp_path, shape):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 5, len(images))
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    out = tmp_path / "cache"
    result = run_cli("build", tmp_path / "data.npz", "--out", out, "--epochs", "5", "--transform", "none",
                     "--shard-size", "25", "--workers", "1")
    assert "transform none is deterministic: writing 1 epoch, not 5" in result.output
    m = manifest(out)
    stored = (20, 28, 3) if len(shape) == 4 else (20, 28, 1)
    assert m["epochs"] == 1 and len(m["epoch_list"]) == 1 and m["transform"]["spec"] == "none"
    assert m["image"]["shape"] == list(stored) and m["output_shape"] == list(stored)
    header = m["image"]["npy_header_bytes"]
    seen = []
    for s in m["epoch_list"][0]["shards"]:
        data = (out / s["path"]).read_bytes()
        for offset, size, index, label in zip(s["offsets"], s["sizes"], s["indices"], s["labels"]):
            assert size == header + images[index].size
            assert data[offset + header:offset + size] == images[index].tobytes()  # the source's bytes
            assert label == labels[index]
            seen.append(index)
    assert sorted(seen) == list(range(len(images)))
    run_cli("verify", out)


def test_none_is_the_identity_and_deterministic():
    image = Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3))
    transform = make_transform("none", epoch=3, epochs=10, size=224, schedule="linear")
    assert transform(image) is image
    assert not is_random("none") and is_random("cifar")
    assert epoch_fingerprint(transform) == epoch_fingerprint(make_transform("none", epoch=0, epochs=1, size=5))


def test_none_refuses_a_size_and_is_in_the_help(tmp_path, npz_source):
    result = run_cli("build", npz_source[0], "--out", tmp_path / "c", "--transform", "none", "--size", "16",
                     expect=1)
    assert_one_line_error(result, "--transform none", "--size")
    assert not (tmp_path / "c").exists()
    assert "none" in run_cli("build", "--help").output
