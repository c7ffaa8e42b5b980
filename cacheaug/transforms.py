"""Augmentation presets, user factories and per-sample seeding (public API).

`make_transform`, `augment` and `to_pil` are the randomness contract of a cache: the builder
and the live reader both call them, so a sample augmented live is the sample a cache stores.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import random
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision import transforms as T

from cacheformat import FormatError
from cacheformat.manifest import transform_fingerprint as fingerprint  # noqa: F401 - re-exported
from cacheformat.seeding import sample_seed
from cacheaug.names import DETERMINISTIC, MASK_PRESETS, PRESETS, SCHEDULES  # noqa: F401 - re-exported



class TransformError(FormatError):
    """A transform that cannot be made or applied: an unknown preset, a bad `module:factory`, an
    output that is not an image. One line; the CLI prints it without a traceback."""


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed the three global generators a transform may draw from, for one sample: torch's
    (torchvision v1 and v2), Python's `random` (v1 RandomChoice/RandomOrder) and numpy's legacy
    one. Torch's through its default CPU generator, not torch.manual_seed, which would also
    seed every accelerator for each sample: work a CPU transform never draws on."""
    s = sample_seed(seed, epoch, index)
    torch.default_generator.manual_seed(s)  # the seed torch-only caches were always built with
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)  # numpy's legacy seeds are 32-bit


_borrowing = threading.local()  # .active: this thread is inside a borrow (saved the states, will restore them)
_rng_owned = False  # the process is cachegen's own (own_rng): nothing to give back
_BORROW_LOCK = threading.Lock()  # the generators are the process's: one thread's borrow at a time


def _reset_after_fork() -> None:
    global _BORROW_LOCK
    _BORROW_LOCK = threading.Lock()  # a child's threads are not the parent's: none holds it


os.register_at_fork(after_in_child=_reset_after_fork)


@contextmanager
def borrowed_rng() -> Iterator[None]:
    """Borrow torch's default CPU generator, Python's `random` and numpy's global RNG, and give
    them back untouched on exit, as torch.random.fork_rng does for torch alone. Re-entrant: an
    inner borrow (every `augment` call inside a loop wrapped in one) costs nothing: saving and
    restoring copy every generator's whole state (numpy's get_state/set_state the most), work
    worth doing once per loop, not once per sample. Re-entrant per thread: the generators are
    shared by every thread of the process, so another thread's borrow waits for this one to end
    (else its save and restore would interleave with this one's, and each would hand back the
    other's seeded state)."""
    if _rng_owned or getattr(_borrowing, "active", False):
        yield
        return
    lock = _BORROW_LOCK  # the one acquired is the one released, across a fork
    with lock:
        states = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
        _borrowing.active = True
        try:
            yield
        finally:
            _borrowing.active = False
            torch.default_generator.set_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


def own_rng() -> None:
    """Declare this process's global RNGs cachegen's (a worker process it started): `augment`
    stops saving and restoring them."""
    global _rng_owned
    _rng_owned = True


def to_hwc_uint8(image) -> np.ndarray:
    """A transform's output (PIL image, uint8 or float CHW tensor, HWC array) as HWC uint8."""
    if isinstance(image, torch.Tensor):
        if image.is_floating_point():
            image = (image * 255).round().clamp(0, 255).to(torch.uint8)
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise TransformError(f"transform returned a {image.dtype} tensor of shape {tuple(image.shape)}: "
                                "return a PIL image or a CHW uint8/float tensor")
        return image.permute(1, 2, 0).contiguous().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint8 or array.ndim != 3:
        raise TransformError(f"transform returned {array.dtype} {array.shape}: return a PIL image or a tensor")
    return array


def to_pil(pixels: np.ndarray) -> Image.Image:
    """A stored HWC uint8 image as the PIL image a transform starts from (one channel: mode L)."""
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def augment(transform: Callable, image: Image.Image, *, seed: int, epoch: int, index: int) -> np.ndarray:
    """Sample `index` of epoch `epoch`, augmented: seeded, transformed, as HWC uint8.

    The same (seed, epoch, index) gives the same bytes in any process, whichever of torch,
    `random` or numpy the transform draws from. The caller's generator states are given back
    afterwards, except in a DataLoader worker process (its generators are the DataLoader's to
    seed) and in a process that called `own_rng`."""
    with nullcontext() if get_worker_info() is not None else borrowed_rng():
        seed_sample(seed, epoch, index)
        return to_hwc_uint8(transform(image))


def strength(epoch: int, epochs: int, schedule: str) -> float:
    """Augmentation strength for `epoch`: 1.0 throughout, or 1.0 falling linearly to 0.5 at the end."""
    if schedule == "constant" or epochs <= 1:
        return 1.0
    return 1.0 - 0.5 * epoch / (epochs - 1)


class Identity:
    """The `none` preset: every image (and mask) as the source holds it (its own size; nothing random)."""

    def __call__(self, *inputs):
        return inputs[0] if len(inputs) == 1 else inputs

    def __repr__(self) -> str:
        return "Identity()"


def _preset(name: str, epoch: int, epochs: int, size: int, schedule: str) -> Callable:
    s = strength(epoch, epochs, schedule)
    if name == "cifar":
        jitter = 0.2 * s
        return T.Compose([
            T.RandomCrop(size, padding=max(1, round(size / 8 * s))),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
        ])
    if name == "imagenet":
        return T.Compose([
            T.RandomResizedCrop(size, scale=(1.0 - 0.92 * s, 1.0)),
            T.RandomHorizontalFlip(),
        ])
    if name == "mnist":  # at the source's size the Resize is a no-op: MNIST-sized caches keep their bytes
        return T.Compose([T.Resize(size), T.CenterCrop(size),
                          T.RandomAffine(degrees=10 * s, translate=(0.1 * s, 0.1 * s))])
    if name == "val":
        return T.Compose([T.Resize(size), T.CenterCrop(size)])
    if name == "none":
        return Identity()
    if name in ("seg", "seg-val"):
        return _segmentation(name, s, size)
    raise TransformError(f"unknown transform preset {name!r}: use one of {', '.join(PRESETS)} or module:factory")


def _segmentation(name: str, s: float, size: int) -> Callable:
    """The segmentation presets, torchvision v2: called with (image, tv_tensors.Mask), geometric
    steps move both (the mask resampled nearest-neighbour), ColorJitter the image only."""
    from torchvision.transforms import v2

    if name == "seg-val":
        return v2.Compose([v2.Resize(size), v2.CenterCrop(size)])
    jitter = 0.2 * s
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(1.0 - 0.7 * s, 1.0)),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
    ])


def augment_pair(transform: Callable, image: Image.Image, mask: np.ndarray, *, seed: int, epoch: int,
                 index: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of epoch `epoch` and its mask, augmented together as `augment` augments an
    image alone: the transform is called with the image and the mask as a tv_tensors.Mask, so a
    torchvision v2 transform moves both. (HWC uint8 image, (H, W) int64 mask)."""
    from torchvision import tv_tensors

    with nullcontext() if get_worker_info() is not None else borrowed_rng():
        seed_sample(seed, epoch, index)
        out = transform(image, tv_tensors.Mask(torch.from_numpy(np.asarray(mask, dtype=np.int64))))
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TransformError(f"the transform returned {type(out).__name__} for (image, mask): a build with masks "
                             "needs a transform of both, a torchvision.transforms.v2 one (the seg, seg-val and "
                             "none presets are)")
    image_out, mask_out = out
    mask_out = torch.as_tensor(mask_out)
    if mask_out.ndim == 3 and mask_out.shape[0] == 1:
        mask_out = mask_out[0]
    return to_hwc_uint8(image_out), mask_out.to(torch.int64).numpy()


def load_factory(spec: str, *, search_cwd: bool = True) -> Callable[[int, int], Any]:
    """Import a user's `module:factory` or `path/to/file.py:factory` (called as factory(epoch, epochs)
    -> transform). A module is looked for in the current folder first (`search_cwd`: the builder's,
    whose user typed the spec; a reader's spec comes from a manifest, so readers pass False), then on
    sys.path."""
    return load_callable(spec, search_cwd=search_cwd)


def load_callable(spec: str, option: str = "--transform", usage: str = "factory(epoch, epochs) -> transform",
                  *, search_cwd: bool = True) -> Callable:
    """The callable a user names as `module:name` or `path/to/file.py:name` for `option`; a
    TransformError naming it (and `usage`, how to define it) where it cannot be had. `search_cwd`:
    as load_factory's."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise TransformError(f"bad {option.lstrip('-')} {spec!r}: expected "
                             f"{'a preset (' + ', '.join(PRESETS) + '), ' if option == '--transform' else ''}"
                             "module:factory or path/to/file.py:factory")
    module = _load_file(where, spec, option) if where.endswith(".py") or "/" in where or os.sep in where else \
        _load_module(where, spec, option, search_cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TransformError(f"{where} has no callable {attr!r} (from {option} {spec}); define it as {usage}")
    return factory


def _load_module(name: str, spec: str, option: str, search_cwd: bool):
    cwd = os.getcwd()
    if search_cwd:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name or name.startswith(f"{e.name}."):  # the module itself, not one it imports
            if not search_cwd:
                raise TransformError(f"cannot import module {name!r} of the cache's transform {spec}: not on "
                                     "sys.path (a reader does not look in the current folder): add the module's "
                                     "folder to PYTHONPATH, or pass the factory yourself (factory=)") from None
            raise TransformError(f"cannot import module {name!r} for {option} {spec}: not in the current "
                                f"folder ({cwd}) nor on sys.path; for a file elsewhere give "
                                "path/to/file.py:factory") from None
        raise TransformError(f"cannot import module {name!r} for {option} {spec}: {e}") from None
    except Exception as e:  # anything the module raises on import
        raise TransformError(f"cannot import module {name!r} for {option} {spec}: "
                            f"{type(e).__name__}: {e}") from None
    finally:
        if search_cwd:
            sys.path.remove(cwd)


def _load_file(path: str, spec: str, option: str):
    full = os.path.abspath(path)
    name = f"_cachegen_transform_{hashlib.sha256(full.encode()).hexdigest()[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    if not os.path.isfile(full):
        raise TransformError(f"no file {path} for {option} {spec}: give an existing .py file (relative to "
                            f"the current folder, {os.getcwd()})")
    module_spec = importlib.util.spec_from_file_location(name, full)
    if module_spec is None:
        raise TransformError(f"cannot load {path} for {option} {spec}: give a Python source file ending in .py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # classes defined there pickle by this name
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if not isinstance(e, Exception):
            raise
        raise TransformError(f"cannot import {path} for {option} {spec}: {type(e).__name__}: {e}") from None
    return module


class CacheFactory:
    """A cache's `module:factory` as a reader calls it: imported from its spec because the user
    trusts the cache (from sys.path only, never the current folder), or the user's own callable
    (`given`). `sha256`: its source file's, now. Pickles as (spec, given): a spawned DataLoader
    worker imports the spec again, as this process did on the user's word."""

    def __init__(self, spec: str, given: Callable[[int, int], Any] | None = None) -> None:
        self.spec, self.given = spec, given
        self.factory = given if given is not None else load_factory(spec, search_cwd=False)
        self.sha256 = source_sha256(self.factory)

    def __call__(self, epoch: int, epochs: int) -> Any:
        return self.factory(epoch, epochs)

    def __reduce__(self) -> tuple:
        return CacheFactory, (self.spec, self.given)


def cache_factory(transform: dict, *, trust_code: bool, factory: Callable | None, where: str,
                  opt_in: str) -> CacheFactory | None:
    """The factory a cache's manifest names (its `transform` record), as a reader may call it; None
    for a preset (data: nothing to trust).

    A cache is data: its `module:factory` is imported only with `trust_code`. Or the user passes
    the factory itself (`factory`), checked against the sha256 the manifest records for its source
    file (without importing anything the manifest names).

    Raises:
        TransformError: a factory named and neither given nor trusted (one line: what would run,
            and `opt_in`, how to allow it), or a given factory whose source is not the recorded one.
    """
    spec, recorded = transform["spec"], transform.get("factory_sha256")
    if ":" not in spec:
        if factory is not None:
            raise TransformError(f"{where} augments with the preset {spec!r}, not a factory: drop factory=")
        return None
    if factory is None and not trust_code:
        digest = f"source sha256 {recorded[:16]}..." if recorded else "no source hash recorded"
        raise TransformError(f"{where}: its transform is code, factory {spec!r} ({digest}), and reading the "
                             f"cache would import and run it; {opt_in}")
    if factory is None:
        return CacheFactory(spec)
    if not callable(factory):
        raise TransformError(f"factory= must be callable as factory(epoch, epochs), got {type(factory).__name__}")
    given = factory if isinstance(factory, CacheFactory) else CacheFactory(spec, factory)  # one resolved already
    name = getattr(given.factory, "__qualname__", type(given.factory).__name__)
    if recorded is not None and given.sha256 is not None and given.sha256 != recorded:
        raise TransformError(f"factory= {name} is not the factory {where} was built with ({spec}): its source "
                             f"file's sha256 is {given.sha256[:16]}..., the cache records {recorded[:16]}...; "
                             "pass that factory, or rebuild the cache with yours")
    if recorded is not None and given.sha256 is None:
        warnings.warn(f"factory= {name} has no source file to check against the sha256 {where} records for "
                      f"{spec}: its samples are what your factory makes, not promised to be the build's",
                      stacklevel=4)
    return given


def is_random(spec: str) -> bool:
    """Whether a transform spec augments (False only for the deterministic `val` and `none` presets)."""
    return spec not in DETERMINISTIC


def make_transform(spec: str, *, epoch: int, epochs: int, size: int, schedule: str = "constant",
                   factory: Callable[[int, int], Any] | None = None) -> Callable:
    """The transform for `epoch` of `epochs`: a preset name or a user's `module:factory`.

    `factory`: what a `module:factory` spec names, already resolved (a reader's CacheFactory); None:
    imported from the spec here, the current folder searched first (the builder's way)."""
    if schedule not in SCHEDULES:
        raise TransformError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if ":" in spec:
        try:
            transform = (factory if factory is not None else load_factory(spec))(epoch, epochs)
        except TransformError:
            raise
        except Exception as e:
            raise TransformError(f"transform factory {spec} failed for epoch {epoch}: {e}") from None
        if not callable(transform):
            raise TransformError(f"transform factory {spec} returned {type(transform).__name__}, not a transform")
        return transform
    return _preset(spec, epoch, epochs, size, schedule)


def library_versions() -> dict[str, str]:
    """The versions of the libraries a sample's bytes depend on (recorded in the manifest)."""
    import PIL
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__}


def factory_sha256(spec: str) -> str | None:
    """sha256 of the source file of a `module:factory` spec's factory (None for a preset, or where
    the factory has no source file): editing the factory changes the cache it builds."""
    return source_sha256(load_factory(spec)) if ":" in spec else None


def source_sha256(factory: Callable) -> str | None:
    """sha256 of the file `factory` (a function or class) is defined in; None where it has none (a
    builtin, a C extension, a notebook cell, a callable object). Reads the file: imports nothing."""
    try:
        path = inspect.getsourcefile(factory) or inspect.getsourcefile(inspect.getmodule(factory))
    except TypeError:  # a builtin or a C extension
        return None
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def drift(manifest: dict, factory: CacheFactory | None = None) -> list[str]:
    """What differs here from where a cache was built (the manifest's `versions`, the source of
    `factory`, the cache's factory as resolved by the reader), such that augmenting now may not give
    the built bytes: e.g. ['torch 2.3.0 -> 2.4.1']."""
    now = library_versions()
    out = [f"{name} {was} -> {now.get(name)}" for name, was in (manifest.get("versions") or {}).items()
           if now.get(name) != was]
    recorded = manifest["transform"].get("factory_sha256")
    if factory is not None and recorded is not None and factory.sha256 != recorded:
        out.append(f"the source of factory {factory.spec} was edited")
    return out


def epoch_fingerprint(transform: Callable) -> str:
    """A hash of what one epoch's transform does, from its repr (parameters included).

    Stored per epoch, so growing a cache can check that the epochs already built would still be
    built the same way (a linear schedule or a user factory may depend on the epoch count).
    """
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))  # object addresses change per run
    return hashlib.sha256(text.encode()).hexdigest()
