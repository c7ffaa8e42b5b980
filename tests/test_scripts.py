"""Smoke runs of the scripts users start from: train.py with each loader, the Lightning and
Accelerate examples (an epoch or two, tiny), each as its docstring runs it."""

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
    run_cli("build", src, "--out", root / "val", "--transform", "val", "--stats-from", root / "cached", *common)
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


def _script(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_lightning_example_trains_and_resumes(caches, tmp_path):
    pytest.importorskip("lightning")
    common = ("--cache", caches / "cached", "--val", caches / "val", "--batch-size", "32", "--out", tmp_path)
    first = _script("train_lightning.py", *common, "--epochs", "1", cwd=tmp_path)
    assert "val accuracy" in first.stdout
    checkpoint = next(tmp_path.glob("checkpoints/*.ckpt"))
    resumed = _script("train_lightning.py", *common, "--epochs", "2", "--resume", checkpoint, cwd=tmp_path)
    assert "Restored all states" in resumed.stdout + resumed.stderr and "after 2 epochs" in resumed.stdout


def test_accelerate_example_trains_and_resumes(caches, tmp_path):
    pytest.importorskip("accelerate")
    common = ("--cache", caches / "cached", "--val", caches / "val", "--batch-size", "32")
    first = _script("train_accelerate.py", *common, "--epochs", "1", "--save", tmp_path / "state", cwd=tmp_path)
    assert "epoch 0 " in first.stdout and "val accuracy" in first.stdout
    resumed = _script("train_accelerate.py", *common, "--epochs", "2", "--resume", tmp_path / "state", cwd=tmp_path)
    assert "epoch 0 " not in resumed.stdout and "epoch 1 " in resumed.stdout  # continued after epoch 0
