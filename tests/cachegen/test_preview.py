"""`cachegen preview`: a PNG grid of samples through the epochs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cachegen.preview import LABEL_HEIGHT, PAD
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli

K = 3  # 32 px tiles are drawn at 3x (96 px), each pixel a 3x3 square


def tile(pixels: np.ndarray, row: int, column: int, side: int = 32, k: int = K) -> np.ndarray:
    """The image drawn at (row, column) of a preview grid, at its own size (every k-th pixel)."""
    y, x = LABEL_HEIGHT + PAD + row * (side * k + PAD), PAD + column * (side * k + PAD)
    block = pixels[y:y + side * k, x:x + side * k]
    assert np.array_equal(block, block[::k, ::k].repeat(k, 0).repeat(k, 1))  # whole squares: nothing blurred
    return block[::k, ::k]


@pytest.mark.parametrize("mode", ["cached", "live", "live-device"])
def test_preview_grid_has_a_row_per_sample_and_a_column_per_epoch(build, tmp_path, mode):
    out = build("--epochs", "3", "--mode", "live", "--augment-on", "device") if mode == "live-device" else \
        build("--epochs", "3", "--mode", mode)
    png = tmp_path / "grid.png"
    result = run_cli("preview", out, "--out", png, "--samples", "4")
    assert "4 samples x 4 columns" in result.output
    with Image.open(png) as grid:
        # make_grid: 2-pixel padding around and between 32x32 tiles drawn at 3x, below the labels
        assert grid.size == (4 * (96 + 2) + 2, LABEL_HEIGHT + 4 * (96 + 2) + 2) and grid.mode == "RGB"
        pixels = np.asarray(grid)
    first_row = [tile(pixels, 0, k) for k in range(4)]
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
            assert np.array_equal(tile(pixels, row, 1 + epoch), stored), (epoch, index)  # column 0: the original


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
    left = PAD + 32 * K + PAD  # column 0: the originals
    assert np.array_equal(device[:, :left], cpu[:, :left])
    assert not np.array_equal(device[:, left:], cpu[:, left:])  # the epochs: batched (Kornia) draws, not PIL's


def test_preview_labels_its_columns_and_keeps_large_images_at_their_size(build, tmp_path):
    from cachegen.preview import scale_for

    assert (scale_for(32, 32), scale_for(28, 28), scale_for(96, 96), scale_for(224, 224)) == (3, 4, 1, 1)
    out = build("--epochs", "2")
    run_cli("preview", out, "--out", tmp_path / "grid.png", "--samples", "2")
    with Image.open(tmp_path / "grid.png") as grid:
        strip = np.asarray(grid.convert("L"))[:LABEL_HEIGHT]
    width = 32 * K + PAD
    inked = [(strip[:, PAD + c * width:(c + 1) * width] < 128).sum() for c in range(3)]
    assert all(n > 20 for n in inked), inked  # "original", "epoch 0", "epoch 1": text in each column
    assert len(set(inked)) == 3  # three different words


def test_a_resize_the_stored_images_do_not_justify_is_refused_in_one_line(build, tmp_path):
    """A cached cache whose transform.resize was edited far past its 32 px images: preview would
    resize every original to it (16000: 6 GB); it is refused before anything is loaded."""
    import json

    out = build("--epochs", "2")
    m = json.loads((out / "manifest.json").read_text())
    m["transform"]["resize"] = 2000
    (out / "manifest.json").write_text(json.dumps(m))
    result = run_cli("preview", out, "--out", tmp_path / "grid.png", expect=1)
    assert_one_line_error(result, "transform resize 2000 is more than 8x the stored images' longest side 32")
    assert not (tmp_path / "grid.png").exists()


def test_a_build_the_readers_would_refuse_for_its_sides_is_refused_before_writing(build, tmp_path):
    result = build("--epochs", "1", "--transform", "imagenet", "--resize", "512", "--size", "32", expect=1)
    assert_one_line_error(result, "transform resize 512 is more than 8x the stored images' longest side 32",
                          "pass a smaller --size or --resize")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("what", ["epoch-0000/shard-000000.idx", "epoch-0000/shard-000000.tar"])
def test_a_fifo_in_place_of_an_index_or_shard_is_one_line_not_a_wait(build, tmp_path, what):
    """open() of a FIFO waits for a writer for ever: preview, verify and the reader answer at once."""
    import os
    import subprocess
    import sys

    out = build("--epochs", "1")
    (out / what).unlink()
    os.mkfifo(out / what)
    reader = ("import sys\nfrom readers import CachedLoader, ReaderError\ntry:\n    list(CachedLoader(sys.argv[1], "
              "batch_size=8, device='cpu'))\nexcept ReaderError as e:\n    sys.exit(f'Error: {e}')\n")
    for argv in (["-m", "cachegen", "preview", out, "--out", tmp_path / "grid.png"], ["-c", reader, out]):
        done = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (done.returncode, lines)
        assert str(out / what) in lines[0] and "not a regular file" in lines[0], lines[0]
    assert not (tmp_path / "grid.png").exists()
