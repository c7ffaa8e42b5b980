"""Smoke runs of the scripts users start from: train.py with each loader (1 epoch, tiny)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cachegen.conftest import run_cli
from tests.conftest import make_npz

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    src, _, _ = make_npz(root / "src.npz", n=200, classes=3)
    common = ["--workers", "1", "--quiet", "--shard-size", "50"]
    run_cli("build", src, "--out", root / "cached", "--epochs", "2", *common)
    run_cli("build", src, "--out", root / "live", "--epochs", "2", "--mode", "live", *common)
    run_cli("build", src, "--out", root / "val", "--transform", "val", *common)
    return root


@pytest.mark.parametrize("loader", ["cached", "live", "online"])
def test_train_one_epoch(caches, loader):
    results = caches / f"{loader}.jsonl"
    cache = caches / ("live" if loader == "live" else "cached")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--cache", str(cache),
                           "--val", str(caches / "val"), "--loader", loader, "--epochs", "1", "--batch-size", "32",
                           "--width", "4", "--workers", "1", "--json", str(results), "--tag", loader],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "img/s" in done.stdout and "data wait" in done.stdout and "val accuracy" in done.stdout
    result = json.loads(results.read_text())
    assert result["loader"] == loader and result["tag"] == loader and 0.0 <= result["accuracy"] <= 1.0
