"""What a new user meets in their first hour: messages that say what happened, in words."""

from __future__ import annotations

import re
from pathlib import Path

from tests.cachegen.conftest import assert_one_line_error, run_cli
from tests.conftest import make_npz

FACTORY = '''
from torchvision import transforms as T


def make(epoch, epochs):
    return T.Compose([T.RandomHorizontalFlip(), T.Resize(16)])
'''


def test_one_epoch_and_one_shard_are_singular(build):
    out = build("--transform", "val", "--shard-size", "1000")
    text = run_cli("info", out).output
    assert "1 augmented epoch, 1 shard, 240 samples per epoch" in text


def test_a_different_cache_is_refused_first_naming_the_options_not_fingerprints(build, tmp_path):
    out = build("--epochs", "3")
    other = make_npz(tmp_path / "other.npz", n=120, size=32, seed=1)[0]
    result = run_cli("build", other, "--out", out, "--epochs", "1", "--shard-size", "50", "--workers", "1",
                     "--transform", "imagenet", expect=1)
    # One line: no "already holds 3 epochs; keeping them all" before the refusal.
    assert_one_line_error(result, "holds a different cache (differs in: source (", "num_samples 240 -> 120",
                          "transform (", "spec cifar -> imagenet", "use --overwrite")
    assert not re.search(r"[0-9a-f]{64}", result.output), result.output
    assert "keeping them all" not in result.output


def test_a_source_whose_bytes_changed_is_named_in_words(build, tmp_path):
    out = build("--epochs", "2")
    source = tmp_path / "data.npz"
    make_npz(source, seed=7)  # same name, size and count; other pixels
    result = run_cli("build", source, "--out", out, "--epochs", "2", "--shard-size", "50", "--workers", "1",
                     expect=1)
    assert_one_line_error(result, "differs in: source (its contents changed (same options, other bytes))")


def test_growing_the_same_cache_still_says_it_keeps_its_epochs(build):
    out = build("--epochs", "3")
    result = run_cli("build", Path(out).parent / "data.npz", "--out", out, "--epochs", "2", "--shard-size", "50",
                     "--workers", "1")
    assert "already holds 3 epochs; keeping them all" in result.output


def test_a_live_cache_with_a_relative_factory_path_warns_at_build_time(npz_source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aug.py").write_text(FACTORY)
    common = [npz_source[0], "--mode", "live", "--epochs", "2", "--workers", "1", "--quiet"]
    result = run_cli("build", *common, "--out", "live", "--transform", "aug.py:make")
    assert "relative path (aug.py:make)" in result.output
    assert f"--transform {tmp_path / 'aug.py'}:make" in result.output
    absolute = run_cli("build", *common, "--out", "live2", "--transform", f"{tmp_path / 'aug.py'}:make")
    assert "warning" not in absolute.output
    cached = run_cli("build", *common[:1], "--epochs", "2", "--workers", "1", "--quiet", "--out", "cached",
                     "--transform", "aug.py:make")
    assert "warning" not in cached.output  # a cached build runs the factory once, here


def test_info_shows_the_image_sizes_and_where_the_statistics_came_from(npz_source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aug.py").write_text(FACTORY)  # 32 px sources, 16 px out: the preset size (32) means nothing
    common = ["--epochs", "2", "--workers", "1", "--quiet"]
    run_cli("build", npz_source[0], *common, "--out", "train", "--transform", "aug.py:make")
    text = run_cli("info", "train").output
    assert "npy 16x16x3 uint8" in text and "size=32" not in text
    run_cli("build", npz_source[0], *common, "--out", "val", "--transform", "val", "--stats-from", "train")
    line = next(line for line in run_cli("info", "val").output.splitlines() if line.startswith("mean/std"))
    assert line.endswith("(from train)"), line
    assert run_cli("info", "val", "--json").output.count('"stats_from": "train"') == 1
