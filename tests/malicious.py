"""Caches an adversary might hand over: a live and a cached cache built with `--transform evil:make`,
each shipped with its `evil.py` beside manifest.json. The module leaves a marker file when it is
imported and another when its factory is called, so a test can prove that it never ran."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

# A working transform factory (odd epochs mirrored) that also records that it ran.
EVIL = '''
from pathlib import Path

from PIL import Image

Path(__file__).resolve().parent.parent.joinpath("IMPORTED").write_text("evil.py was imported")


def make(epoch, epochs):
    Path(__file__).resolve().parent.parent.joinpath("CALLED").write_text("make() was called")
    return (lambda image: image.transpose(Image.FLIP_LEFT_RIGHT)) if epoch % 2 else (lambda image: image)
'''
MARKERS = ("IMPORTED", "CALLED")
SAMPLES = 120


@dataclass(frozen=True)
class EvilCaches:
    root: Path  # the markers are written here, by any copy of evil.py one folder below it
    live: Path  # a live cache, evil.py beside its manifest
    cached: Path  # a cached build of the same source, transform and seed, evil.py beside its manifest

    def ran(self) -> list[str]:
        """The markers evil.py has left: [] if it was never imported."""
        return [m for m in MARKERS if (self.root / m).exists()]

    def forget(self) -> None:
        """Back to never having run: markers removed, the imported module dropped."""
        for m in MARKERS:
            (self.root / m).unlink(missing_ok=True)
        sys.modules.pop("evil", None)

    def with_spec(self, spec: str, out: Path) -> Path:
        """A copy of the live cache whose manifest names `spec` instead (the recorded hash kept)."""
        copy = Path(shutil.copytree(self.live, out))
        raw = json.loads((copy / "manifest.json").read_text())
        raw["transform"]["spec"] = spec
        (copy / "manifest.json").write_text(json.dumps(raw))
        return copy


def build_evil_caches(root: Path) -> EvilCaches:
    """Build both caches from a small random .npz (in this process, in the folder holding evil.py,
    as its author would), then leave evil.py only beside each manifest, and no marker."""
    from cachegen.cli import main

    rng = np.random.default_rng(5)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (SAMPLES, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 4, SAMPLES))
    author = root / "author"
    author.mkdir()
    (author / "evil.py").write_text(EVIL)
    here = os.getcwd()
    os.chdir(author)  # the builder finds `evil` in the current folder, as `cachegen build` run there does
    try:
        for mode in ("live", "cached"):
            result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / mode), "--epochs",
                                               "2", "--shard-size", "40", "--workers", "1", "--quiet", "--mode", mode,
                                               "--transform", "evil:make"])
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(here)
    caches = EvilCaches(root=root, live=root / "live", cached=root / "cached")
    for cache in (caches.live, caches.cached):
        shutil.copy(author / "evil.py", cache / "evil.py")
    shutil.rmtree(author)
    caches.forget()
    return caches


@pytest.fixture(scope="module")
def evil_caches(tmp_path_factory) -> EvilCaches:
    """The caches, built once per test module (import this fixture and `evil` where they are used)."""
    return build_evil_caches(tmp_path_factory.mktemp("evil"))


@pytest.fixture
def evil(evil_caches) -> EvilCaches:
    """The caches, evil.py never run before the test, and forgotten again after it."""
    evil_caches.forget()
    yield evil_caches
    evil_caches.forget()
