"""Bounded resources whatever the cache size: a 10000-shard live cache and a 600-shard cached one
read under `ulimit -n 64` (open mappings and files are an LRU sized from the limit), giving the
batches the same loaders give without the limit."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from readers import open_loader
from readers.shards import ShardFiles, default_max_open

_READ = """
import hashlib, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from readers import open_loader
from readers.shards import default_max_open
loader = open_loader(sys.argv[1], batch_size=512, device="cpu", normalize=False, workers=int(sys.argv[2]))
h = hashlib.sha256()
for images, labels in loader:
    h.update(images.numpy().tobytes()); h.update(labels.numpy().tobytes())
print(default_max_open(), h.hexdigest())
"""


def _digest(cache: Path, workers: int) -> str:
    loader = open_loader(cache, batch_size=512, device="cpu", normalize=False, workers=workers)
    h = hashlib.sha256()
    for images, labels in loader:
        h.update(images.numpy().tobytes())
        h.update(labels.numpy().tobytes())
    return h.hexdigest()


def _build(root: Path, name: str, shards: int, mode: str, epochs: int) -> Path:
    from click.testing import CliRunner

    from cachegen.cli import main

    rng = np.random.default_rng(7)
    np.savez(root / f"{name}.npz", images=rng.integers(0, 256, (shards, 2, 2, 1), np.uint8),
             labels=rng.integers(0, 3, shards))
    args = ["build", str(root / f"{name}.npz"), "--out", str(root / name), "--mode", mode, "--epochs", str(epochs),
            "--shard-size", "1", "--workers", "2", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return root / name


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("many")
    return {"live": _build(root, "live", 10000, "live", 1), "cached": _build(root, "cached", 600, "cached", 1)}


@pytest.mark.parametrize(("kind", "workers"), [("live", 0), ("live", 1), ("cached", 0)])
def test_a_cache_of_thousands_of_shards_reads_under_ulimit_64(many, kind, workers):
    cache = many[kind]
    done = subprocess.run([sys.executable, "-c", _READ, str(cache), str(workers)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    max_open, digest = done.stdout.split()
    assert int(max_open) == 16  # a quarter of the limit
    assert digest == _digest(cache, workers)


def test_the_mapping_lru_keeps_at_most_max_open(many):
    loader = open_loader(many["cached"], batch_size=64, device="cpu", normalize=False)
    files: ShardFiles = loader._files
    files.max_open = 5
    for _ in loader:
        assert 0 < len(files) <= 5
    assert default_max_open() >= 4
