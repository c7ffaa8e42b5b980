"""scripts/train.py in a user's second hour: its classes come from the training cache, a val cache
of other classes is refused in one line, its advice names its own flags (and works when followed),
its --help is whole."""

from __future__ import annotations

import subprocess
import sys

from tests.cachegen.conftest import run_cli
from tests.test_distill_script import ROOT, caches, train  # noqa: F401 - caches: the module's fixture

FACTORY = '''
from torchvision.transforms import v2


def make(epoch, epochs):
    return v2.RandomHorizontalFlip()
'''


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("train.py: error: "), done.stderr
    return lines[0]


def test_a_val_cache_of_other_classes_is_refused_in_one_line(caches, tmp_path):  # noqa: F811
    run_cli("build", "--split", "test", "--transform", "val", "--out", tmp_path / "sample-val", "--workers", "1",
            "--quiet")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--cache", str(caches / "plain"),
                           "--val", str(tmp_path / "sample-val"), "--device", "cpu", "--epochs", "1"],
                          capture_output=True, text=True, timeout=300)
    line = one_line(done)
    assert f"--val {tmp_path / 'sample-val'} holds other classes (10: " in line and "than --cache" in line
    assert "(3: 0, 1, 2)" in line


def test_its_trust_advice_names_its_flag_and_works_when_followed(caches, tmp_path):  # noqa: F811
    (tmp_path / "aug.py").write_text(FACTORY)
    run_cli("build", caches / "src.npz", "--mode", "live", "--transform", f"{tmp_path / 'aug.py'}:make", "--size", "32",
            "--out", tmp_path / "live", "--workers", "1", "--quiet", "--epochs", "2")
    args = ("--cache", tmp_path / "live", "--loader", "live", "--epochs", "1", "--max-steps", "1")
    line = one_line(train(caches, *args))
    assert "pass --trust-code if you trust" in line and "trust_code=True" not in line
    done = train(caches, *args, "--trust-code")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(live, 1 epoch, 1 step, seed 0, cpu)" in done.stdout


def test_help_is_whole():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0
    assert "or online augmentation feeding it; logs img/s" in " ".join(done.stdout.split())
    assert "python scripts/train.py --cache reinforced --val cache-val --distill" in done.stdout
