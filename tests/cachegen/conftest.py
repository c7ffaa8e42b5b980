"""Helpers for the builder tests: run the CLI in-process and read caches back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cachegen.cli import main
from tests.conftest import make_npz


@pytest.fixture
def gpu_hidden(monkeypatch):
    """torch's own CUDA query says no GPU: a cached `--augment-on device` build without --device
    augments in its workers, as on a machine without one (on a GPU host it would augment in this
    process, on CUDA: other bytes than a --device cpu build's)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def run_cli(*args: str, expect: int = 0):
    """Run `cachegen ARGS` in-process; assert the exit code; return the result."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    """A user error: non-zero exit, one 'Error: ...' line naming the problem, no traceback."""
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def shard_bytes(root: Path) -> dict[str, bytes]:
    """Every shard and index file of a cache by relative path (what must be byte-identical between builds)."""
    return {str(p.relative_to(root)): p.read_bytes()
            for pattern in ("*/*.tar", "*/*.idx") for p in sorted(root.glob(pattern))}


def manifest(root: Path) -> dict:
    """manifest.json with each shard's index columns (offsets, sizes, labels, indices, read with
    np.load) merged into its entry, as the tests read a cache."""
    m = json.loads((root / "manifest.json").read_text())
    for shard in [s for e in m["epoch_list"] for s in e["shards"]] + m.get("source_shards", []):
        table = np.load(root / (shard["path"][:-len(".tar")] + ".idx"))
        shard.update({k: table[:, c].tolist() for c, k in enumerate(("offsets", "sizes", "labels", "indices"))})
    return m


@pytest.fixture
def build(npz_source, tmp_path):
    """build(*extra_args, out=...) -> cache folder, from the small npz source, 1 worker, quiet;
    with expect=N (N != 0), the CLI's result, to check its error."""
    def _build(*args: str, out: Path | None = None, expect: int = 0):
        out = out or tmp_path / "cache"
        result = run_cli("build", npz_source[0], "--out", out, "--shard-size", "50", "--workers", "1", "--quiet",
                         *args, expect=expect)
        return out if expect == 0 else result
    return _build


# Slow enough (2 ms a sample) that a build is still running when a test kills it or a worker, and
# held while the file named by $SLOW_AUG_GATE exists; it also draws from Python's random and numpy,
# which spawned workers must seed like forked ones.
SLOW = '''
import os
import random
import time

import numpy as np
from PIL import Image


def make(epoch, epochs):
    def slow(image):
        time.sleep(0.002)
        while os.path.exists(os.environ.get("SLOW_AUG_GATE", "")):
            time.sleep(0.01)
        a = np.roll(np.array(image), random.randint(-4, 4), axis=0)
        return Image.fromarray(np.where(np.random.rand(*a.shape) < 0.1, 255, a).astype(np.uint8))
    return slow
'''


@pytest.fixture
def slow_source(tmp_path, monkeypatch):
    """(a 240-image .npz, the environment for child processes); `--transform slow_aug:make` is
    importable here and in those children."""
    (tmp_path / "slow_aug.py").write_text(SLOW)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return make_npz(tmp_path / "data.npz")[0], env
