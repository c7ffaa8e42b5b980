"""The names a build's options choose from: the presets and schedules. Torch-free, so that the
command line checks its options before it imports torch (`cachegen build --epochs 0` fails at once)."""

from __future__ import annotations

PRESETS = ("cifar", "imagenet", "mnist", "val", "none", "seg", "seg-val")
DETERMINISTIC = ("val", "none", "seg-val")  # presets written as one epoch
# Presets that move a mask with its image (torchvision.transforms.v2): what a build with masks takes.
MASK_PRESETS = ("seg", "seg-val", "none")
SCHEDULES = ("constant", "linear")
