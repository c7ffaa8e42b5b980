"""`cachegen bench`: every row warmed up and timed past both minimums, JSON for machines, every
column explained, the read() ceiling kept apart, a log-scale chart; no timing is asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from tests.cachegen.conftest import assert_one_line_error, run_cli

ROWS = ("cachegen CachedLoader", "cachegen LiveLoader, per sample", "cachegen LiveLoader, batched on cpu (1 thread",
        "online: torchvision DataLoader", "stock webdataset", "plain read()")
FAST = ("--images", "300", "--min-seconds", "0.2", "--warmup", "64", "--batch-size", "64", "--workers", "1")
GREEN, GREY = (46, 125, 50), (120, 120, 120)


def test_bench_json_has_every_row_and_field(build, tmp_path):
    # 24x24x3 (bench takes the shape from the cache), 240 images an epoch: fewer than a row must see,
    # so passes repeat
    out = build("--epochs", "2", "--size", "24")
    png = tmp_path / "bench.png"
    data = json.loads(run_cli("bench", out, *FAST, "--json", "--plot", png, "--model").stdout)
    c = data["config"]
    assert (c["batch_size"], c["min_images"], c["min_seconds"], c["warmup_images"]) == (64, 300, 0.2, 64)
    names = [r["name"] for r in data["rows"]]
    assert names[0].startswith("model alone")
    assert [any(n.startswith(prefix) for n in names) for prefix in ROWS] == [True] * len(ROWS)
    if torch.get_num_threads() > 1:  # the one-thread rows beside the same rows with torch's threads
        threads = torch.get_num_threads()
        assert f"cachegen LiveLoader, batched on cpu ({threads} threads, no workers)" in names
        assert "model alone (1 thread, synthetic batch on device)" in names
        assert [n for n in names if n.startswith("cachegen CachedLoader")] == [
            f"cachegen CachedLoader ({threads} threads)", "cachegen CachedLoader (1 thread)"]
    online = next(r for r in data["rows"] if r["name"].startswith("online"))
    for row in data["rows"]:
        assert row["images"] >= 300 and row["seconds"] >= 0.2 and row["images_per_s"] > 0 and row["cpu_percent"] >= 0
        assert row["image_bytes"] == 24 * 24 * 3
        assert row["mb_per_s"] == round(row["images_per_s"] * 24 * 24 * 3 / 1e6, 1)
        ceiling = row["name"].startswith("plain read")
        assert (row["kind"] == "ceiling") == ceiling and (row["data_wait"] is None) == ceiling
        if ceiling:
            assert row["ratio_to_online"] is None  # no training step: not comparable with --model
        else:  # every ratio is against the online row's measured rate, whichever row it is
            rate = row["images"] / row["seconds"]
            assert row["ratio_to_online"] == round(rate / (online["images"] / online["seconds"]), 2)
    _check_log_chart(png, [r for r in data["rows"] if r["kind"] != "ceiling"])


def _check_log_chart(png, rows) -> None:
    """Each bar's length (from the axis to its rightmost bar-coloured pixel) follows log10 of its
    img/s on the chart's axis, and every row's name fits left of the bars."""
    from PIL import ImageDraw

    from cachegen.bench import PLOT_BAR_H, PLOT_RIGHT, PLOT_SPAN, plot_axis

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 20 + int(max(measure.textlength(r["name"]) for r in rows))
    lo, hi = plot_axis([r["images_per_s"] for r in rows])
    with Image.open(png) as chart:
        assert chart.size[0] == left + PLOT_SPAN + PLOT_RIGHT and chart.size[1] > 70 + PLOT_BAR_H * len(rows)
        pixels = chart.convert("RGB").load()
        for i, row in enumerate(rows):
            y = 55 + i * PLOT_BAR_H + 17
            xs = [x for x in range(left, chart.size[0]) if pixels[x, y] in (GREEN, GREY)]
            assert min(xs) == left  # nothing of the name under the bar
            expected = PLOT_SPAN * math.log10(row["images_per_s"] / lo) / math.log10(hi / lo)
            assert abs(max(xs) - left - max(1, expected)) <= 2, (max(xs) - left, expected, row)


def test_bench_table_explains_itself_and_keeps_the_ceiling_apart(build):
    out = build("--epochs", "2")
    text = run_cli("bench", out, *FAST, "--model").output
    text = text[text.index("batch 64, device"):]  # after the progress lines
    table, _, rest = text.partition("\nceiling:")
    assert "each row: 64 images of warm-up (untimed), then passes repeated until at least 300 images and 0.2 s" in table
    assert "plain read()" not in table and "model alone" in table and "data wait" in table
    # The baseline as a careful user sets it up, said in the output; and where it ran.
    assert "online row: torchvision DataLoader, 1 worker, persistent, pin_memory=False" in table
    assert "\nmachine: " in table and " cores usable, load average " in table and " thread" in table
    ceiling, _, columns = rest.partition("\ncolumns:")
    assert "plain read() of the shards" in ceiling
    for column in ("img/s", "MB/s", "x online", "CPU %", "data wait", "images", "s "):
        assert f"\n  {column}" in columns
    assert "100 = one core busy" in columns
    help_text = run_cli("bench", "--help").output
    assert "CPU %" in help_text and "100 = one core busy" in help_text and "data wait" in help_text
    assert "--min-seconds" in help_text and "--warmup" in help_text


def test_bench_table_on_a_missing_cache(tmp_path):
    assert_one_line_error(run_cli("bench", tmp_path, expect=1), "manifest.json not found")


def test_bench_refuses_a_live_cache(build):
    out = build("--epochs", "2", "--mode", "live")
    assert_one_line_error(run_cli("bench", out, expect=1), "is a live cache")


@pytest.mark.parametrize("encoding", ["png", "jpg"])
def test_bench_reads_a_compressed_cache_and_shows_disk_per_sample(build, encoding):
    # Every row, the stock webdataset one included, on png/jpg payloads; each row beside what a
    # sample costs on disk where it reads a cache: the shards' bytes over their samples.
    out = build("--epochs", "2", "--size", "24", "--format", encoding)
    data = json.loads(run_cli("bench", out, *FAST, "--json").stdout)
    names = [r["name"] for r in data["rows"]]
    assert [any(n.startswith(prefix) for n in names) for prefix in ROWS] == [True] * len(ROWS)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [s for e in manifest["epoch_list"] for s in e["shards"]]
    cached = sum(s["bytes"] for s in shards) / sum(s["samples"] for s in shards)
    disk = {r["name"]: r["disk_bytes_per_sample"] for r in data["rows"]}
    for name, value in disk.items():
        if name.startswith(("cachegen CachedLoader", "stock webdataset", "plain read()")):
            assert value == round(cached)
        elif name.startswith("cachegen LiveLoader"):
            assert value > 0
        else:
            assert value is None  # online reads the source: not a cache's bytes
    text = run_cli("bench", out, *FAST).output
    assert "disk/sample" in text and f"{cached / 1000:.1f} KB" in text
