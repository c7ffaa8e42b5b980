"""The device stage: layout, dtype and normalisation on the CPU; the CUDA path where there is a GPU."""

from __future__ import annotations

import pytest
import torch

from readers.device import DeviceCopier, check_device, pick_device, resolve_device

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
cuda = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (5, 6, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _expected(hwc: torch.Tensor) -> torch.Tensor:
    x = hwc.permute(0, 3, 1, 2).double() / 255
    return (x - torch.tensor(MEAN, dtype=torch.double).view(1, 3, 1, 1)) / torch.tensor(STD, dtype=torch.double).view(
        1, 3, 1, 1)


def _copier(**kw) -> DeviceCopier:
    return DeviceCopier(**{"device": torch.device("cpu"), "normalize": True, "mean": MEAN, "std": STD, **kw})


def _run(copier: DeviceCopier, hwc: torch.Tensor) -> torch.Tensor:
    host = hwc.permute(0, 3, 1, 2).contiguous() if copier.host_channels_first else hwc
    return copier.finish(copier.start(host, torch.arange(len(hwc))))[0]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 2e-2)])
def test_normalise_matches_the_formula(dtype, tol, channels_last):
    hwc = _batch()
    out = _run(_copier(dtype=dtype, channels_last=channels_last), hwc)
    assert out.dtype == dtype and out.shape == (5, 3, 6, 7)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out.double(), _expected(hwc), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("channels_last", [False, True])
def test_without_normalize_batches_stay_uint8(channels_last):
    hwc = _batch()
    out = _run(_copier(normalize=False, channels_last=channels_last), hwc)
    assert out.dtype == torch.uint8
    assert torch.equal(out, hwc.permute(0, 3, 1, 2))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_cpu_host_layout():
    # Only a uint8 NCHW batch is transposed by the gather; the others travel as HWC.
    assert _copier(normalize=False).host_channels_first
    assert not _copier(normalize=False, channels_last=True).host_channels_first
    assert not _copier().host_channels_first
    assert not _copier().pin


def test_bad_options_are_quoted():
    with pytest.raises(ValueError, match="dtype torch.int32"):
        _copier(dtype=torch.int32)
    with pytest.raises(ValueError, match=r"std \[0.2, 0.0\]"):
        DeviceCopier(device=torch.device("cpu"), normalize=True, mean=(0.1, 0.2), std=(0.2, 0.0))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'meta' is not supported: use cpu, cuda or cuda:N"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="'banana' is not a torch device"):
        resolve_device("banana")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="'cuda' was asked for but CUDA is not available"):
        resolve_device("cuda")


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_side_stream_matches_the_cpu(normalize, channels_last):
    hwc = _batch()
    gpu = _copier(device=resolve_device("cuda"), normalize=normalize, channels_last=channels_last)
    assert gpu.pin and not gpu.host_channels_first
    pending = gpu.start(hwc.pin_memory(), torch.arange(5).pin_memory())
    images, labels = gpu.finish(pending)
    assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
    cpu = _run(_copier(normalize=normalize, channels_last=channels_last), hwc)
    torch.testing.assert_close(images.cpu(), cpu)


GPUS = dict(cuda_available=True, device_count=2)


@pytest.mark.parametrize(("requested", "current", "env", "expected"), [
    (None, 0, {}, "cuda:0"),  # a GPU machine's default: the current GPU
    ("cuda", 1, {}, "cuda:1"),  # after torch.cuda.set_device(1)
    ("cuda", 0, {"LOCAL_RANK": "1"}, "cuda:1"),  # torchrun: the rank's GPU, whatever is current
    (None, 0, {"LOCAL_RANK": "1"}, "cuda:1"),
    ("cuda:0", 1, {"LOCAL_RANK": "1"}, "cuda:0"),  # an explicit index wins
    (torch.device("cuda", 1), 0, {}, "cuda:1"),
    ("cpu", 0, {"LOCAL_RANK": "1"}, "cpu"),
    ("cuda", None, {}, "cuda"),  # check_device: an index-less cuda stays so until a pass starts
])
def test_pick_device_finds_the_gpu_of_this_rank(requested, current, env, expected):
    assert pick_device(requested, current=current, env=env, **GPUS) == torch.device(expected)


@pytest.mark.parametrize(("requested", "current", "count", "env", "expected"), [
    ("cuda", 3, 4, {"LOCAL_RANK": "1"}, "cuda:3"),  # Lightning devices=[2, 3], rank 1: set_device(3) wins
    (None, 2, 4, {"LOCAL_RANK": "0"}, "cuda:2"),  # and rank 0: set_device(2)
    ("cuda", 0, 1, {"LOCAL_RANK": "1"}, "cuda:0"),  # SLURM, one GPU per task: task 1 sees its GPU as cuda:0
    ("cuda", 0, 4, {"LOCAL_RANK": "3"}, "cuda:3"),  # torchrun, nothing set: the rank's GPU
    ("cuda:1", 3, 4, {"LOCAL_RANK": "2"}, "cuda:1"),  # an explicit index still wins over both
])
def test_pick_device_respects_an_explicit_current_device(requested, current, count, env, expected):
    assert pick_device(requested, cuda_available=True, device_count=count, current=current, env=env) == \
        torch.device(expected)


@pytest.mark.parametrize(("requested", "env", "message"), [
    ("cuda:2", {}, r"device cuda:2 does not exist: 2 CUDA GPU\(s\) here, cuda:0 to cuda:1"),
    ("cuda", {"LOCAL_RANK": "3"}, r"device cuda:3 \(LOCAL_RANK=3\) does not exist: 2 CUDA GPU\(s\) here"),
    (None, {"LOCAL_RANK": "x"}, "LOCAL_RANK='x' in the environment is not a GPU index"),
    ("gpu", {}, "'gpu' is not a torch device: use cpu, cuda or cuda:N"),
])
def test_pick_device_errors_are_one_line(requested, env, message):
    with pytest.raises(ValueError, match=message) as error:
        pick_device(requested, current=0, env=env, **GPUS)
    assert "\n" not in str(error.value)


def test_pick_device_without_cuda():
    assert pick_device(None, cuda_available=False, device_count=0, current=None, env={"LOCAL_RANK": "1"}) == \
        torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda:1' was asked for but CUDA is not available"):
        pick_device("cuda:1", cuda_available=False, device_count=0, current=None, env={})


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")
def test_check_device_and_a_cpu_copier_under_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")  # no GPU: the CPU whatever the rank
    assert check_device(None) == resolve_device(None) == torch.device("cpu")
    copier = _copier()
    assert copier.device is None  # bound when the first batch (or a loader's pass) starts
    _run(copier, _batch())
    assert copier.device == torch.device("cpu")


def _device_stage(gpu, spec: str, placed: bool):
    """One batch through the device stage on the stand-in GPU: DeviceCopier.convert with the
    preset's batched augmentation (placed as a loader places it, or moved with Kornia's samplers),
    counted from the batch's arrival to the normalised result."""
    import functools

    from cacheaug.batched import augment_batch, make_batched, place

    meta = torch.device("meta")
    augmentation = make_batched(spec, epoch=0, epochs=2, size=24, channels=3)
    augmentation = place(augmentation, meta) if placed else augmentation.to(meta)
    copier = _copier(device=meta, channels_last=True)
    copier.bind()
    host = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images = gpu.device_tensor(host)
    gpu.counting = True
    out = copier.convert(images, functools.partial(augment_batch, augmentation, seed=5, name=spec, shape=(3, 24, 24)))
    gpu.counting = False
    return gpu.value(out)


@pytest.mark.parametrize("spec", ["cifar", "imagenet", "mnist", "val"])
def test_device_augmentation_never_makes_the_host_wait(spec):
    from devicecount import MetaGPU

    with MetaGPU() as gpu:
        out = _device_stage(gpu, spec, placed=True)
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32 and out.isfinite().all()
    # Kornia's parameters, drawn on the CPU, travel with non-blocking copies; nothing comes back.
    assert "blocking" not in gpu.to_device and gpu.to_host == []
    with MetaGPU() as gpu:  # Kornia's samplers moved to the device too: it reads parameters back
        _device_stage(gpu, spec, placed=False)
    assert gpu.to_host or spec in ("imagenet", "val")  # imagenet's and val's crops draw nothing to read back


def test_device_augmentation_ignores_the_callers_autocast():
    """Under the training loop's bf16 autocast a batch gets the same pixels (Kornia's warp is a
    matmul, which autocast would run in bf16)."""
    import functools

    from cacheaug.batched import augment_batch, make_batched, place

    host = torch.randint(0, 256, (8, 28, 28, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    copier = _copier(channels_last=True)
    augmentation = place(make_batched("mnist", epoch=0, epochs=2, size=28, channels=3), torch.device("cpu"))
    augment = functools.partial(augment_batch, augmentation, seed=9, name="mnist", shape=(3, 28, 28))
    plain = copier.convert(host, augment)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = copier.convert(host, augment)
        assert torch.is_autocast_enabled("cpu")  # and the caller's autocast is on again after
    assert under.dtype == torch.float32 and torch.equal(under, plain)


class _Tinted(torch.nn.Module):
    """A factory's augmentation with a buffer of its own and a Kornia augmentation inside."""

    def __init__(self) -> None:
        import kornia.augmentation as K

        super().__init__()
        self.register_buffer("tint", torch.tensor([1.0, 0.9, 0.8]).view(1, 3, 1, 1))
        self.flip = K.RandomHorizontalFlip()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flip(x) * self.tint


@pytest.mark.parametrize("spec", ["cifar", "imagenet", "mnist", "val", "factory"])
def test_a_new_cache_epoch_placed_on_the_device_makes_no_blocking_copy(spec):
    """A live pass places each cache epoch's augmentation when the epoch starts, within the pass:
    placing it, as augmenting with it, must not make the host wait (sync debug mode raises on GPU)."""
    import functools

    from cacheaug.batched import augment_batch, make_batched, place
    from devicecount import MetaGPU

    def made():
        return _Tinted() if spec == "factory" else make_batched(spec, epoch=1, epochs=2, size=24, channels=3)

    host = torch.randint(0, 256, (8, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    on_cpu = _copier(channels_last=True)
    expected = on_cpu.convert(host, functools.partial(augment_batch, place(made(), torch.device("cpu")), seed=7,
                                                     name=spec, shape=(3, 24, 24)))
    with MetaGPU() as gpu:
        copier = _copier(device=torch.device("meta"), channels_last=True)
        copier.bind()
        images = gpu.device_tensor(host)
        gpu.counting = True
        augmentation = place(made(), torch.device("meta"))
        out = copier.convert(images, functools.partial(augment_batch, augmentation, seed=7, name=spec,
                                                       shape=(3, 24, 24)))
        gpu.counting = False
    assert "blocking" not in gpu.to_device and gpu.to_host == []
    assert all(t.device.type == "meta" for t in augmentation.buffers())
    assert gpu.to_device.count("non_blocking") >= (1 if spec == "factory" else 0)  # the tint buffer
    torch.testing.assert_close(gpu.value(out), expected)  # the same draws, made on the CPU


def test_full_float32_under_the_callers_fp32_precision_api():
    """A training script that set torch's fp32_precision API (torch >= 2.9): reading the legacy
    allow_tf32 flags would raise then; full float32 inside, the caller's settings as they were after."""
    from cacheaug.batched import full_float32

    backends = torch.backends
    if not hasattr(backends, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    knobs = [backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn, backends.mkldnn.matmul,
             backends.mkldnn.conv]
    saved = backends.fp32_precision, [k.fp32_precision for k in knobs]
    try:
        backends.fp32_precision = "tf32"
        backends.mkldnn.matmul.fp32_precision = "bf16"
        before = [k.fp32_precision for k in knobs]
        for device in ("cuda", "cpu"):  # only torch's settings are touched: no GPU needed for cuda's
            with full_float32(torch.device(device)):
                inside = [k.fp32_precision for k in knobs]
                assert inside[:3] == ["ieee"] * 3 if device == "cuda" else inside[3:] == ["ieee"] * 2
            assert [k.fp32_precision for k in knobs] == before
        assert backends.fp32_precision == "tf32"
    finally:
        for k, value in zip(knobs, saved[1]):
            k.fp32_precision = value
        backends.fp32_precision = saved[0]
    assert isinstance(backends.cuda.matmul.allow_tf32, bool)  # the legacy flags readable again


def test_a_loader_built_before_set_device_moves_its_transform_when_a_pass_starts(npy_cache, monkeypatch):
    """Under torchrun a loader may be built before torch.cuda.set_device(local_rank): a module
    batch_transform must not be put on the GPU current then (it goes where the pass is bound).
    Without a GPU, torch's own CUDA queries stand in for a machine with two."""
    from readers import CachedLoader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    transform = _Scaled()
    loader = CachedLoader(npy_cache, batch_size=8, batch_transform=transform)
    assert loader.options.device == torch.device("cuda")  # index-less: bound to a GPU when a pass starts
    assert transform.scale.device == torch.device("cpu")  # not moved yet: no GPU chosen


class _Scaled(torch.nn.Module):
    """A module batch_transform with a buffer (the images scaled by it)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images * self.scale, labels
