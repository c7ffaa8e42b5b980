"""Smoke runs of the scripts users start from: train.py with each loader, the Lightning and
Accelerate examples (an epoch or two, tiny), each as its docstring runs it."""

from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 8, 13])
def test_train_schedule_runs_any_number_of_steps(steps):
    """OneCycleLR with pct_start=0.2 divides by zero at 5 steps or fewer than 8: train.py's does not."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = train.one_cycle(opt, 0.1, steps)
    rates = []  # the rate each step trains with
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(0 < r <= 0.1 + 1e-12 for r in rates)
    if steps >= 3:  # up, then down
        assert rates[0] < max(rates) > rates[-1]


def test_train_max_steps_5(caches):
    """One epoch of a small folder at batch 128, or --max-steps 5: five steps end with an accuracy."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--cache", str(caches / "cached"),
                           "--val", str(caches / "val"), "--epochs", "2", "--batch-size", "16", "--width", "4",
                           "--max-steps", "5", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5 steps" in done.stdout


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


def _train(caches, *args, cwd: Path, launcher=(), env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, str(ROOT / "scripts" / "train.py"), "--val", str(caches / "val"),
                           "--batch-size", "32", "--width", "4", "--workers", "1", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_train_under_torchrun_splits_the_epoch_over_gloo(caches, tmp_path):
    # 200 samples, batch 32: 7 steps an epoch in one process, 4 (100 samples) per rank in two.
    done = _train(caches, "--cache", caches / "cached", "--epochs", "1", "--device", "cpu", cwd=tmp_path,
                  launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(cached, 1 epoch, 4 steps, seed 0, cpu)" in done.stdout
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


def test_train_refuses_one_gpu_index_for_every_local_process(caches, tmp_path):
    done = _train(caches, "--cache", caches / "cached", "--device", "cuda:0", cwd=tmp_path,
                  env={"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0] == ("train.py: error: --device cuda:0 would put all 2 processes of this machine on one GPU: "
                        "pass --device cuda (each process takes cuda:LOCAL_RANK)")


def test_accelerate_example_under_torchrun_is_one_run_of_two_processes(caches, tmp_path):
    pytest.importorskip("accelerate")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "scripts" / "train_accelerate.py"), "--cache", str(caches / "cached"),
                           "--val", str(caches / "val"), "--batch-size", "32", "--epochs", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 0 ") == 1  # printed by the main process only: Accelerate saw 2 processes


def test_bench_imagenet_measures_every_row_beside_its_disk(tmp_path):
    pytest.importorskip("skimage", reason="the ImageNet-shaped bench draws its photos from scikit-image")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_imagenet.py"), "--images", "24",
                           "--min-images", "16", "--min-seconds", "0", "--warmup", "8", "--batch-size", "8",
                           "--workers", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "img/s" in line and "x online" in line]
    assert [r.split(":")[0].strip() for r in rows] == [
        "online", "cached npy", "cached jpg", "cached jpg", "live npy, per sample", "live jpg, per sample",
        "live npy, batched on cpu", "live jpg, batched on cpu"]
    assert "1.00x online" in rows[0] and " KB " not in rows[0] and all(" KB " in r for r in rows[1:])
    assert all(r.rstrip().endswith("s)") for r in rows)
    assert "the live jpg cache takes " in done.stdout and "rows in this process: 1 torch thread" in done.stdout
    assert "online row: 1 worker, persistent, pin_memory=False" in done.stdout
    assert "\nmachine: " in done.stdout and " thread" in done.stdout


def test_gpu_feed_prints_every_row_against_synthetic(caches, tmp_path):
    """scripts/gpu_feed.py (gpu_check.sh's feed steps) at toy sizes on the CPU: every row measured."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_feed.py"), "--model", "resnet18",
                           "--classes", "3", "--batch-size", "8", "--steps", "1", "--warmup", "1", "--workers", "1",
                           "--device", "cpu", "--copies", "2", "--cached", str(caches / "cached"),
                           "--live-device", str(caches / "live"), "--live-cpu", str(caches / "live"),
                           "--online", str(caches / "cached")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.strip() for line in done.stdout.splitlines() if "of synthetic" in line]
    assert [r.split("  ")[0] for r in rows] == ["CachedLoader", "LiveLoader, batched on the device",
                                                "LiveLoader, per sample, 1 workers",
                                                "DataLoader, online augmentation, 1 workers"]
    assert all("data wait" in r for r in rows) and "synthetic data already on the device" in done.stdout
    assert "uint8 pinned" in done.stdout  # --copies


def test_bench_scale_repeats_a_build_into_a_manifest_the_readers_accept(caches, tmp_path):
    """scripts/bench_scale.py's ImageNet-sized manifest (a small build's shard entries repeated) states
    the sizes its sample counts make, so a loader opens it (readers check every size against the counts)."""
    import importlib.util

    from readers import CachedLoader

    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    bench_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_scale)
    samples = bench_scale.repeat_to(caches / "cached", tmp_path / "big", bench_scale.TARGET_SHARDS)
    loader = CachedLoader(tmp_path / "big", batch_size=256, device="cpu")
    assert len(loader) == -(-samples // 256) and samples == bench_scale.IMAGENET


def test_bench_batch_transform_prints_each_row_as_a_ratio_of_the_plain_loader(tmp_path):
    """scripts/bench_batch_transform.py at toy size: the rates table, then every row / the plain loader."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_batch_transform.py"), "--samples", "200",
                           "--shard-size", "100", "--batch-size", "32", "--repeats", "1", "--threads", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table, _, ratios = done.stdout.partition("\nas a ratio of the plain loader (best of each)")
    rows = [line.strip() for line in ratios.splitlines()[1:]]
    assert [r.split("  ")[0] for r in rows] == [
        "CachedLoader (no batch transform)", "batch_transform=v2.MixUp(alpha=0.2)",
        "batch_transform=v2.CutMix(alpha=1.0)", "batch_transform=v2.RandomChoice([MixUp, CutMix])",
        "v2.MixUp in the training loop (unseeded)"]
    assert " 1.00x " in rows[0] and all(r.endswith(" us/batch") for r in rows)
    assert "200 samples npy" in table and "wall img/s: best" in table


def test_bench_open_opens_a_generated_cache_of_many_shards(tmp_path):
    """scripts/bench_open.py's generated cache is one the readers accept (every size checked) and
    info reads; each row printed."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_open.py"), "--shards", "300"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ") and lines[1] == "300 shards, manifest 0 MB"
    assert [line.split(":")[0] for line in lines[2:]] == ["info", "reader"]
