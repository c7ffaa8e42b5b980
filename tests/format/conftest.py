"""Fixtures for the contract tests: small caches built by `cachegen build`, and copies to damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import make_npz

SAMPLES, SHARD_SIZE, CLASSES = 240, 50, 4  # 5 shards an epoch: 4 x 50 + 40


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Path]:
    """Caches of one 240-image source: "npy" (seed 0, 2 epochs), "other" (seed 1, same sizes),
    "png" (1 epoch) and "live" (2 epochs, the source pass)."""
    from click.testing import CliRunner

    from cachegen.cli import main

    root = tmp_path_factory.mktemp("format")
    source = make_npz(root / "src.npz", n=SAMPLES, classes=CLASSES)[0]
    for name, extra in (("npy", ["--seed", "0"]), ("other", ["--seed", "1"]), ("png", ["--format", "png"]),
                        ("live", ["--mode", "live"])):
        args = ["build", str(source), "--out", str(root / name), "--epochs", "1" if name == "png" else "2",
                "--shard-size", str(SHARD_SIZE), "--workers", "1", "--quiet", *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"cachegen {' '.join(args)} failed:\n{result.output}{result.exception!r}"
    return {name: root / name for name in ("npy", "other", "png", "live")}


@pytest.fixture
def copy(built, tmp_path):
    """copy(name) -> a private copy of a built cache, to damage."""
    return lambda name="npy": Path(shutil.copytree(built[name], tmp_path / name))
