"""The names a build's options choose from: the presets and schedules. Torch-free, so that the
command line checks its options before it imports torch (`cachegen build --epochs 0` fails at once)."""

from __future__ import annotations

PRESETS = ("cifar", "imagenet", "mnist", "val", "none")
DETERMINISTIC = ("val", "none")  # presets written as one epoch
SCHEDULES = ("constant", "linear")
