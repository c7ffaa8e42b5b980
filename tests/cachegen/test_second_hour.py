"""What a user meets once the first build works: the tools find a cache's source from any folder,
a moved source is pointed at with --source, bench reads a folder of mixed sizes; every piece of
advice an error gives is followed here and works."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from tests.cachegen.conftest import assert_one_line_error, run_cli

FAST = ("--images", "64", "--min-seconds", "0", "--warmup", "0", "--batch-size", "32", "--workers", "1")


def make_folder(root, sizes=((40, 40),), per_class: int = 8, classes=("a", "b")):
    """An ImageFolder of PNGs, image i of each class at sizes[i % len(sizes)] (w, h)."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _folder_cache(tmp_path, monkeypatch, *extra, sizes=((40, 40),)):
    """A cache built from the folder `./data`, spelt relative, in tmp_path/work; returns tmp_path/work/cache."""
    work = tmp_path / "work"
    make_folder(work / "data", sizes)
    monkeypatch.chdir(work)
    run_cli("build", "data", "--out", "cache", "--epochs", "2", "--size", "32", "--workers", "1", "--quiet",
            "--shard-size", "8", *extra)
    return work / "cache"


def test_preview_from_another_folder_finds_the_source_and_a_moved_one_is_named(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch)
    recorded = json.loads((cache / "manifest.json").read_text())["source_spec"]
    assert recorded["spec"] == "data" and recorded["absolute"] == str(tmp_path / "work" / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_cli("preview", cache, "--out", "p.png", "--epochs", "2")
    assert "x 3 columns" in result.output  # the original beside the 2 epochs

    shutil.move(tmp_path / "work" / "data", tmp_path / "moved")
    result = run_cli("preview", cache, "--out", "p.png", "--epochs", "2")
    assert "x 2 columns" in result.output and "no 'original' column" in result.output
    assert "pass --source WHERE" in result.output
    result = run_cli("preview", cache, "--out", "p.png", "--epochs", "2", "--source", tmp_path / "moved")
    assert "x 3 columns" in result.output  # the advice followed
    assert_one_line_error(run_cli("preview", cache, "--source", tmp_path / "nowhere", expect=1), "does not exist")


def test_an_old_manifest_without_the_absolute_path_still_reads(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch)
    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    del m["source_spec"]["absolute"]
    path.write_text(json.dumps(m))
    result = run_cli("preview", cache, "--out", "p.png", "--epochs", "2")  # from the build's folder
    assert "x 3 columns" in result.output


def test_bench_from_another_folder_and_a_moved_source(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    data = json.loads(run_cli("bench", cache, *FAST, "--json").stdout)
    assert any(r["name"].startswith("cachegen LiveLoader") for r in data["rows"])
    shutil.move(tmp_path / "work" / "data", tmp_path / "moved")
    assert_one_line_error(run_cli("bench", cache, *FAST, expect=1), "is not at", "pass --source WHERE")
    data = json.loads(run_cli("bench", cache, *FAST, "--json", "--source", tmp_path / "moved").stdout)
    assert any(r["name"].startswith("online") for r in data["rows"])
    make_folder(tmp_path / "other", classes=("x", "y"))
    assert_one_line_error(run_cli("bench", cache, *FAST, "--source", tmp_path / "other", expect=1),
                          "has changed since the build")


def test_bench_of_a_folder_of_mixed_sizes_says_which_option_and_it_works(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch, sizes=((40, 40), (48, 36)))
    result = run_cli("bench", cache, *FAST, expect=1)
    assert_one_line_error(result, "cachegen bench --resize N", "--resize 32")
    data = json.loads(run_cli("bench", cache, *FAST, "--json", "--resize", "32").stdout)
    assert any(r["name"].startswith("cachegen LiveLoader") for r in data["rows"])


def test_bench_resize_is_refused_for_a_cache_with_its_own(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch, "--resize", "36")
    assert_one_line_error(run_cli("bench", cache, *FAST, "--resize", "32", expect=1), "leave out --resize")
