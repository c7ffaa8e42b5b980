"""Fixtures for the readers tests: tiny caches built by `cachegen build` (thread leaks: tests/conftest.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from loader_checks import CLASSES, SAMPLES, SHAPE, SHARD_SIZE

# A deterministic transform that differs between epochs (odd epochs are mirrored), so every
# cached epoch is known exactly from the source: the tests need no copy of the builder's logic.
_FACTORY = '''
from PIL import Image

def factory(epoch, epochs):
    return (lambda image: image.transpose(Image.FLIP_LEFT_RIGHT)) if epoch % 2 else (lambda image: image)
'''


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A .npz of SAMPLES random SHAPE images and their labels."""
    rng = np.random.default_rng(1234)
    images = rng.integers(0, 256, (SAMPLES, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, SAMPLES)
    path = tmp_path_factory.mktemp("source") / "source.npz"
    np.savez(path, images=images, labels=labels)
    return path, images, labels


@pytest.fixture(scope="session")
def caches(source, tmp_path_factory) -> dict[str, Path]:
    """npy (2 epochs), png (2 epochs) and jpg (1 epoch) caches of `source`, 50 samples per shard,
    built by `cachegen build` (in this process, through its click entry point: a second each)."""
    from click.testing import CliRunner

    from cachegen.cli import main

    root = tmp_path_factory.mktemp("caches")
    (root / "rt_flip.py").write_text(_FACTORY)
    sys.path.insert(0, str(root))
    try:
        for encoding, epochs in (("npy", 2), ("png", 2), ("jpg", 1)):
            args = ["build", str(source[0]), "--out", str(root / encoding), "--epochs", str(epochs), "--workers", "1",
                    "--format", encoding, "--shard-size", str(SHARD_SIZE), "--transform", "rt_flip:factory", "--quiet"]
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, f"cachegen {' '.join(args)} failed:\n{result.output}{result.exception!r}"
    finally:
        sys.path.remove(str(root))
    return {encoding: root / encoding for encoding in ("npy", "png", "jpg")}


@pytest.fixture(scope="session")
def npy_cache(caches) -> Path:
    return caches["npy"]


@pytest.fixture
def damaged_cache(npy_cache, tmp_path) -> Path:
    """A private copy of the npy cache, for tests that break it."""
    return Path(shutil.copytree(npy_cache, tmp_path / "cache"))
