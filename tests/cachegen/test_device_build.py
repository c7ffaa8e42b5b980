"""`cachegen build --augment-on device` for a cached build: each shard augmented in batches
(cacheaug.batched) in the worker pool, deterministic whatever the worker count."""

from __future__ import annotations

import numpy as np
import torch

from readers import CachedLoader
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli, shard_bytes


def test_a_device_build_is_batched_augmented_and_the_same_for_any_worker_count(build, npz_source, tmp_path):
    one = build("--epochs", "2", "--augment-on", "device", out=tmp_path / "one")
    two = run_cli("build", npz_source[0], "--out", tmp_path / "two", "--shard-size", "50", "--workers", "2",
                  "--quiet", "--epochs", "2", "--augment-on", "device")
    assert two.exit_code == 0 and shard_bytes(one) == shard_bytes(tmp_path / "two")
    per_sample = build("--epochs", "2", out=tmp_path / "cpu")
    m, cpu = manifest(one), manifest(per_sample)
    assert m["mode"] == "cached" and m["transform"]["augment_on"] == "device" and "augment_on" not in cpu["transform"]
    assert m["output_shape"] == cpu["output_shape"] == [32, 32, 3] and m["mean"] == cpu["mean"]
    assert shard_bytes(one).keys() == shard_bytes(per_sample).keys() and shard_bytes(one) != shard_bytes(per_sample)
    assert run_cli("verify", one).output.startswith("ok: ")
    # every epoch holds every sample once, augmented: not the source, and not the other epoch
    _, images, labels = npz_source
    epochs = []
    for e in range(2):
        loader = CachedLoader(one, batch_size=240, device="cpu", normalize=False, shuffle=False)
        loader.set_epoch(e)
        (x, y), = list(loader)
        epochs.append(x)
        assert sorted(y.tolist()) == sorted(labels.tolist())
    source = {images[i].transpose(2, 0, 1).tobytes() for i in range(len(images))}
    assert sum(x.numpy().tobytes() in source for x in epochs[0]) < 24
    assert not torch.equal(epochs[0], epochs[1])


def test_a_device_build_needs_one_image_shape(tmp_path):
    from PIL import Image

    for i, size in enumerate([(40, 40), (48, 40)]):
        (tmp_path / "src" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size[1], size[0], 3), 9 * i, np.uint8)).save(tmp_path / "src" / "a" / f"{i}.png")
    result = run_cli("build", tmp_path / "src", "--out", tmp_path / "c", "--augment-on", "device", "--quiet",
                     "--transform", "imagenet", "--size", "32", "--workers", "1", expect=1)
    assert_one_line_error(result, "--augment-on device augments whole batches", "pass --resize N")
