"""The teacher of a reinforced cache (`cachegen build --teacher`): loaded from the user's factory,
run batched in eval mode, in full float32, on the images as stored, its top-K softmax probabilities
encoded as each sample's teacher member (cacheformat.teacher)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cacheformat import as_error
from cacheformat.payload import decode_payload
from cacheformat.teacher import MEMBER, RECORD, TeacherSpec, canonical_spec, classes_problem, encode, payload_bytes
from cachegen.errors import CachegenError
from cacheaug.batched import full_float32
from cacheaug.transforms import load_callable, source_sha256

TEACHER_BATCH = 64  # samples of a shard the teacher sees at once: fixed, so its bytes do not depend on the workers
USAGE = "factory() -> torch.nn.Module mapping (B, C, H, W) floats in [0, 1] to (B, classes) logits"


@dataclass(frozen=True)
class Teacher:
    """What every worker needs to run the build's teacher (picklable: the module is loaded where used)."""

    spec: str  # FILE.py:factory or module:factory
    topk: int  # K stored per sample (at most the classes)
    classes: int
    encoding: str  # the cache's image encoding: the teacher sees the images as a reader decodes them
    weights: str = ""  # sha256 of its state_dict where the build probed it: every process must load the same

    @property
    def stored(self) -> TeacherSpec:
        """How its targets are stored (what a reader of the cache knows of them)."""
        return TeacherSpec(topk=self.topk, classes=self.classes)


_LOADED: dict[tuple[str, str], torch.nn.Module] = {}  # (spec, device) -> module, once per process


def load_teacher(spec: str, device: torch.device = torch.device("cpu"), weights: str = "") -> torch.nn.Module:
    """The module `spec`'s factory returns, in eval mode on `device`; one-line errors naming the
    factory. `weights`: the sha256 its state_dict must have (what the build probed)."""
    if device.type == "cuda" and device.index is None:  # one module for "cuda" and the tensors' "cuda:N"
        device = torch.device("cuda", torch.cuda.current_device())
    key = (spec, str(device))
    if key not in _LOADED:
        with as_error(CachegenError):
            factory = load_callable(spec, option="--teacher", usage=USAGE)
        try:
            module = factory()
        except Exception as e:
            raise CachegenError(f"teacher factory {spec} failed: {type(e).__name__}: {_shortened(e)}") from None
        if not isinstance(module, torch.nn.Module):
            raise CachegenError(f"teacher factory {spec} returned {type(module).__name__}, not a torch.nn.Module; "
                                f"define it as {USAGE}")
        if weights and weights_sha256(module) != weights:
            raise CachegenError(f"teacher factory {spec} returned other weights in this process than where the build "
                                "probed it (random initialisation?): make it load the same weights every time")
        _LOADED[key] = module.to(device).eval()  # eval: no dropout, batch-norm running statistics
    return _LOADED[key]


MAX_ERROR_CHARS = 300  # of a teacher factory's exception: a wrong checkpoint's lists every key (kilobytes)


def _shortened(e: Exception) -> str:
    """`e`'s message on one line, at most MAX_ERROR_CHARS of it (and how long it was where cut)."""
    text = " ".join(str(e).split())
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return (f"{text[:MAX_ERROR_CHARS]}... ({len(text)} characters; call the factory yourself to read it whole: "
            "does the checkpoint match the model it builds?)")


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state_dict (names, dtypes, shapes, values): which trained teacher it is."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def teacher_sha256(spec: str) -> str | None:
    """sha256 of the source file of the teacher's factory (a checkpoint it loads is not covered)."""
    return source_sha256(load_callable(spec, option="--teacher", usage=USAGE))


def _logits(module: torch.nn.Module, batch: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """The teacher's logits for a float batch (B, C, H, W) in [0, 1], in full float32 whatever the
    caller's autocast and TF32 settings (the stored targets must not depend on them), shape
    checked (no wait for the GPU: shapes are known on the host)."""
    try:
        with torch.inference_mode(), full_float32(batch.device):
            logits = module(batch)
    except Exception as e:
        raise CachegenError(f"teacher {teacher.spec} failed on a batch of shape {list(batch.shape)}: "
                            f"{type(e).__name__}: {e}") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(batch), teacher.classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CachegenError(f"teacher {teacher.spec} gave {got} for a batch of {len(batch)}, not (batch, "
                            f"{teacher.classes}) logits: the cache has {teacher.classes} classes")
    return logits


def _non_finite(teacher: Teacher) -> CachegenError:
    return CachegenError(f"teacher {teacher.spec} gave non-finite logits (NaN or inf)")


def queue_members(teacher: Teacher, images: torch.Tensor) -> Callable[[], list[bytes]]:
    """Queue the teacher on a shard's images as stored (uint8 (N, H, W, C) on the device it runs
    on), in batches of TEACHER_BATCH counted from the first; returns what gives each row's teacher
    member once the device is synchronised (at once on the CPU). Nothing here waits for the GPU:
    the top-K travel to pinned host memory with non-blocking copies, and whether every logit was
    finite is a flag on the device read after the caller's one wait."""
    device = images.device
    module = load_teacher(teacher.spec, device, teacher.weights)
    pin = device.type == "cuda"
    n, k = len(images), teacher.topk
    classes = torch.empty((n, k), dtype=torch.int32, pin_memory=pin)
    probs = torch.empty((n, k), dtype=torch.float16, pin_memory=pin)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for start in range(0, n, TEACHER_BATCH):
        batch = images[start:start + TEACHER_BATCH].permute(0, 3, 1, 2).float().div_(255.0)
        logits = _logits(module, batch, teacher)
        finite &= torch.isfinite(logits).all()
        top, which = logits.float().softmax(dim=1).topk(k, dim=1)
        classes[start:start + len(batch)].copy_(which.to(torch.int32), non_blocking=pin)
        probs[start:start + len(batch)].copy_(top.to(torch.float16), non_blocking=pin)
    all_finite = torch.empty((), dtype=torch.bool, pin_memory=pin).copy_(finite, non_blocking=pin)

    def members() -> list[bytes]:
        if not all_finite.item():
            raise _non_finite(teacher)
        return [encode(c, p) for c, p in zip(classes.numpy(), probs.numpy())]

    return members


def stored_as_made(encoding: str) -> bool:
    """Whether images of `encoding` read back bit-equal (every encoding but lossy JPEG)."""
    return encoding != "jpg"


def as_stored(rows: np.ndarray, encoding: str) -> np.ndarray:
    """The images (N, H, W, C uint8) as a reader gets them back: JPEG is lossy, so decoded again."""
    if stored_as_made(encoding) or not len(rows):
        return rows
    from cachegen.shards import encode as encode_image

    return np.stack([decode_payload(encode_image(row, "jpg"), "jpg", row.shape, where=f"a {encoding} sample")
                     for row in rows])  # the readers' own decode path


def teacher_members(teacher: Teacher, rows: np.ndarray, device: torch.device = torch.device("cpu")) -> list[bytes]:
    """Each row's teacher member: a shard's augmented images (N, H, W, C uint8) on the host, in
    batches of TEACHER_BATCH counted from the shard's first sample, on `device` (one wait there)."""
    stored = torch.from_numpy(as_stored(rows, teacher.encoding))
    if device.type == "cuda":
        stored = stored.pin_memory().to(device, non_blocking=True)
    members = queue_members(teacher, stored)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return members()


def with_teacher(samples: Iterable[tuple[int, int, np.ndarray]], teacher: Teacher) -> Iterator[tuple]:
    """(index, label, image) samples with their teacher member added, the teacher run on
    TEACHER_BATCH of them at a time."""
    group = []
    for sample in samples:
        group.append(sample)
        if len(group) == TEACHER_BATCH:
            yield from _finish(group, teacher)
            group = []
    yield from _finish(group, teacher)


def _finish(group: list[tuple[int, int, np.ndarray]], teacher: Teacher) -> Iterator[tuple]:
    if group:
        members = teacher_members(teacher, np.stack([image for _, _, image in group]))
        yield from ((index, label, image, member) for (index, label, image), member in zip(group, members))


def probe_teacher(spec: str, topk: int, classes: int, shape: tuple[int, int, int], encoding: str,
                  device: torch.device = torch.device("cpu")) -> Teacher:
    """Load the teacher and run it once on a blank batch of the cache's image shape (HWC): the
    errors a build would meet in its workers, met now; the Teacher every worker runs."""
    problem = classes_problem(min(topk, classes), classes)  # what the readers would refuse, before loading it
    if problem:
        raise CachegenError(f"--teacher {spec}: {problem} (--teacher-topk)")
    _LOADED.clear()  # loaded afresh for each build (a retrained teacher, the same spec)
    spec = canonical_spec(spec)
    module = load_teacher(spec, device)
    teacher = Teacher(spec=spec, topk=min(topk, classes), classes=classes, encoding=encoding,
                      weights=weights_sha256(module))
    teacher_members(teacher, np.zeros((2, *shape), np.uint8), device)
    return teacher


def manifest_block(teacher: Teacher, device: torch.device | None) -> dict:
    """The manifest's `teacher` block: what made the targets (part of the cache's identity) and
    how they are stored."""
    return {"spec": teacher.spec, "factory_sha256": teacher_sha256(teacher.spec), "weights_sha256": teacher.weights,
            "topk": teacher.topk,
            "classes": teacher.classes, "device": device.type if device is not None else "cpu",
            "batch": TEACHER_BATCH, "member": MEMBER, "record": str(RECORD.descr),
            "payload_bytes": payload_bytes(teacher.topk)}
