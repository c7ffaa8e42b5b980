"""The meta device as a stand-in GPU on a machine without one, to count what a device stage costs
the host: every op on a meta tensor also runs on a CPU "shadow" of it (so values exist and data-
dependent code runs), and what would make the host wait on a GPU is counted: a blocking copy from
the host to the device (torch.tensor(data, device=...) included), a copy back, an `.item()`.
Kornia's own non-blocking parameter copies count as the non-blocking copies they are on CUDA."""

from __future__ import annotations

import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode  # where torch's docs import it from

_COPIES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}
_FROM_DATA = (torch.tensor, torch.as_tensor, torch.asarray)  # made on the host, then copied: no dispatch sees the data


class MetaGPU:
    """Inside `with MetaGPU() as gpu:`, meta tensors behave as a GPU's would, backed by CPU
    shadows. `gpu.counting = True` turns the counters on (after setup: moving a module to the
    device copies its constants once, which is no per-batch cost)."""

    def __init__(self) -> None:
        self.counting = False
        self.to_device: list[str] = []  # host -> device copies, "blocking" or "non_blocking"
        self.to_host: list[str] = []  # device -> host copies and .item() calls: each a wait for the GPU
        self._modes = (_FromData(self), _Shadowing(self))

    def __enter__(self) -> MetaGPU:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def device_tensor(self, cpu: torch.Tensor) -> torch.Tensor:
        """`cpu`'s values as a meta tensor."""
        meta = torch.empty_like(cpu, device="meta")
        meta._shadow = cpu.clone()  # an attribute: tensors are no dict keys (== is elementwise)
        return meta

    @staticmethod
    def value(meta: torch.Tensor) -> torch.Tensor:
        """A meta tensor's values (its shadow)."""
        return meta._shadow

    def count(self, where: list[str], what: str) -> None:
        if self.counting:
            where.append(what)


class _FromData(TorchFunctionMode):
    """torch.tensor(data, device=meta) and its kin: made on the CPU, then a meta tensor shadowed by it."""

    def __init__(self, gpu: MetaGPU) -> None:
        super().__init__()
        self.gpu = gpu

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in _FROM_DATA and device is not None and torch.device(device).type == "meta":
            cpu = func(*args, **{**kwargs, "device": "cpu"})
            self.gpu.count(self.gpu.to_device, "blocking")
            return self.gpu.device_tensor(cpu)
        return func(*args, **kwargs)


class _Shadowing(TorchDispatchMode):
    """Runs every op that makes a meta tensor again on the CPU shadows; counts the waits."""

    def __init__(self, gpu: MetaGPU) -> None:
        super().__init__()
        self.gpu = gpu

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        devices = {a.device.type for a in _tensors((args, kwargs))}
        if name == "_local_scalar_dense" and "meta" in devices:
            self.gpu.count(self.gpu.to_host, "item")
            return args[0]._shadow.item()
        if name in _COPIES and "meta" in devices and _target(name, args, kwargs) == "cpu":
            self.gpu.count(self.gpu.to_host, name)  # a meta tensor has no data to copy: its shadow's
            return func(*_map(_cpu, args), **_map(_cpu, kwargs))  # this mode is off inside its own handler
        out = func(*args, **kwargs)
        if name in _COPIES:
            target = out.device.type if isinstance(out, torch.Tensor) else None
            if target == "meta" and "cpu" in devices:
                asked = kwargs.get("non_blocking") or (name == "copy_" and len(args) > 2 and args[2])
                self.gpu.count(self.gpu.to_device, "non_blocking" if asked or _kornia_non_blocking() else "blocking")
        self._shadow(func, args, kwargs, out)
        return out

    @staticmethod
    def _shadow(func, args, kwargs, out) -> None:
        metas = [o for o in _tensors(out) if o.device.type == "meta"]
        if not metas:
            return
        missing = [a for a in _tensors((args, kwargs)) if a.device.type == "meta" and not hasattr(a, "_shadow")]
        if missing:
            raise RuntimeError(f"{func}: a meta tensor without a shadow (made outside MetaGPU?)")

        shadow = func(*_map(_cpu, args), **_map(_cpu, kwargs))
        for meta, value in zip(_tensors(out), _tensors(shadow)):
            if meta.device.type == "meta":
                meta._shadow = value


def _kornia_non_blocking() -> bool:
    """Whether the copy under way is Kornia's `_to_device_nonblocking`, which copies a (pageable) CPU
    tensor to a CUDA device with non_blocking=True, staged, no wait; to other devices (meta) it
    makes a blocking copy, so here it stands for what it does on CUDA."""
    return any(f.name == "_to_device_nonblocking" and f.filename.endswith(os.path.join("kornia", "core", "utils.py"))
               for f in traceback.extract_stack())


def _cpu(x):
    """A meta tensor's shadow, the CPU for the meta device, anything else as it is."""
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        return x._shadow
    return torch.device("cpu") if isinstance(x, torch.device) and x.type == "meta" else x


def _target(name: str, args, kwargs) -> str:
    """The device type a copy op writes to."""
    if name == "_to_copy":
        device = kwargs.get("device")
        return torch.device(device).type if device is not None else args[0].device.type
    return args[0].device.type  # copy_ and kin: into their first argument


def _map(fn, tree):
    """`fn` applied to every leaf of nested lists, tuples and dicts (an op's arguments or results)."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, x) for x in tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _tensors(tree) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(lambda x: found.append(x) if isinstance(x, torch.Tensor) else None, tree)
    return found
