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
    assert ("augmenting on the CPU per sample (cpu)" in done.stdout) == (loader == "live")  # auto, on the CPU
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


def _train(caches, *args, cwd: Path, launcher=()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, str(ROOT / "scripts" / "train.py"), "--val", str(caches / "val"),
                           "--batch-size", "32", "--width", "4", "--workers", "1", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_under_torchrun_splits_the_epoch_over_gloo(caches, tmp_path):
    # 200 samples, batch 32: 7 steps an epoch in one process, 4 (100 samples) per rank in two.
    done = _train(caches, "--cache", caches / "cached", "--epochs", "1", "--device", "cpu", cwd=tmp_path,
                  launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(cached, 1 epochs, 4 steps, seed 0, cpu)" in done.stdout
    single = _train(caches, "--cache", caches / "cached", "--epochs", "2", "--max-steps", "9", cwd=tmp_path)
    assert single.returncode == 0 and "(cached, 2 epochs, 9 steps, seed 0, cpu)" in single.stdout, single.stderr


@pytest.mark.parametrize("loader", ["cached", "online"])
def test_train_with_mixup_and_cutmix(caches, tmp_path, loader):
    results = tmp_path / "mix.jsonl"
    done = _train(caches, "--cache", caches / "cached", "--loader", loader, "--epochs", "1", "--mixup", "0.2",
                  "--cutmix", "1.0", "--json", results, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mixing every batch: RandomChoice of MixUp(alpha=0.2), CutMix(alpha=1)" in done.stdout
    result = json.loads(results.read_text())
    assert result["mixup"] == 0.2 and result["cutmix"] == 1.0 and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.parametrize(("args", "message"), [
    (("--loader", "live", "--cache", "CACHED"), "--loader live needs a live cache, and "),
    (("--mixup", "-1", "--cache", "CACHED"), "--mixup -1: give an alpha > 0, or 0 for off"),
    (("--loader", "cached", "--cache", "LIVE"), "is a 'live'-mode cache: read it with LiveLoader"),
    (("--device", "mps", "--cache", "CACHED"), "--device mps: use cuda or cpu"),
    (("--device", "tpu", "--cache", "CACHED"), "--device 'tpu' is not a torch device"),
])
def test_train_refuses_in_one_line(caches, tmp_path, args, message):
    args = [caches / a.lower() if a in ("CACHED", "LIVE") else a for a in args]
    done = _train(caches, *args, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("train.py: error: "), done.stderr
    assert message in lines[0]


def test_accelerate_example_under_torchrun_is_one_run_of_two_processes(caches, tmp_path):
    pytest.importorskip("accelerate")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "scripts" / "train_accelerate.py"), "--cache", str(caches / "cached"),
                           "--val", str(caches / "val"), "--batch-size", "32", "--epochs", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 0 ") == 1  # printed by the main process only: Accelerate saw 2 processes


def test_bench_imagenet_measures_its_three_rows(tmp_path):
    pytest.importorskip("skimage", reason="the ImageNet-shaped bench draws its photos from scikit-image")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_imagenet.py"), "--images", "24",
                           "--min-images", "16", "--min-seconds", "0", "--warmup", "8", "--batch-size", "8",
                           "--workers", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "img/s" in line]
    assert [r.split(":")[0].strip() for r in rows] == ["online", "live, per sample", "live, batched on cpu",
                                                       "live, batched on cpu"]
    assert "1.00x online" in rows[0] and rows[3].rstrip().endswith("s)")
