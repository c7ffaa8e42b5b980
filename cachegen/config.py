"""BuildConfig: every option of a build, checked once, up front."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from cachegen.errors import CachegenError
from cacheformat.manifest import ENCODINGS
from cacheaug.names import MASK_PRESETS, PRESETS, SCHEDULES
from cacheformat.mask import MAX_CLASSES as MAX_MASK_CLASSES, mask_class_names
from cacheformat.manifest import AUGMENT_ON
from cacheformat.teacher import DEFAULT_TOPK
from readers import split

if TYPE_CHECKING:
    import torch

MAX_EPOCHS = 10_000  # epoch-0000 .. epoch-9999: folder names and sample keys have four digits
# The largest --size/--resize: its square is PIL's decompression-bomb limit (9459 at 89.5M pixels);
# far larger sides would only exhaust memory.
MAX_SIDE = math.isqrt(Image.MAX_IMAGE_PIXELS)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def default_workers() -> int:
    """Every core this process may use (its share where LOCAL_WORLD_SIZE ranks share the machine):
    nothing else runs during a build."""
    return split.default_workers(1.0)


def parse_shard_size(text: str) -> tuple[int | None, int | None]:
    """'1000' -> (1000 samples, None); '64MB' -> (None, 64_000_000 bytes)."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or int(m.group(1)) <= 0 or m.group(2).upper() not in _UNITS:
        raise CachegenError(f"bad --shard-size {text!r}: give a sample count (1000) or a size (64MB, 256MiB)")
    number, unit = int(m.group(1)), m.group(2).upper()
    return (number, None) if unit == "" else (None, number * _UNITS[unit])


@dataclass(frozen=True)
class BuildConfig:
    """What to build; see `cachegen build --help` for each option."""

    source: str | None = None
    out: Path = Path("cache")
    epochs: int = 10
    transform: str = "auto"
    schedule: str = "constant"
    size: int | None = None
    seed: int = 0
    workers: int = 0  # 0: every core
    encoding: str = "npy"
    quality: int | None = None  # --format jpg's JPEG quality, 1-100; None: cachegen.shards.JPEG_QUALITY
    shard_size: str = "1000"
    split: str = "train"
    on_error: str = "fail"
    overwrite: bool = False
    quiet: bool = False
    mode: str = "auto"  # cached, live, or auto: live when the cache would exceed max_cache_gb
    max_cache_gb: float = 64.0
    resize: int | None = None  # deterministic Resize+CenterCrop of every source image, before the transform
    channels: int | None = None  # 1 or 3: convert every source image; None: the source's own
    stats_from: Path | None = None  # a cache whose mean/std this cache's manifest takes (a val cache)
    dask: str | None = None  # a Dask scheduler's address: shards are written by its workers
    augment_on: str = "auto"  # cpu (per sample), device (batched) or auto (live: device on a GPU; cached: cpu)
    device: str | None = None  # where a cached --augment-on device build augments (this process); None: cuda or workers
    teacher: str | None = None  # FILE.py:factory or module:factory: store its top-K targets per sample
    teacher_topk: int = DEFAULT_TOPK
    image_column: str | None = None  # a list's or a Hugging Face dataset's image column; None: found by name
    label_column: str | None = None
    source_factory: str | None = None  # FILE.py:make or module:make returning the Dataset to build from
    masks: Path | None = None  # a folder of PNG masks beside a folder source's images (same relative path, stem)
    mask_classes: str | None = None  # --masks' classes: their number (21) or their names (background,road,car)
    sample_masks: bool = False  # the built-in sample with its shapes' masks

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise CachegenError(f"--epochs must be at least 1 and at most {MAX_EPOCHS}, got {self.epochs}")
        if self.transform != "auto" and self.transform not in PRESETS and ":" not in self.transform:
            raise CachegenError(f"unknown --transform {self.transform!r}{_did_you_mean(self.transform)}: use auto, "
                                f"{', '.join(PRESETS)} or module:factory")
        if self.schedule not in SCHEDULES:
            raise CachegenError(f"unknown --schedule {self.schedule!r}: use {' or '.join(SCHEDULES)}")
        if self.size is not None and not 1 <= self.size <= MAX_SIDE:
            raise CachegenError(f"--size must be positive and at most {MAX_SIDE}, got {self.size}")
        if self.transform == "none" and self.size is not None:
            raise CachegenError("--transform none stores every image at its source size: drop --size "
                                "(or pass --resize N to resize the source first)")
        if self.seed < 0:
            raise CachegenError(f"--seed must be non-negative, got {self.seed}")
        if self.workers < 0:
            raise CachegenError(f"--workers must be 0 (every core) or more, got {self.workers}")
        if self.encoding not in ENCODINGS:
            raise CachegenError(f"unknown --format {self.encoding!r}: use {', '.join(ENCODINGS)}")
        if self.quality is not None:
            if self.encoding != "jpg":
                raise CachegenError(f"--quality sets a JPEG's quality, and --format is {self.encoding}: add --format jpg, "
                                    "or drop --quality")
            if not 1 <= self.quality <= 100:
                raise CachegenError(f"--quality must be 1 to 100 (JPEG quality), got {self.quality}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.split or ""):
            raise CachegenError(f"bad --split {self.split!r}: name a split (train, test, validation, ...)")
        if self.on_error not in ("fail", "skip"):
            raise CachegenError(f"unknown --on-error {self.on_error!r}: use fail or skip")
        if self.mode not in ("auto", "cached", "live"):
            raise CachegenError(f"unknown --mode {self.mode!r}: use auto, cached or live")
        if self.augment_on not in AUGMENT_ON:
            raise CachegenError(f"unknown --augment-on {self.augment_on!r}: use {', '.join(AUGMENT_ON)}")
        if self.device is not None:
            parse_device(self.device)
            if self.augment_on != "device":
                raise CachegenError(f"--device {self.device} is where --augment-on device augments a cached build: "
                                    "add --augment-on device, or drop --device")
            if self.mode == "live":
                raise CachegenError("a live cache is augmented as it is read, on the loader's device: drop --device "
                                    "(or build --mode cached)")
        self._check_teacher()
        self._check_source_factory()
        self._check_masks()
        if not self.max_cache_gb > 0:
            raise CachegenError(f"--max-cache-gb must be positive, got {self.max_cache_gb}")
        if self.resize is not None and not 1 <= self.resize <= MAX_SIDE:
            raise CachegenError(f"--resize must be positive and at most {MAX_SIDE}, got {self.resize}")
        if self.channels not in (None, 1, 3):
            raise CachegenError(f"--channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        parse_shard_size(self.shard_size)
        object.__setattr__(self, "out", Path(self.out))
        if self.masks is not None:
            object.__setattr__(self, "masks", Path(self.masks))
        if self.stats_from is not None:
            object.__setattr__(self, "stats_from", Path(self.stats_from))
        if self.workers == 0:
            object.__setattr__(self, "workers", default_workers())

    def _check_teacher(self) -> None:
        if self.teacher_topk < 1:
            raise CachegenError(f"--teacher-topk must be at least 1, got {self.teacher_topk}")
        if self.teacher is None:
            return
        where, _, attr = self.teacher.rpartition(":")
        if not where or not attr:
            raise CachegenError(f"bad --teacher {self.teacher!r}: give path/to/file.py:factory or module:factory")
        if self.mode == "live":
            raise CachegenError("a live cache augments as it is read, so its teacher would run at read time: "
                                "drop --teacher, or build --mode cached")


    def _check_source_factory(self) -> None:
        if self.source_factory is None:
            return
        where, _, attr = self.source_factory.rpartition(":")
        if not where or not attr:
            raise CachegenError(f"bad --source-factory {self.source_factory!r}: give path/to/file.py:make or "
                                "module:make")
        if self.source is not None:
            raise CachegenError(f"--source-factory makes the source: drop SOURCE ({self.source}), or drop "
                                "--source-factory")
        refused = [f"--{name.replace('_', '-')}" for name in ("image_column", "label_column")
                   if getattr(self, name) is not None] + (["--split"] if self.split != "train" else [])
        if refused:
            raise CachegenError(f"{refused[0]} does not apply to a --source-factory Dataset (it is what make() "
                                "returns): drop it")

    @property
    def with_masks(self) -> bool:
        """Whether the options ask for masks (a .npz source may hold them without any)."""
        return self.masks is not None or self.sample_masks

    def mask_class_names(self) -> tuple[str, ...] | None:
        return mask_class_names(self.mask_classes)

    def _check_masks(self) -> None:
        if self.masks is not None and self.sample_masks:
            raise CachegenError("--masks DIR is a folder source's masks, --sample-masks the sample's: pass one")
        if self.mask_classes is not None:
            if self.masks is None:
                raise CachegenError("--mask-classes names the values of --masks DIR: pass --masks too (a .npz names "
                                    "its own in a 'mask_classes' array; the sample's are fixed)")
            names = self.mask_class_names()
            if not 1 <= len(names) <= MAX_MASK_CLASSES or not all(names):
                raise CachegenError(f"bad --mask-classes {self.mask_classes!r}: give a count (1 to {MAX_MASK_CLASSES}) "
                                    "or comma-separated names")
        if self.with_masks:
            check_mask_options(self)


def check_mask_options(config: BuildConfig) -> None:
    """CachegenError for an option a build with masks does not support (a .npz source's masks are
    found when it is opened: resolve calls this again then)."""
    if config.teacher is not None:
        raise CachegenError("--teacher stores a classifier's targets; a build with masks stores masks: a cache holds "
                            "one kind of target, drop --teacher or the masks")
    if config.augment_on == "device" and config.mode != "live":
        raise CachegenError("--augment-on device with masks is for a live cache (--mode live: Kornia on the loader's "
                            "device, the masks a data key); a cached build augments masks per sample (--augment-on cpu)")
    if config.transform not in ("auto", *MASK_PRESETS) and ":" not in config.transform:
        raise CachegenError(f"--transform {config.transform} augments an image alone; with masks use "
                            f"{', '.join(MASK_PRESETS)} or a module:factory returning a torchvision.transforms.v2 "
                            "transform (called with the image and a tv_tensors.Mask)")


def _did_you_mean(name: str) -> str:
    """' (did you mean cifar?)' for a near miss of a preset, else ''."""
    close = difflib.get_close_matches(name.lower(), ["auto", *PRESETS], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_device(name: str | None) -> torch.device:
    """--device as a torch.device that works here (None: cuda if torch sees one, else cpu); a
    one-line error for a bad name or a missing GPU."""
    import torch  # only here: checking the other options needs no torch (a fast one-line error)

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CachegenError(f"unknown --device {name!r}: use cpu or cuda (cuda:N for GPU N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise CachegenError(f"--device {name}: use cpu or cuda (cuda:N for GPU N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CachegenError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise CachegenError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s) here, "
                            f"numbered from 0")
    return dev
