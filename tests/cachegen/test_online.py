"""The online baseline is the best a user would write: worker processes kept between passes, and
the epoch's transform (set_epoch) reaching them all the same."""

from __future__ import annotations

import multiprocessing

import torch

from cachegen.online import describe_loader, online_dataset, online_loader
from tests.cachegen.conftest import run_cli

# Each epoch's "augmentation" paints the image with 10 x epoch: which epoch a worker used is visible.
PAINT = '''
from PIL import Image


def make(epoch, epochs):
    return lambda image: Image.new(image.mode, image.size, (10 * epoch,) * len(image.getbands()))
'''


def painted(npz_source, folder, epochs: int):
    """The online dataset of a cache of `epochs` epochs built with PAINT."""
    (folder / "paint.py").write_text(PAINT)
    run_cli("build", npz_source[0], "--out", folder / "cache", "--epochs", str(epochs), "--workers", "1", "--quiet",
            "--transform", f"{folder / 'paint.py'}:make")
    return online_dataset(folder / "cache", trust_code=True)  # the test built it: its own factory


def test_workers_persist_between_passes_and_follow_set_epoch(npz_source, tmp_path):
    dataset = painted(npz_source, tmp_path, 3)
    loader = online_loader(dataset, batch_size=48, workers=2, device=torch.device("cpu"))
    assert describe_loader(loader) == "2 workers, persistent, pin_memory=False"
    workers = []
    for epoch in (0, 2, 1):
        dataset.set_epoch(epoch)
        values = torch.cat([images.flatten() for images, _ in loader]).unique().tolist()
        assert values == [10 * epoch], (epoch, values)  # the workers made this epoch's transform
        workers.append(sorted(p.pid for p in multiprocessing.active_children()))
    assert len(workers[0]) == 2 and workers[0] == workers[1] == workers[2]  # the same two processes
    del loader  # its workers end with it


def test_without_workers_set_epoch_applies_in_process(npz_source, tmp_path):
    dataset = painted(npz_source, tmp_path, 2)
    loader = online_loader(dataset, batch_size=100, workers=0, device=torch.device("cpu"))
    assert describe_loader(loader) == "no workers (in this process), pin_memory=False"
    dataset.set_epoch(3)  # wraps: epoch 3 of a 2-epoch schedule is epoch 1
    assert dataset[0][0].unique().tolist() == [10]
