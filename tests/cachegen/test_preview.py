"""`cachegen preview`: a PNG grid of samples through the epochs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cachegen.preview import _Stored, _job, _locate
from cachegen.build import _Augmenter
from cachegen.shards import read_image
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli


@pytest.mark.parametrize("mode", ["cached", "live"])
def test_preview_grid_has_a_row_per_sample_and_a_column_per_epoch(build, tmp_path, mode):
    out = build("--epochs", "3", "--mode", mode)
    png = tmp_path / "grid.png"
    result = run_cli("preview", out, "--out", png, "--samples", "4")
    assert "4 samples x 4 columns" in result.output
    with Image.open(png) as grid:
        # make_grid: 2-pixel padding around and between 32x32 tiles
        assert grid.size == (4 * 34 + 2, 4 * 34 + 2) and grid.mode == "RGB"
        pixels = np.asarray(grid)
    first_row = [pixels[2:34, 2 + 34 * k:34 + 34 * k] for k in range(4)]
    assert not np.array_equal(first_row[1], first_row[2])  # epochs differ


def test_live_augmentation_reproduces_the_cached_epochs(build, tmp_path):
    cached = build("--epochs", "3", "--mode", "cached", out=tmp_path / "cached")
    live = build("--epochs", "3", "--mode", "live", out=tmp_path / "live")
    mc, ml = manifest(cached), manifest(live)
    wanted = set(range(0, 240, 7))
    stored = _Stored(live, ml, _locate(ml["source_shards"], wanted))
    augment = _Augmenter(_job(ml, stored))
    for epoch in range(3):
        located = _locate(mc["epoch_list"][epoch]["shards"], wanted)
        for index in sorted(wanted):
            on_disk = read_image(cached, *located[index], mc["image"])
            assert np.array_equal(on_disk, augment.augment(epoch, index, stored.load(index)))


def test_preview_of_a_missing_cache(tmp_path):
    assert_one_line_error(run_cli("preview", tmp_path, "--out", tmp_path / "x.png", expect=1), "manifest.json not found")


def test_preview_to_an_unwritable_path(build, tmp_path):
    out = build("--epochs", "1")
    result = run_cli("preview", out, "--out", tmp_path / "nodir" / "x.png", expect=1)
    assert_one_line_error(result, "cannot write")
