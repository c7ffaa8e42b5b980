"""Smoke runs of scripts/train.py --distill on a reinforced cache: one process, two gloo processes
under torchrun with MixUp, and its one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cachegen.conftest import run_cli
from tests.conftest import make_npz

ROOT = Path(__file__).resolve().parent.parent
TEACHER = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
'''


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    src, _, _ = make_npz(root / "src.npz", n=200, classes=3)
    (root / "teacher.py").write_text(TEACHER)
    common = ["--workers", "1", "--quiet", "--shard-size", "50"]
    run_cli("build", src, "--out", root / "reinforced", "--epochs", "2", "--teacher", f"{root / 'teacher.py'}:make",
            *common)
    run_cli("build", src, "--out", root / "plain", "--epochs", "2", *common)
    run_cli("build", src, "--out", root / "val", "--transform", "val", "--stats-from", root / "plain", *common)
    return root


def train(caches: Path, *args, launcher=()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, str(ROOT / "scripts" / "train.py"), "--val", str(caches / "val"),
                           "--batch-size", "32", "--width", "4", "--workers", "1", "--device", "cpu",
                           *map(str, args)], cwd=caches, capture_output=True, text=True, timeout=300)


def test_distill_trains_on_the_teacher_targets(caches):
    results = caches / "results.jsonl"
    done = train(caches, "--cache", caches / "reinforced", "--distill", "--label-weight", "0.5", "--epochs", "1",
                 "--json", results, "--tag", "kd")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val accuracy" in done.stdout
    assert "distilling: soft targets from the teacher's stored top-3 of 3 classes (label weight 0.5" in done.stdout
    result = json.loads(results.read_text())
    assert result["distill"] is True and result["label_weight"] == 0.5 and 0.0 <= result["accuracy"] <= 1.0


def test_distill_with_mixup_under_torchrun_on_two_gloo_processes(caches):
    # 200 samples, batch 32: 4 steps (100 samples) per rank; teacher targets mixed as the images are.
    done = train(caches, "--cache", caches / "reinforced", "--distill", "--mixup", "0.2", "--epochs", "1",
                 launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(cached, 1 epoch, 4 steps, seed 0, cpu)" in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--cache", "plain", "--distill"), "has no teacher targets: build it with `cachegen build --teacher"),
    (("--cache", "reinforced", "--distill", "--loader", "online"), "--distill reads the teacher targets"),
])
def test_distill_refuses_in_one_line(caches, args, message):
    args = [caches / a if a in ("plain", "reinforced") else a for a in args]
    done = train(caches, *args, "--epochs", "1")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("train.py: error: "), done.stderr
    assert message in lines[0]
