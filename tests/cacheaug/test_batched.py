"""cacheaug.batched: Kornia presets equivalent to the per-sample ones, seeded per batch, user factories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cacheaug.batched import augment_batch, batch_seed, make_batched, place
from cacheaug.transforms import TransformError, augment, make_transform, to_pil

# (preset, channels, stored side, output size): cifar crops at the source's size, imagenet
# crops a 224-like output from a larger stored source, mnist is grayscale.
CASES = [("cifar", 3, 32, 32), ("cifar", 1, 32, 32), ("imagenet", 3, 40, 24), ("mnist", 1, 28, 28)]


def _source(channels: int, side: int, n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8)


def _batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


@pytest.mark.parametrize(("spec", "channels", "side", "size"), CASES)
def test_presets_match_the_per_sample_shapes_and_really_augment(spec, channels, side, size):
    images = _source(channels, side)
    per_sample = augment(make_transform(spec, epoch=0, epochs=2, size=size), to_pil(images[0]), seed=0, epoch=0,
                         index=0)
    outs = []
    for epoch in (0, 1):
        batched = make_batched(spec, epoch=epoch, epochs=2, size=size, channels=channels)
        outs.append(augment_batch(batched, _batch(images), seed=batch_seed(0, epoch, 0), name=spec))
    out = outs[0]
    assert out.dtype == torch.float32 and tuple(out.shape) == (len(images), *per_sample.shape[2:], *per_sample.shape[:2])
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    if side == size:  # same geometry: an augmented batch is not its source
        assert not torch.allclose(out, _batch(images), atol=1e-3)
    assert not torch.equal(outs[0], outs[1])  # another epoch, other draws
    # per sample: draws differ between the samples of one batch (not one draw for all)
    same = make_batched(spec, epoch=0, epochs=2, size=size, channels=channels)
    twins = augment_batch(same, _batch(np.repeat(images[:1], 8, axis=0)), seed=5, name=spec)
    assert len({twins[i].numpy().tobytes() for i in range(8)}) > 1


def test_linear_schedule_weakens_the_presets():
    first, last = (repr(make_batched("cifar", epoch=e, epochs=5, size=32, channels=3, schedule="linear")) for e in (0, 4))
    assert first != last
    constant = {repr(make_batched("cifar", epoch=e, epochs=5, size=32, channels=3)) for e in (0, 4)}
    assert len(constant) == 1
    with pytest.raises(TransformError, match="unknown schedule 'cubic'"):
        make_batched("cifar", epoch=0, epochs=5, size=32, channels=3, schedule="cubic")
    with pytest.raises(TransformError, match="unknown transform preset 'nope'"):
        make_batched("nope", epoch=0, epochs=5, size=32, channels=3)


def test_a_seed_fixes_the_batch_and_the_callers_generators_are_left_alone():
    batched = make_batched("cifar", epoch=0, epochs=2, size=32, channels=3)
    images = _batch(_source(3, 32))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = augment_batch(batched, images, seed=batch_seed(7, 0, 3), name="cifar")
    b = augment_batch(batched, images, seed=batch_seed(7, 0, 3), name="cifar")
    c = augment_batch(batched, images, seed=batch_seed(7, 0, 4), name="cifar")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    # the seed mixes every part: epoch, batch, stream
    seeds = {batch_seed(7, 0, 3), batch_seed(7, 1, 3), batch_seed(7, 0, 4), batch_seed(7, 0, 3, stream=1),
             batch_seed(8, 0, 3)}
    assert len(seeds) == 5


FACTORIES = '''
import kornia.augmentation as K
import torch

def kornia_pipeline(epoch, epochs):
    return K.AugmentationSequential(K.RandomHorizontalFlip(), K.RandomAffine(degrees=15 * (1 + epoch), p=1.0))

def returns_uint8(epoch, epochs):
    return lambda x: (x * 255).to(torch.uint8)

def drops_a_sample(epoch, epochs):
    return lambda x: x[1:]

def returns_a_list(epoch, epochs):
    return lambda x: [x]
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "batch_factories.py"
    path.write_text(FACTORIES)
    return str(path)


def test_a_user_factory_may_return_a_kornia_pipeline(factories):
    images = _batch(_source(3, 32))
    outs = [augment_batch(make_batched(f"{factories}:kornia_pipeline", epoch=e, epochs=2, size=32, channels=3),
                          images, seed=1, name="f") for e in (0, 1)]
    assert outs[0].shape == images.shape and not torch.allclose(outs[0], images, atol=1e-3)
    assert not torch.equal(outs[0], outs[1])
    again = augment_batch(make_batched(f"{factories}:kornia_pipeline", epoch=0, epochs=2, size=32, channels=3),
                          images, seed=1, name="f")
    assert torch.equal(outs[0], again)


@pytest.mark.parametrize(("factory", "message"), [
    ("returns_uint8", r"returned a uint8 tensor of shape \(16, 3, 32, 32\) .* must return a float \(B, C, H, W\)"),
    ("drops_a_sample", r"returned a float32 tensor of shape \(15, 3, 32, 32\) .* with B = 16"),
    ("returns_a_list", r"returned list for a batch"),
])
def test_a_bad_factory_output_is_one_line_naming_the_factory(factories, factory, message):
    spec = f"{factories}:{factory}"
    with pytest.raises(TransformError, match=message) as caught:
        augment_batch(make_batched(spec, epoch=0, epochs=2, size=32, channels=3), _batch(_source(3, 32)), seed=0,
                      name=spec)
    assert "\n" not in str(caught.value) and spec in str(caught.value)


def test_a_wrong_output_shape_is_named_when_the_shape_is_known():
    with pytest.raises(TransformError, match=r"must return .*\(C, H, W\) = \(3, 24, 24\)"):
        augment_batch(make_batched("cifar", epoch=0, epochs=2, size=32, channels=3), _batch(_source(3, 32)), seed=0,
                      name="cifar", shape=(3, 24, 24))


class _Scaled(torch.nn.Module):
    """A factory's module with a buffer: it must sit on the batch's device."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gain", torch.full((1, 1, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def _flip_and_scale() -> torch.nn.Module:
    import kornia.augmentation as K

    return torch.nn.Sequential(K.RandomHorizontalFlip(), _Scaled())


def test_place_moves_buffers_and_keeps_kornias_draws_on_the_cpu():
    meta = torch.device("meta")
    placed = place(_flip_and_scale(), meta)
    assert placed[1].gain.device == meta  # the buffer goes with the batch
    assert placed[0].device == torch.device("cpu")  # Kornia draws where it branches on the values: the CPU
    same = lambda x: x  # noqa: E731
    assert place(same, meta) is same


@pytest.mark.cuda
def test_a_placed_module_with_a_buffer_gives_the_cpus_batch_on_cuda():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    cpu = augment_batch(place(_flip_and_scale(), torch.device("cpu")), x, seed=7, name="flip")
    gpu = augment_batch(place(_flip_and_scale(), torch.device("cuda")), x.cuda(), seed=7, name="flip")
    assert torch.equal(gpu.cpu(), cpu)  # the same flips: drawn on the CPU in both
