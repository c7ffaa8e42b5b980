"""`cachegen build --augment-on device` for a cached build: each shard augmented in batches
(cacheaug.batched), in the worker pool or (--device) in the main process on a GPU, deterministic
whatever the worker count."""

from __future__ import annotations

import os

import numpy as np
import pytest
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


cuda = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_augmenting_in_this_process_gives_the_bytes_the_workers_give(npz_source, tmp_path, workers, gpu_hidden):
    """--device cpu: this process augments each shard (as it does on a GPU with --device cuda) while
    the workers load the source and encode and write the shards: the same bytes as the workers'
    own batched augmentation, whatever the worker count."""
    common = [npz_source[0], "--shard-size", "50", "--quiet", "--epochs", "2", "--augment-on", "device"]
    run_cli("build", *common, "--out", tmp_path / "workers", "--workers", "2")
    run_cli("build", *common, "--out", tmp_path / "here", "--workers", workers, "--device", "cpu")
    assert shard_bytes(tmp_path / "here") == shard_bytes(tmp_path / "workers")
    assert manifest(tmp_path / "here") == manifest(tmp_path / "workers")
    assert run_cli("verify", tmp_path / "here").output.startswith("ok: ")


def test_the_device_type_is_recorded_and_another_type_cannot_extend_the_cache(npz_source, tmp_path, gpu_hidden):
    import json

    common = [npz_source[0], "--shard-size", "50", "--quiet", "--augment-on", "device", "--workers", "1"]
    run_cli("build", *common, "--out", tmp_path / "c", "--epochs", "1")
    run_cli("build", *common, "--out", tmp_path / "here", "--epochs", "1", "--device", "cpu")
    assert manifest(tmp_path / "c")["transform"]["augment_device"] == "cpu"
    assert manifest(tmp_path / "here")["transform"]["augment_device"] == "cpu"
    # A cache made on a GPU (its manifest says so) is not extended here on the CPU: the new epochs'
    # bytes would be another device type's.
    path = tmp_path / "c" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["transform"]["augment_device"] = "cuda"
    path.write_text(json.dumps(raw))
    before = shard_bytes(tmp_path / "c")
    result = run_cli("build", *common, "--out", tmp_path / "c", "--epochs", "2", expect=1)
    assert_one_line_error(result, "differs in: transform (augment_device cuda -> cpu)")
    assert shard_bytes(tmp_path / "c") == before


RECORDING = """
import os, pathlib

def make(epoch, epochs):
    def augment(batch):  # a batched augmentation that notes which process ran it
        pathlib.Path(os.environ["AUGMENTED_IN"], str(os.getpid())).touch()
        return batch.flip(-1) if epoch % 2 else batch.flip(-2)
    return augment
"""


def test_with_device_this_process_augments_and_the_workers_do_not(npz_source, tmp_path, monkeypatch, gpu_hidden):
    (tmp_path / "recording.py").write_text(RECORDING)
    common = [npz_source[0], "--shard-size", "50", "--quiet", "--epochs", "2", "--augment-on", "device",
              "--transform", f"{tmp_path / 'recording.py'}:make", "--workers", "2"]
    ran = {}
    for name, extra in (("workers", []), ("here", ["--device", "cpu"])):
        (tmp_path / name / "pids").mkdir(parents=True)
        monkeypatch.setenv("AUGMENTED_IN", str(tmp_path / name / "pids"))
        run_cli("build", *common, *extra, "--out", tmp_path / name / "cache")
        ran[name] = {int(p.name) for p in (tmp_path / name / "pids").iterdir()}
    assert ran["here"] == {os.getpid()}  # the build ran in this process (CliRunner)
    assert len(ran["workers"] - {os.getpid()}) >= 1  # the workers augmented (this process probed the first batch)
    assert shard_bytes(tmp_path / "here" / "cache") == shard_bytes(tmp_path / "workers" / "cache")


def test_a_build_interrupted_on_one_side_of_the_device_option_resumes_on_the_other(npz_source, tmp_path, gpu_hidden):
    common = [npz_source[0], "--shard-size", "50", "--quiet", "--augment-on", "device", "--workers", "2"]
    run_cli("build", *common, "--out", tmp_path / "whole", "--epochs", "3")
    run_cli("build", *common, "--out", tmp_path / "grown", "--epochs", "1", "--device", "cpu")
    run_cli("build", *common, "--out", tmp_path / "grown", "--epochs", "3")  # epochs 1 and 2 in the workers
    assert shard_bytes(tmp_path / "grown") == shard_bytes(tmp_path / "whole")


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "--device cpu is where --augment-on device augments a cached build: add --augment-on"),
    (["--device", "cpu", "--augment-on", "device", "--mode", "live"], "a live cache is augmented as it is read"),
    (["--device", "gpu", "--augment-on", "device"], "unknown --device 'gpu': use cpu or cuda"),
    (["--device", "cuda:99", "--augment-on", "device"], "--device cuda:99"),
])
def test_a_bad_device_for_a_build_is_one_line(build, args, message, tmp_path):
    assert_one_line_error(build(*args, expect=1), message)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_device_with_a_build_that_auto_mode_makes_live_is_one_line(npz_source, tmp_path):
    result = run_cli("build", npz_source[0], "--out", tmp_path / "c", "--augment-on", "device", "--device", "cpu",
                     "--max-cache-gb", "0.000001", "--workers", "1", "--quiet", expect=1)
    assert_one_line_error(result, "--mode auto chose a live cache", "drop --device cpu, or pass --mode cached")
    assert not (tmp_path / "c" / "manifest.json").exists()


@cuda
def test_a_build_augmented_with_cuda_is_deterministic_and_equivalent(npz_source, tmp_path):
    common = [npz_source[0], "--shard-size", "50", "--quiet", "--epochs", "2", "--augment-on", "device"]
    run_cli("build", *common, "--out", tmp_path / "gpu1", "--workers", "1", "--device", "cuda")
    run_cli("build", *common, "--out", tmp_path / "gpu2", "--workers", "2", "--device", "cuda")
    run_cli("build", *common, "--out", tmp_path / "cpu", "--workers", "2", "--device", "cpu")
    assert shard_bytes(tmp_path / "gpu1") == shard_bytes(tmp_path / "gpu2")  # one device type: the same bytes
    gpu, cpu = manifest(tmp_path / "gpu1"), manifest(tmp_path / "cpu")
    assert gpu["output_shape"] == cpu["output_shape"] and gpu["mean"] == cpu["mean"]  # mean: of the source
    assert gpu["transform"]["augment_device"] == "cuda" and cpu["transform"]["augment_device"] == "cpu"
    assert run_cli("verify", tmp_path / "gpu1").output.startswith("ok: ")
    loader = CachedLoader(tmp_path / "gpu1", batch_size=240, device="cpu", normalize=False, shuffle=False)
    (x, y), = list(loader)
    assert sorted(y.tolist()) == sorted(npz_source[2].tolist())
    source = {img.transpose(2, 0, 1).tobytes() for img in npz_source[1]}
    assert sum(img.numpy().tobytes() in source for img in x) < 24  # augmented


@pytest.mark.parametrize("shape", [(6, 9, 7), (6, 9, 7, 1), (6, 9, 7, 3), (6, 9, 7, 4)])
def test_an_array_source_gives_a_batched_build_the_pixels_load_gives(shape):
    """A device build (and a live source pass) takes an array source's pixels as they are, without
    making a PIL image and reading it back: the same bytes."""
    from cacheaug.transforms import to_hwc_uint8
    from cachegen.sources import ArraySource

    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    source = ArraySource(images, np.zeros(6, np.int64), ("a",), kind="npz", description="test")
    for i in range(6):
        fast, slow = source.pixels(i), to_hwc_uint8(source.load(i))
        assert fast.dtype == np.uint8 and fast.shape == slow.shape and np.array_equal(fast, slow)


def test_a_batched_build_converting_channels_takes_the_converted_pixels(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "gray.npz", images=rng.integers(0, 256, (40, 16, 16), dtype=np.uint8),
             labels=rng.integers(0, 2, 40))
    run_cli("build", tmp_path / "gray.npz", "--out", tmp_path / "c", "--channels", "3", "--augment-on", "device",
            "--transform", "val", "--quiet", "--workers", "1", "--epochs", "1")
    m = manifest(tmp_path / "c")
    assert m["output_shape"] == [16, 16, 3] and len(m["mean"]) == 3
    (x, _), = list(CachedLoader(tmp_path / "c", batch_size=40, device="cpu", normalize=False, shuffle=False))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey, as three equal channels


def test_device_build_batches_are_bounded_in_bytes_by_the_image_shape_alone():
    from cachegen.execute import BATCH_BYTES, BUILD_BATCH, build_batch

    assert build_batch((32, 32, 3)) == build_batch((224, 224, 3)) == BUILD_BATCH  # the seeds of every build so far
    big = build_batch((1024, 1024, 3))
    assert 1 <= big < BUILD_BATCH and big * 1024 * 1024 * 3 * 4 <= BATCH_BYTES < (big + 1) * 1024 * 1024 * 3 * 4
    assert build_batch((20000, 20000, 3)) == 1
