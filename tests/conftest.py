"""Fixtures shared by the builder and reader tests: small generated sources, no network."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` (registered in pyproject.toml): `pytest -m cuda` selects every CUDA test,
    and without a GPU each is skipped, not failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_leftover_threads_or_processes():
    """Fail any test that leaves a thread or a child process behind (a pool or prefetcher not shut down)."""
    threads = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        children = multiprocessing.active_children()
        if not extra and not children:
            return
        time.sleep(0.05)
    pytest.fail(f"test left behind threads {extra} / processes {children}")


def make_npz(path, n: int = 240, size: int = 32, channels: int = 3, classes: int = 4, seed: int = 0):
    """A small random image set as a .npz source; returns (path, images, labels)."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels == 0 else (n, size, size, channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, classes, n)
    np.savez(path, images=images, labels=labels)
    return path, images, labels


def make_seg_npz(path, n: int = 40, size: int = 16, classes: int = 5, seed: int = 0,
                 mask_classes: list[str] | None = None) -> tuple:
    """A segmentation .npz: images whose first channel is 20 * their mask (the other two random); (path, images, masks)."""
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, classes, (n, size, size)).astype(np.uint8)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[..., 0] = masks * 20
    arrays = {"images": images, "labels": rng.integers(0, 3, n), "masks": masks}
    if mask_classes is not None:
        arrays["mask_classes"] = np.array(mask_classes)
    np.savez(path, **arrays)
    return path, images, masks


@pytest.fixture
def npz_source(tmp_path):
    return make_npz(tmp_path / "data.npz")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint over HTTP (moto's server, a child process on a free port) for the whole
    session, found by the standard AWS_* variables (AWS_ENDPOINT_URL included): the code under
    test is configured the way a user's is."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import os

    import fsspec.asyn

    from s3server import S3Server

    server = S3Server()
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": server.endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # fsspec's IO thread and its loop's executor thread live for the session: started here, not in a test.
    fsspec.asyn.get_loop()
    from s3server import s3fs_filesystem

    s3fs_filesystem().mkdir("caches")
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def dask_cluster():
    """A real Dask scheduler with 2 worker processes (LocalCluster, in a child process of its own)."""
    pytest.importorskip("distributed")
    from daskcluster import DaskCluster

    cluster = DaskCluster()
    try:
        yield cluster
    finally:
        cluster.stop()
