"""The teacher of a reinforced cache (`cachegen build --teacher`): loaded from the user's factory,
run batched in eval mode on the images as stored, its top-K softmax probabilities encoded as each
sample's teacher member (cacheformat.teacher)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cacheformat import as_error
from cacheformat.payload import decode_payload
from cacheformat.teacher import MEMBER, RECORD, TeacherSpec, classes_problem, encode, payload_bytes
from cachegen.errors import CachegenError
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
    key = (spec, str(device))
    if key not in _LOADED:
        with as_error(CachegenError):
            factory = load_callable(spec, option="--teacher", usage=USAGE)
        try:
            module = factory()
        except Exception as e:
            raise CachegenError(f"teacher factory {spec} failed: {type(e).__name__}: {e}") from None
        if not isinstance(module, torch.nn.Module):
            raise CachegenError(f"teacher factory {spec} returned {type(module).__name__}, not a torch.nn.Module; "
                                f"define it as {USAGE}")
        if weights and weights_sha256(module) != weights:
            raise CachegenError(f"teacher factory {spec} returned other weights in this process than where the build "
                                "probed it (random initialisation?): make it load the same weights every time")
        _LOADED[key] = module.to(device).eval()  # eval: no dropout, batch-norm running statistics
    return _LOADED[key]


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


def top_k(module: torch.nn.Module, batch: torch.Tensor, teacher: Teacher) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-K (class indices int32, softmax probabilities float16) for a float batch
    (B, C, H, W) in [0, 1], highest first."""
    try:
        with torch.inference_mode():
            logits = module(batch)
    except Exception as e:
        raise CachegenError(f"teacher {teacher.spec} failed on a batch of shape {list(batch.shape)}: "
                            f"{type(e).__name__}: {e}") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(batch), teacher.classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CachegenError(f"teacher {teacher.spec} gave {got} for a batch of {len(batch)}, not (batch, "
                            f"{teacher.classes}) logits: the cache has {teacher.classes} classes")
    if not torch.isfinite(logits).all():
        raise CachegenError(f"teacher {teacher.spec} gave non-finite logits (NaN or inf)")
    probs, classes = logits.float().softmax(dim=1).topk(teacher.topk, dim=1)
    return classes.to(torch.int32).cpu().numpy(), probs.to(torch.float16).cpu().numpy()


def as_stored(rows: np.ndarray, encoding: str) -> np.ndarray:
    """The images (N, H, W, C uint8) as a reader gets them back: JPEG is lossy, so decoded again."""
    if encoding != "jpg" or not len(rows):
        return rows
    from cachegen.shards import encode as encode_image

    return np.stack([decode_payload(encode_image(row, "jpg"), "jpg", row.shape, where=f"a {encoding} sample")
                     for row in rows])  # the readers' own decode path


def teacher_members(teacher: Teacher, rows: np.ndarray, device: torch.device = torch.device("cpu")) -> list[bytes]:
    """Each row's teacher member: a shard's augmented images (N, H, W, C uint8), in batches of
    TEACHER_BATCH counted from the shard's first sample, on `device`."""
    module = load_teacher(teacher.spec, device, teacher.weights)
    stored = as_stored(rows, teacher.encoding)
    members = []
    for k in range(0, len(stored), TEACHER_BATCH):
        batch = torch.from_numpy(stored[k:k + TEACHER_BATCH]).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        members.extend(encode(c, p) for c, p in zip(*top_k(module, batch, teacher)))
    return members


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
    module = load_teacher(spec, device)
    teacher = Teacher(spec=spec, topk=min(topk, classes), classes=classes, encoding=encoding,
                      weights=weights_sha256(module))
    h, w, c = shape
    top_k(module, torch.zeros((2, c, h, w), device=device), teacher)
    return teacher


def manifest_block(teacher: Teacher, device: torch.device | None) -> dict:
    """The manifest's `teacher` block: what made the targets (part of the cache's identity) and
    how they are stored."""
    return {"spec": teacher.spec, "factory_sha256": teacher_sha256(teacher.spec), "weights_sha256": teacher.weights,
            "topk": teacher.topk,
            "classes": teacher.classes, "device": device.type if device is not None else "cpu",
            "batch": TEACHER_BATCH, "member": MEMBER, "record": str(RECORD.descr),
            "payload_bytes": payload_bytes(teacher.topk)}
