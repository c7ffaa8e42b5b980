"""`cachegen bench`: every row measured, JSON for machines, a chart; no timing is asserted."""

from __future__ import annotations

import json

from PIL import Image

from tests.cachegen.conftest import assert_one_line_error, run_cli

ROWS = ("cachegen CachedLoader", "cachegen LiveLoader", "online: torchvision DataLoader", "stock webdataset",
        "plain read()")


def test_bench_json_has_every_row_and_field(build, tmp_path):
    out = build("--epochs", "2", "--size", "24")  # 24x24x3: bench must take the shape from the cache
    png = tmp_path / "bench.png"
    result = run_cli("bench", out, "--images", "300", "--batch-size", "64", "--workers", "1", "--json",
                     "--plot", png, "--model")
    data = json.loads(result.stdout)
    assert data["config"]["batch_size"] == 64 and data["config"]["images_per_row"] == 300
    names = [r["name"] for r in data["rows"]]
    assert names[0].startswith("model alone")
    assert [any(n.startswith(prefix) for n in names) for prefix in ROWS] == [True] * 5
    online = next(r for r in data["rows"] if r["name"].startswith("online"))
    for row in data["rows"]:
        assert row["images"] >= 300 and row["images_per_s"] > 0 and row["cpu_percent"] >= 0
        assert row["image_bytes"] == 24 * 24 * 3
        # every ratio is against the online row's measured rate, whichever row it is
        rate = row["images"] / row["seconds"]
        assert row["ratio_to_online"] == round(rate / (online["images"] / online["seconds"]), 2)
        assert row["mb_per_s"] == round(rate * 24 * 24 * 3 / 1e6, 1)
        assert (row["data_wait"] is None) == row["name"].startswith("plain read")
    with Image.open(png) as chart:
        assert chart.size[0] == 900 and chart.size[1] > 6 * 34


def test_bench_table_on_a_missing_cache(tmp_path):
    assert_one_line_error(run_cli("bench", tmp_path, expect=1), "manifest.json not found")


def test_bench_refuses_a_live_cache(build):
    out = build("--epochs", "2", "--mode", "live")
    assert_one_line_error(run_cli("bench", out, expect=1), "is a live cache")
