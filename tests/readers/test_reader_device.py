"""The device stage: layout, dtype and normalisation on the CPU; the CUDA path where there is a GPU."""

from __future__ import annotations

import pytest
import torch

from readers.device import DeviceCopier, resolve_device

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


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
    with pytest.raises(ValueError, match="'meta' is not supported"):
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
