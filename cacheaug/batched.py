"""Batched augmentation on Kornia: one call augments a whole (B, C, H, W) float batch, with random
parameters drawn per sample, on whatever device the batch is on (CPU or CUDA).

The live reader's device path (`--augment-on device`) uses it: uint8 source batches go to the
device, become float in [0, 1], are augmented here batch by batch, then normalised.

Placement and randomness, the same in the build and the loader (`place`): the augmentation's
parameters and buffers go to the batch's device (non-blocking copies, never through Kornia's
`.to()`, which would rebuild its samplers there), while Kornia draws its random parameters on the
CPU, from torch's CPU generator. Kornia moves each parameter to a CUDA batch with a non-blocking
copy and branches on CPU values, so a batch costs no wait for the GPU; drawn on the GPU instead,
Kornia 0.9 reads some of them back (`.tolist()`, `.any()`), a wait each. A batch is augmented with
torch's CPU generator and the batch's device generator seeded from `batch_seed(...)`, both borrowed
and given back as they were, so a batch depends only on its seed and never moves the caller's
generators: the same seed gives the same parameters on the CPU and on a GPU. It runs in full float32
whatever the caller set: autocast is off inside, and TF32 (or bf16) kernels too (`full_float32`).
The same seed gives the same batch on the same device type (and library versions); per-sample (PIL)
and batched augmentation are equivalent in distribution, not bit-equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from cacheaug.transforms import TransformError, make_transform, strength
from cacheformat.manifest import AUGMENT_ON  # noqa: F401  (re-exported: where a live cache augments)
from cacheformat.seeding import sample_seed

BATCH_SALT = 0xBA7C  # keeps batch seeds apart from the per-sample seeds of the same epoch


def batch_seed(seed: int, epoch: int, batch: int, stream: int = 0) -> int:
    """The seed of batch `batch` of epoch `epoch`; `stream` separates independent sequences of
    batches (a loader's order seed and its rank layout)."""
    return sample_seed(sample_seed(seed ^ BATCH_SALT, epoch, batch), stream, 0)


def make_batched(spec: str, *, epoch: int, epochs: int, size: int, channels: int, schedule: str = "constant",
                 factory: Callable | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batched augmentation of `epoch`: a preset's Kornia equivalent, or what a user's
    `module:factory` returns for (epoch, epochs) (any nn.Module or callable over float
    (B, C, H, W) batches in [0, 1], e.g. a `kornia.augmentation.AugmentationSequential`).
    `factory`: as make_transform's (a reader's resolved factory)."""
    if ":" in spec:
        return make_transform(spec, epoch=epoch, epochs=epochs, size=size, schedule=schedule, factory=factory)
    import kornia.augmentation as K

    make_transform("val", epoch=epoch, epochs=epochs, size=size, schedule=schedule)  # checks the schedule
    s = strength(epoch, epochs, schedule)
    if spec == "cifar":
        jitter = 0.2 * s
        return torch.nn.Sequential(
            K.RandomCrop((size, size), padding=max(1, round(size / 8 * s))),
            K.RandomHorizontalFlip(),
            # Saturation needs colour: a grayscale batch is jittered in brightness and contrast only.
            K.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter if channels == 3 else 0.0, p=1.0),
        )
    if spec == "imagenet":
        return torch.nn.Sequential(
            K.RandomResizedCrop((size, size), scale=(1.0 - 0.92 * s, 1.0)),
            K.RandomHorizontalFlip(),
        )
    if spec == "mnist":
        return torch.nn.Sequential(
            K.Resize(size, side="short"), K.CenterCrop(size),
            K.RandomAffine(degrees=10 * s, translate=(0.1 * s, 0.1 * s), p=1.0),
        )
    if spec == "val":
        return torch.nn.Sequential(K.Resize(size, side="short"), K.CenterCrop(size))
    return make_transform(spec, epoch=epoch, epochs=epochs, size=size, schedule=schedule)  # raises: unknown


MASK_KEYS = ["input", "mask"]  # Kornia's data keys of a batch and its masks (geometric steps move both)


def make_batched_pair(spec: str, *, epoch: int, epochs: int, size: int, channels: int, schedule: str = "constant",
                      factory: Callable | None = None) -> Callable:
    """The batched augmentation of `epoch` for batches with masks: called as (images float (B, C, H,
    W) in [0, 1], masks float (B, 1, H, W)) -> (images, masks). A segmentation preset's Kornia
    equivalent (an AugmentationSequential over data_keys input and mask: geometric steps move both,
    the masks nearest-neighbour, ColorJitter the images only), or what a user's `module:factory`
    returns (e.g. such an AugmentationSequential)."""
    if ":" in spec:
        return make_transform(spec, epoch=epoch, epochs=epochs, size=size, schedule=schedule, factory=factory)
    if spec == "none":
        return _identity_pair
    import kornia.augmentation as K

    make_transform("val", epoch=epoch, epochs=epochs, size=size, schedule=schedule)  # checks the schedule
    s = strength(epoch, epochs, schedule)
    if spec == "seg":
        jitter = 0.2 * s
        return K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=(1.0 - 0.7 * s, 1.0)),
            K.RandomHorizontalFlip(),
            K.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter if channels == 3 else 0.0, p=1.0),
            data_keys=MASK_KEYS)
    if spec == "seg-val":
        return K.AugmentationSequential(K.Resize(size, side="short"), K.CenterCrop(size), data_keys=MASK_KEYS)
    raise TransformError(f"transform {spec} augments images alone: batches with masks take seg, seg-val, none or "
                         "a module:factory returning a callable of (images, masks)")


def _identity_pair(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images, masks


def augment_batch_pair(augmentation: Callable, images: torch.Tensor, masks: torch.Tensor, *, seed: int, name: str,
                       shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """augment_batch for a batch and its masks (int64 (B, H, W)): (images float (B, C, H, W) in [0,
    1], masks int64 (B, H, W)), one call moving both, seeded as augment_batch seeds."""
    with seeded(seed, images.device), full_float32(images.device):
        try:
            out = augmentation(images, masks[:, None].to(images.dtype))
        except TransformError:
            raise
        except Exception as e:
            raise TransformError(f"transform {name} failed on a batch of shape {tuple(images.shape)} and its masks: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]) from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TransformError(f"transform {name} returned {type(out).__name__} for a batch and its masks: it must "
                             "return (images, masks)")
    out_images, out_masks = out
    out_images = _checked(out_images, images, name, shape)
    if out_masks.ndim == 4 and out_masks.shape[1] == 1:
        out_masks = out_masks[:, 0]
    if tuple(out_masks.shape) != (len(images), *out_images.shape[2:]):
        raise TransformError(f"transform {name} returned masks of shape {tuple(out_masks.shape)} for images of "
                             f"{tuple(out_images.shape)}: it must move the masks with the images")
    return out_images, out_masks.round().to(torch.int64)


def place(augmentation: Callable[[torch.Tensor], torch.Tensor], device: torch.device
          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`augmentation` on `device`: a module's (a preset's, or a factory's) parameters and buffers are
    moved there, each with a non-blocking copy, and every Kornia augmentation in it draws its
    parameters on the CPU; any other callable is returned as it is.

    Not `module.to(device)`: Kornia's `_apply` also moves its samplers, rebuilding their
    distributions on the device (blocking copies, reads back), at every cache epoch of a live pass;
    the samplers stay on the CPU anyway."""
    if not isinstance(augmentation, torch.nn.Module):
        return augmentation
    cpu = torch.device("cpu")
    ahead = device.type != "cpu"  # to the CPU a non-blocking copy would hand out memory not yet written
    with torch.no_grad():
        for module in augmentation.modules():
            for param in module.parameters(recurse=False):
                if param.device != device:
                    param.data = param.data.to(device, non_blocking=ahead)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.device != device:
                    module._buffers[name] = buffer.to(device, non_blocking=ahead)
            # Kornia's augmentations (and their param generators): on the CPU, where a factory may not have left them
            if hasattr(module, "set_rng_device_and_dtype") and \
                    (getattr(module, "device", None), getattr(module, "dtype", None)) != (cpu, torch.float32):
                module.set_rng_device_and_dtype(cpu, torch.float32)
    return augmentation


# (backend, fp32_precision knob) pairs torch >= 2.9 has per device type: "ieee" is full float32
_PRECISION = {"cuda": (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn")),
              "cpu": (("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))}


def _precision_knobs(device: torch.device) -> list:
    """The fp32_precision settings that decide `device`'s float32 kernels (torch >= 2.9), or [] on
    an older torch."""
    knobs = [getattr(getattr(torch.backends, backend, None), op, None) for backend, op in
             _PRECISION.get(device.type, ())]
    return [k for k in knobs if hasattr(k, "fp32_precision")]


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """Full float32 on `device` inside, whatever the caller's autocast and TF32 (or bf16) settings:
    a batch's pixels (and a teacher's targets) must not depend on the training loop's precision.

    torch >= 2.9: its fp32_precision settings ("ieee" inside, each restored after); the legacy
    allow_tf32 flags are never read there, since reading them raises once a caller has used the new
    API. Older torch: the legacy flags (CUDA). These are process-wide switches; the loader and the
    build run this on the thread that would otherwise use them."""
    autocast = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()
    knobs = _precision_knobs(device)
    legacy = device.type == "cuda" and not knobs
    saved = [k.fp32_precision for k in knobs]
    saved_legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if legacy else None
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        if legacy:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with autocast:
            yield
    finally:
        for k, value in zip(knobs, saved):
            k.fp32_precision = value
        if saved_legacy is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's CPU generator, and `device`'s where it is a GPU, seeded with `seed` inside, as they
    were outside."""
    generators = [torch.default_generator]
    if device.type == "cuda":
        generators.append(torch.cuda.default_generators[device.index if device.index is not None
                                                       else torch.cuda.current_device()])
    states = [g.get_state() for g in generators]
    try:
        for g in generators:
            g.manual_seed(seed)
        yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)


def augment_batch(augmentation: Callable, images: torch.Tensor, *, seed: int, name: str,
                  shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`images` (float (B, C, H, W) in [0, 1]) augmented with the generators seeded with `seed`.

    Returns a float (B, C, H, W) batch clamped to [0, 1]; `shape` (C, H, W), where given, is the
    output every batch must have.

    Raises:
        TransformError: the augmentation fails or returns something else than a float batch of
            the same size (and `shape`), in one line naming `name` (the preset or factory).
    """
    with seeded(seed, images.device), full_float32(images.device):
        try:
            out = augmentation(images)
        except TransformError:
            raise
        except Exception as e:
            raise TransformError(f"transform {name} failed on a batch of shape {tuple(images.shape)}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]) from None
    return _checked(out, images, name, shape)


def _checked(out: object, images: torch.Tensor, name: str, shape: tuple[int, int, int] | None) -> torch.Tensor:
    """`out`, an augmentation's output for `images`, checked (TransformError naming `name`) and clamped to [0, 1]."""
    want = f"a float (B, C, H, W) tensor with B = {len(images)}" + (f" and (C, H, W) = {shape}" if shape else "")
    if not isinstance(out, torch.Tensor):
        raise TransformError(f"transform {name} returned {type(out).__name__} for a batch: it must return {want}")
    if not out.is_floating_point() or out.ndim != 4 or len(out) != len(images) or \
            (shape is not None and tuple(out.shape[1:]) != tuple(shape)):
        raise TransformError(f"transform {name} returned a {str(out.dtype).replace('torch.', '')} tensor of shape "
                             f"{tuple(out.shape)} for a batch of {tuple(images.shape)}: it must return {want}")
    return out.clamp(0.0, 1.0)
