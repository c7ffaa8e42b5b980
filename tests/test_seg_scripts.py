"""Toy-size runs of the segmentation scripts: train_seg.py trains from a cache and online side by
side and prints both rows and the ratio; bench_seg.py prints each loader's rate and the ratio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachegen.cli import main
from tests.conftest import make_seg_npz

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("segscripts")
    path, _, _ = make_seg_npz(root / "seg.npz", n=64, size=16)
    for name, args in (("train", ["--transform", "seg", "--epochs", "2"]),
                       ("val", ["--transform", "seg-val", "--stats-from", str(root / "train")])):
        result = CliRunner().invoke(main, ["build", str(path), "--out", str(root / name), "--workers", "1", "--quiet",
                                           *args])
        assert result.exit_code == 0, result.output
    return root / "train", root / "val"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_train_seg_reports_cached_and_online_side_by_side(seg):
    out = _run("train_seg.py", "--cache", str(seg[0]), "--val", str(seg[1]), "--epochs", "1", "--batch-size", "16",
               "--workers", "1", "--threads", "1")
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("cached ", "online ")) and "epoch" not in line and "/" not in line}
    assert float(rows["cached"][3].rstrip("%")) >= 0 and 0 <= float(rows["online"][-1]) <= 1
    assert "cached / online:" in out and "val mIoU" in out and out.startswith("machine: ")


def test_bench_seg_prints_the_ratio(seg):
    out = _run("bench_seg.py", "--cache", str(seg[0]), "--batches", "1", "--repeats", "1", "--workers", "1",
               "--batch-size", "16", "--threads", "1")
    assert "cached  best" in out and "online  best" in out and float(out.split("cached / online: ")[1].split("x")[0]) > 0


def test_train_seg_refuses_a_cache_without_masks(seg, tmp_path):
    from tests.conftest import make_npz

    path, _, _ = make_npz(tmp_path / "plain.npz", n=8, size=16)
    assert CliRunner().invoke(main, ["build", str(path), "--out", str(tmp_path / "plain"), "--workers", "1",
                                     "--quiet", "--epochs", "1"]).exit_code == 0
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_seg.py"), "--cache", str(tmp_path / "plain"),
                           "--val", str(seg[1])], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "must be caches with masks" in done.stderr
