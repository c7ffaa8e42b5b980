"""The builder's promises, checked the same way for every kind of source (tests/cachegen/test_sources_*.py):
small generated images, encoded as the kind stores them; real worker processes and a real Dask cluster."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli, shard_bytes
from tests.cachegen.test_dask import dask_build, tree

SIDE = 12  # small images: every build here takes a second or two


def images(n: int = 40, classes: int = 3, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """`n` random RGB images (SIDE x SIDE uint8) and their labels 0..classes-1 (every class present)."""
    rng = np.random.default_rng(seed)
    return ([rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)],
            [k % classes for k in range(n)])


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def build(spec: str, out: Path, *args: str, workers: int = 1, expect: int = 0):
    """`cachegen build SPEC` into `out`: 2 epochs of the cifar preset, shards of 16, quiet."""
    return run_cli("build", spec, "--out", out, "--epochs", "2", "--transform", "cifar", "--shard-size", "16",
                   "--workers", workers, "--quiet", *args, expect=expect)


def stored(out: Path, pixels: list[np.ndarray], labels: list[int], *args: str, spec: str) -> None:
    """Built with --transform none, the cache holds every source image as it is, with its label."""
    build(spec, out, "--transform", "none", *args)
    m = manifest(out)
    data = {}
    for shard in m["epoch_list"][0]["shards"]:
        raw = (out / shard["path"]).read_bytes()
        for offset, size, label, index in zip(shard["offsets"], shard["sizes"], shard["labels"], shard["indices"]):
            data[index] = (np.load(io.BytesIO(raw[offset:offset + size])), label)
    assert sorted(data) == list(range(len(pixels)))
    assert [int(data[i][1]) for i in range(len(pixels))] == labels
    for i, expected in enumerate(pixels):
        assert np.array_equal(data[i][0], expected), f"image {i} differs"


def same_bytes_for_any_worker_count(tmp_path: Path, spec: str, *args: str) -> None:
    build(spec, tmp_path / "one", *args, workers=1)
    build(spec, tmp_path / "two", *args, workers=2)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")


def same_bytes_on_dask(cluster, tmp_path: Path, spec: str, *args: str) -> None:
    """A Dask build (each worker opens the source itself, from what the client pickles) writes a local build's bytes."""
    common = [spec, "--epochs", "2", "--transform", "cifar", "--shard-size", "16", *args]
    build(spec, tmp_path / "local", *args, workers=2)
    run = dask_build([*common, "--out", str(tmp_path / "dask")], cluster.address)
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out
    assert tree(tmp_path / "dask") == tree(tmp_path / "local")


def changed_source_refuses_resume(tmp_path: Path, spec: str | None, change, *args: str, build=None) -> None:
    """A build, its source changed (`change()`), the same command: refused, naming the source.
    `build(out, *args, expect=...)`: how to build (default: `build(spec, ...)`)."""
    build = build or _of(spec)
    out = tmp_path / "resumed"
    build(out, *args)
    before = shard_bytes(out)
    change()
    result = build(out, *args, expect=1)
    assert_one_line_error(result, "holds a different cache", "source")
    assert shard_bytes(out) == before


def bad_item_skipped(tmp_path: Path, spec: str | None, bad: int, n: int, *args: str, build=None) -> None:
    """With sample `bad` unreadable: refused in one line naming it; under --on-error skip, built without it.
    `build`: as changed_source_refuses_resume's."""
    build = build or _of(spec)
    assert_one_line_error(build(tmp_path / "failed", *args, expect=1), "cannot read", "--on-error skip")
    out = tmp_path / "skipped"
    build(out, "--on-error", "skip", *args)
    m = manifest(out)
    assert m["skipped"] == [bad]
    assert all(e["samples"] == n - 1 for e in m["epoch_list"])
    assert (out / "skipped.txt").read_text().startswith(f"{bad}\t")


def _of(spec: str):
    return lambda out, *args, expect=0: build(spec, out, *args, expect=expect)


def read_from_another_folder(monkeypatch, folder: Path, spec: str, index: int, expected: np.ndarray) -> None:
    """The source opened from `spec` relative to `folder`, pickled, and read in another current
    folder (as a Dask worker reads it, in a folder of its own) gives `expected` at `index`."""
    from cachegen.sources import open_source
    import pickle

    monkeypatch.chdir(folder)
    data = pickle.dumps(open_source(spec))
    monkeypatch.chdir(folder.parent)
    assert np.array_equal(np.asarray(pickle.loads(data).load(index)), expected)
