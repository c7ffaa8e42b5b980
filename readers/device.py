"""Move uint8 NHWC batches to the device (pinned memory, side CUDA stream), then convert them there."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from readers.decode import Payloads

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_device(device: str | torch.device | None) -> torch.device:
    """`device` checked now, its GPU index kept as given: None is cuda when torch sees a GPU, else
    cpu; an index-less cuda is bound to a GPU by resolve_device when a pass starts.

    Raises:
        ValueError: not a torch device, not cpu or cuda, cuda without a GPU, or a GPU index that
            does not exist, in one line.
    """
    available = torch.cuda.is_available()
    return pick_device(device, cuda_available=available, device_count=torch.cuda.device_count() if available else 0,
                       current=None, env={})


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` with its GPU index: an index-less cuda (or None on a machine with a GPU) is the
    current GPU where something chose one (`torch.cuda.set_device` to another than GPU 0), else GPU
    LOCAL_RANK under a launcher that sets it (torchrun, Lightning, Accelerate), else the current
    GPU (pick_device). Call it when work starts, not when a loader is built: a loader made before
    `torch.cuda.set_device` then still lands on its rank's GPU.

    Raises:
        ValueError: as check_device, or a LOCAL_RANK with no GPU of that index.
    """
    available = torch.cuda.is_available()
    needs_current = available and (device is None or str(device) == "cuda")
    return pick_device(device, cuda_available=available, device_count=torch.cuda.device_count() if available else 0,
                       current=torch.cuda.current_device() if needs_current else None, env=os.environ)


def pick_device(device: str | torch.device | None, *, cuda_available: bool, device_count: int,
                current: int | None, env: Mapping[str, str]) -> torch.device:
    """The device resolve_device gives, as a pure function of what it looks at: whether CUDA is
    available, how many GPUs there are, the current GPU's index (None: leave an index-less cuda
    as it is) and the environment (LOCAL_RANK).

    An index-less cuda is, in this order: the current GPU when it is not GPU 0 (a process that
    called `torch.cuda.set_device`, as Lightning does with `devices=[2, 3]`: its choice, not
    LOCAL_RANK's); GPU 0 when it is the only one visible (one GPU per task, as SLURM gives, where
    LOCAL_RANK counts the tasks of the node, not the GPUs this one sees); GPU LOCAL_RANK; the
    current GPU. A current GPU 0 cannot be told from one nobody chose, so LOCAL_RANK decides then."""
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if not cuda_available:
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available")
    index, why = device.index, ""
    if index is None and current is not None and (current != 0 or device_count == 1):
        index = current
    if index is None:
        local = env.get("LOCAL_RANK")
        if local is not None:
            if not local.strip().isdigit():
                raise ValueError(f"LOCAL_RANK={local!r} in the environment is not a GPU index (an int >= 0)")
            index, why = int(local), f" (LOCAL_RANK={local.strip()})"
        else:
            index = current
    if index is not None and index >= device_count:
        raise ValueError(f"device cuda:{index}{why} does not exist: {device_count} CUDA GPU(s) here, "
                         f"cuda:0 to cuda:{device_count - 1}")
    return torch.device("cuda", index) if index is not None else device


@dataclass(frozen=True, eq=False)
class Pending:
    """A batch on its way to the device; hand it to DeviceCopier.finish before using it."""

    images: torch.Tensor
    labels: torch.Tensor
    ready: torch.cuda.Event | None  # recorded on the side stream after the batch's work
    extra: tuple[torch.Tensor, ...] = ()  # tensors that travel with the batch as they are (teacher targets)


class DeviceCopier:
    """Takes uint8 host batches to `device` as (B, C, H, W) tensors of `dtype`.

    Host batches are (B, H, W, C), the cache's layout, or (B, C, H, W) when
    host_channels_first says so. On CUDA the host batch should be pinned: the copy is
    non_blocking on a high-priority side stream, and the conversion (to `dtype`, minus mean,
    over std; any device augmentation before it) runs on that stream too, so batch k+1 moves
    and converts while batch k trains, ahead of the training kernels queued beside it. Moving
    uint8 is 4x less PCIe traffic than float. Without CUDA the same steps run on the CPU, same
    values.

    An index-less cuda `device` is bound to a GPU by bind() (resolve_device: LOCAL_RANK's, or the
    current one), which a loader calls when a pass starts; the stream and the mean/std live there.
    """

    def __init__(self, *, device: torch.device, normalize: bool, mean: Sequence[float], std: Sequence[float],
                 dtype: torch.dtype = torch.float32, channels_last: bool = False) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(map(str, DTYPES))}")
        if len(mean) != len(std) or min(std, default=1.0) <= 0:
            raise ValueError(f"mean {list(mean)!r} and std {list(std)!r} must be one value per channel, std > 0")
        self.requested = torch.device(device)
        self.normalize = normalize
        self.dtype = dtype if normalize else torch.uint8
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.pin = self.requested.type == "cuda"
        # (x - 255 mean) / (255 std) as one multiply-add per element.
        self._host_scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
        self._host_bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, -1, 1, 1)
        self.device: torch.device | None = None  # bound by bind()
        self._stream: torch.cuda.Stream | None = None

    def bind(self) -> torch.device:
        """Resolve the device now and move the stream and constants there if it changed; the device."""
        device = resolve_device(self.requested) if self.pin else self.requested
        if device != self.device:
            self.device = device
            self._scale = self._host_scale.to(device)
            self._bias = self._host_bias.to(device)
            self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # image width -> per-row scale, bias
            if device.type == "cuda":
                # The highest priority there is: a batch's copy and augmentation run ahead of the
                # training kernels already queued, so the next step never waits on them.
                self._stream = torch.cuda.Stream(device, priority=min(torch.cuda.Stream.priority_range()))
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(device))
        return device

    def start(self, images: torch.Tensor, labels: torch.Tensor,
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
              then: Callable[..., tuple[torch.Tensor, ...]] | None = None,
              extra: tuple[torch.Tensor, ...] = (),
              labels_to: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Pending:
        """Begin moving and converting one batch; returns at once on CUDA. `augment`, where
        given, runs on the device between the move and the normalisation (see convert); `then`
        (images, labels) -> (images, targets) after it (a batch transform), on the same stream.
        `extra` tensors (host, pinned on CUDA: teacher targets) are moved alongside, unconverted,
        and given to `then` as `also=` (mixed as the labels are). `labels_to`, where given, converts
        the labels once moved, before `then` (a segmentation batch's raw mask rows widened to int64
        (B, H, W): readers.masks)."""
        if self.device is None:
            self.bind()
        if self._stream is None:
            labels = labels_to(labels) if labels_to is not None else labels
            images, labels = self._convert_with(images, labels, augment)
            images, labels, extra = self._then(images, labels, extra, then)
            return Pending(images, labels, None, extra)
        with torch.cuda.stream(self._stream):
            if not isinstance(images, Payloads):  # compressed payloads move as convert decodes them
                images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            labels = labels_to(labels) if labels_to is not None else labels
            images, labels = self._convert_with(images, labels, augment)
            extra = tuple(t.to(self.device, non_blocking=True) for t in extra)
            images, labels, extra = self._then(images, labels, extra, then)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return Pending(images, labels, ready, extra)

    def _convert_with(self, images: torch.Tensor, labels: torch.Tensor,
                      augment: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """convert(images, augment), and the labels as an augmentation that moves them with the
        images (readers.masks.MaskedAugment: a batch's masks) leaves them."""
        if not getattr(augment, "moves_targets", False):
            return self.convert(images, augment), labels
        augment = augment.bind(labels)
        return self.convert(images, augment), augment.targets

    @staticmethod
    def _then(images: torch.Tensor, labels: torch.Tensor, extra: tuple[torch.Tensor, ...],
              then: Callable[..., tuple[torch.Tensor, ...]] | None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """The batch through `then` (a BatchTransform, seeded), each `extra` tensor mixed with the
        same draws as the labels (its `also=`); as it is without one."""
        if then is None:
            return images, labels, extra
        if not extra:
            return (*then(images, labels), ())
        images, labels, *mixed = then(images, labels, also=extra)
        return images, labels, tuple(mixed)

    def finish(self, pending: Pending) -> tuple[torch.Tensor, ...]:
        """The batch, (images, labels, *extra), usable on the current stream (which waits for it
        on the GPU, not the host)."""
        batch = (pending.images, pending.labels, *pending.extra)
        if pending.ready is None:
            return batch
        current = torch.cuda.current_stream(pending.images.device)
        current.wait_event(pending.ready)
        # The side stream allocated these; tell the allocator the current stream uses them too.
        for tensor in batch:
            tensor.record_stream(current)
        return batch

    def on_stream(self) -> AbstractContextManager:
        """Where the batches' device work runs, as a context: the side stream on CUDA (what is
        queued inside comes before the batches that use it, e.g. an augmentation's buffers placed
        when a cache epoch starts), else nothing to switch."""
        return torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()

    @property
    def on_host(self) -> bool:
        """Whether batches stay on the CPU (bound to it): start converts at once, finish has nothing to wait for."""
        return self.device is not None and self._stream is None

    @property
    def host_channels_first(self) -> bool:
        """Whether host batches should come as (B, C, H, W) rather than (B, H, W, C).

        On CUDA batches travel as HWC, the cache's layout, and the GPU transposes them if
        asked. On the CPU a uint8 NCHW batch is best transposed by the gather that assembles
        it; a float one by its conversion, which writes every element anyway and lays them out
        NCHW in the same pass (no separate uint8 transpose), and channels_last needs no
        transpose at all (NHWC memory is channels_last).
        """
        return not self.pin and self.memory_format == torch.contiguous_format and not self.normalize

    def convert(self, images: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """uint8 host-layout batch -> (B, C, H, W) in `dtype`, normalised, on the tensor's own device.

        With `augment` (float (B, C, H, W) in [0, 1] -> the same, maybe another H, W), the batch
        is augmented there first (batched augmentation: cacheaug.batched). `images` may be the
        batch's compressed jpg payloads (readers.decode.Payloads), decoded here in one call on the
        bound device."""
        if self.device is None:
            self.bind()
        if isinstance(images, Payloads):
            images = images.decode(self.device)  # (B, C, H, W)
            if not self.host_channels_first:
                images = images.permute(0, 2, 3, 1)  # seen as a host batch would come: NHWC, made NCHW below
        if not self.host_channels_first:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last strides
        if augment is not None:
            augmented = augment(images.to(torch.float32).div_(255.0))
            if not self.normalize:
                return augmented.mul(255.0).round_().to(torch.uint8).contiguous(memory_format=self.memory_format)
            # In [0, 1] units: (x - mean) / std = x * 255 * scale + bias.
            out = augmented.contiguous(memory_format=self.memory_format).mul_(self._scale * 255.0).add_(self._bias)
            return out if self.dtype == torch.float32 else out.to(self.dtype)
        if not self.normalize:
            return images.contiguous(memory_format=self.memory_format)
        out = images.to(torch.float32, memory_format=self.memory_format)
        if self.memory_format == torch.channels_last:
            # NHWC memory: scale rows of W*C values, not a stride-1 axis of C (3) values: a
            # broadcast over an innermost axis of 3 cannot fill the CPU's vector lanes, a row can.
            width = out.shape[3]
            scale, bias = self._row_affine(width)
            rows = out.permute(0, 2, 3, 1).view(-1, scale.numel())  # a view: NHWC is contiguous
            rows.mul_(scale).add_(bias)
        else:
            out.mul_(self._scale).add_(self._bias)  # faster on the CPU than one addcmul
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def _row_affine(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if width not in self._rows:
            self._rows[width] = (self._scale.view(-1).repeat(width), self._bias.view(-1).repeat(width))
        return self._rows[width]
