"""`cachegen preview`: a PNG grid of samples through the epochs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli


@pytest.mark.parametrize("mode", ["cached", "live", "live-device"])
def test_preview_grid_has_a_row_per_sample_and_a_column_per_epoch(build, tmp_path, mode):
    out = build("--epochs", "3", "--mode", "live", "--augment-on", "device") if mode == "live-device" else \
        build("--epochs", "3", "--mode", mode)
    png = tmp_path / "grid.png"
    result = run_cli("preview", out, "--out", png, "--samples", "4")
    assert "4 samples x 4 columns" in result.output
    with Image.open(png) as grid:
        # make_grid: 2-pixel padding around and between 32x32 tiles
        assert grid.size == (4 * 34 + 2, 4 * 34 + 2) and grid.mode == "RGB"
        pixels = np.asarray(grid)
    first_row = [pixels[2:34, 2 + 34 * k:34 + 34 * k] for k in range(4)]
    assert not np.array_equal(first_row[1], first_row[2])  # epochs differ
    assert not np.array_equal(first_row[0], first_row[1])  # augmented: not the original


def test_a_live_preview_shows_the_images_the_cached_build_stored(build, tmp_path):
    """The live branch of preview augments the stored source itself; each of its tiles must be, pixel
    for pixel, the image a cached build of the same source wrote (read here straight from the tar)."""
    cached = build("--epochs", "3", "--mode", "cached", out=tmp_path / "cached")
    live = build("--epochs", "3", "--mode", "live", out=tmp_path / "live")
    run_cli("preview", live, "--out", tmp_path / "grid.png", "--samples", "5")
    with Image.open(tmp_path / "grid.png") as grid:
        pixels = np.asarray(grid)
    m = manifest(cached)
    shown = [i for s in manifest(live)["source_shards"] for i in s["indices"]][:5]
    for epoch in range(3):
        where = {i: (s, j) for s in m["epoch_list"][epoch]["shards"] for j, i in enumerate(s["indices"])}
        for row, index in enumerate(shown):
            shard, j = where[index]
            data = (cached / shard["path"]).read_bytes()
            stored = np.frombuffer(data, np.uint8, 3072, shard["offsets"][j] + 128).reshape(32, 32, 3)
            y, x = 2 + 34 * row, 2 + 34 * (1 + epoch)  # column 0: the original
            assert np.array_equal(pixels[y:y + 32, x:x + 32], stored), (epoch, index)


def test_preview_of_a_missing_cache(tmp_path):
    assert_one_line_error(run_cli("preview", tmp_path, "--out", tmp_path / "x.png", expect=1), "manifest.json not found")


def test_preview_to_an_unwritable_path(build, tmp_path):
    out = build("--epochs", "1")
    result = run_cli("preview", out, "--out", tmp_path / "nodir" / "x.png", expect=1)
    assert_one_line_error(result, "cannot write")


def test_a_device_augmented_live_preview_shows_the_batched_augmentation(build, tmp_path):
    import json

    live = build("--epochs", "2", "--mode", "live", "--augment-on", "device")
    run_cli("preview", live, "--out", tmp_path / "device.png", "--samples", "3")
    raw = json.loads((live / "manifest.json").read_text())
    raw["transform"]["augment_on"] = "cpu"  # the same cache read per sample
    (live / "manifest.json").write_text(json.dumps(raw))
    run_cli("preview", live, "--out", tmp_path / "cpu.png", "--samples", "3")
    with Image.open(tmp_path / "device.png") as a, Image.open(tmp_path / "cpu.png") as b:
        device, cpu = np.asarray(a), np.asarray(b)
    assert np.array_equal(device[:, :34], cpu[:, :34])  # column 0: the originals
    assert not np.array_equal(device[:, 34:], cpu[:, 34:])  # the epochs: batched (Kornia) draws, not PIL's
