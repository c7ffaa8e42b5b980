"""`cachegen bench`: cached vs live vs online augmentation vs stock webdataset vs plain read(),
side by side in one run, on this machine."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cachegen.build import build
from cachegen.config import BuildConfig, default_workers
from cachegen.errors import CachegenError
from cachegen.manifest import read_manifest
from cachegen.online import online_dataset


@dataclass
class Row:
    name: str
    images: int
    seconds: float
    cpu_seconds: float
    image_bytes: int  # uint8 pixels per image delivered
    data_wait: float | None = None  # share of a training step spent waiting for data (--model)

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    def as_dict(self, online: float | None) -> dict:
        return {**asdict(self), "images_per_s": round(self.rate, 1),
                "mb_per_s": round(self.rate * self.image_bytes / 1e6, 1),
                "cpu_percent": round(100 * self.cpu_seconds / self.seconds, 1),
                "ratio_to_online": round(self.rate / online, 2) if online else None}


def _cpu_seconds() -> float:
    """CPU time of this process and its (finished or running) workers."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return own + _live_children_cpu()


def _live_children_cpu() -> float:
    """CPU time of running child processes (DataLoader workers), from /proc where there is one."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    except OSError:
        return 0.0
    for pid in children:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def _timed(name: str, batches: Callable[[], Iterable], limit: int, image_bytes: int,
           step: Callable | None = None) -> Row:
    """Consume batches until `limit` images; with `step`, time how long each batch took to arrive."""
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    seen, waited, stepped = 0, 0.0, 0.0
    it = iter(batches())
    while seen < limit:
        w0 = time.perf_counter()
        try:
            images, labels = next(it)
        except StopIteration:
            it = iter(batches())  # another pass
            continue
        w1 = time.perf_counter()
        if step is not None:
            step(images, labels)
            stepped += time.perf_counter() - w1
        waited += w1 - w0
        seen += len(labels)
    seconds = time.perf_counter() - t0
    close = getattr(it, "close", None)
    if close:
        close()
    return Row(name, seen, seconds, _cpu_seconds() - cpu0, image_bytes,
               data_wait=waited / (waited + stepped) if step is not None else None)


def _normalizer(mean, std, device):
    scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, -1, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return lambda x: x.to(device, non_blocking=True).float() * scale + bias


def _model(device: torch.device, classes: int):
    """A small CNN on the CPU, ResNet-18 on CUDA: one SGD step per batch."""
    if device.type == "cuda":
        from torchvision.models import resnet18
        net = resnet18(num_classes=classes)
    else:
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(32, classes))
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(images, labels):
        x = images if images.is_floating_point() else images.float()
        if x.shape[1] != 3:
            x = x[:, :1].expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        loss = torch.nn.functional.cross_entropy(net(x.to(device)), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def _device(name: str | None) -> torch.device:
    """--device as a torch.device that works here; a one-line error for a bad name or a missing GPU."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CachegenError(f"unknown --device {name!r}: use cpu or cuda (cuda:N for GPU N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise CachegenError(f"--device {name}: bench measures cpu or cuda only")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CachegenError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise CachegenError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s) here, "
                            f"numbered from 0")
    return dev


def run_bench(cache: Path | None, *, batch_size: int = 256, workers: int | None = None, images: int | None = None,
              model: bool = False, device: str | None = None, progress: Callable[[str], None] = print) -> dict:
    """Measure every way of feeding batches; return {'rows': [...], 'config': {...}}."""
    from readers import CachedLoader, open_loader  # cachegen may use the readers; never the reverse

    workers = workers or default_workers()
    dev = _device(device)  # before any building: a bad --device fails at once
    with tempfile.TemporaryDirectory(prefix="cachegen-bench-") as tmp:
        if cache is None:
            progress("building a sample cache (2 epochs) and a live cache to measure ...")
            cache = Path(tmp) / "cached"
            build(BuildConfig(out=cache, epochs=2, workers=workers, quiet=True, mode="cached"))
        m = read_manifest(cache)
        if m["mode"] != "cached":
            raise CachegenError(f"{cache} is a live cache: bench needs a cached one (build with --mode cached)")
        live_dir = Path(tmp) / "live"
        spec = m["source_spec"]
        online_ds = online_dataset(cache)  # checks the source is still there and unchanged
        build(BuildConfig(source=spec["spec"], split=spec["split"], out=live_dir, epochs=m["epochs"],
                          transform=m["transform"]["spec"], schedule=m["transform"]["schedule"],
                          size=m["transform"]["size"], resize=m["transform"]["resize"], seed=m["seed"],
                          workers=workers, quiet=True, mode="live", shard_size=str(m["shard_size"])))
        per_epoch = m["epoch_list"][0]["samples"]
        limit = images or per_epoch
        shape = m["output_shape"]
        image_bytes = int(np.prod(shape))
        step = _model(dev, len(m["classes"])) if model else None
        normalize = _normalizer(m["mean"], m["std"], dev)
        shards = [str(Path(cache) / s["path"]) for s in m["epoch_list"][0]["shards"]]
        encoding = m["image"]["encoding"]
        loader_workers = max(1, workers)

        def cached():
            return CachedLoader(cache, batch_size=batch_size, device=dev, seed=1)

        def live():
            return open_loader(live_dir, batch_size=batch_size, device=dev, seed=1, workers=loader_workers)

        def online():
            loader = torch.utils.data.DataLoader(online_ds, batch_size=batch_size, shuffle=True,
                                                 num_workers=loader_workers, pin_memory=dev.type == "cuda",
                                                 persistent_workers=False)
            return ((normalize(x), y) for x, y in loader)

        def stock_webdataset():
            import webdataset as wds
            ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode().to_tuple(encoding, "cls")
            loader = wds.WebLoader(ds.batched(batch_size), batch_size=None, num_workers=loader_workers)
            return ((normalize(torch.as_tensor(x).permute(0, 3, 1, 2)), torch.as_tensor(y)) for x, y in loader)

        def plain_read():
            def gen():
                for path, entry in zip(shards, m["epoch_list"][0]["shards"]):
                    with open(path, "rb") as f:
                        f.read()
                    yield None, range(entry["samples"])
            return gen()

        for path in shards:  # warm the page cache: every row reads from memory
            Path(path).read_bytes()
        runs = [("cachegen CachedLoader", cached), (f"cachegen LiveLoader ({loader_workers} workers)", live),
                (f"online: torchvision DataLoader ({loader_workers} workers)", online),
                (f"stock webdataset ({loader_workers} workers)", stock_webdataset)]
        if step is not None:  # warm the model up, and measure it alone on one batch already in place
            c, h, w = shape[2], shape[0], shape[1]
            synthetic = (torch.randn(batch_size, c, h, w, device=dev), torch.zeros(batch_size, dtype=torch.int64,
                                                                                   device=dev))
            for _ in range(3):
                step(*synthetic)
            runs.insert(0, ("model alone (synthetic batch on device)", lambda: iter(lambda: synthetic, None)))
        rows = []
        for name, make in runs:
            progress(f"measuring {name} ...")
            rows.append(_timed(name, make, limit, image_bytes, step))
        progress("measuring plain read() of the shard bytes ...")
        rows.append(_timed("plain read() of the shards (limit)", plain_read, limit, image_bytes))
    online_rate = next(r.rate for r in rows if r.name.startswith("online"))
    return {"config": {"cache": str(cache), "batch_size": batch_size, "workers": loader_workers,
                       "images_per_row": limit, "device": str(dev), "model": model,
                       "cpu_cores": default_workers(), "torch": torch.__version__},
            "rows": [r.as_dict(online_rate) for r in rows]}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"{c['images_per_row']} images per row, batch {c['batch_size']}, device {c['device']}, "
             f"{c['cpu_cores']} CPU cores" + (", with a training step" if c["model"] else ""),
             f"{'':44s} {'img/s':>9s} {'MB/s':>8s} {'x online':>9s} {'CPU %':>7s}"
             + (f" {'data wait':>10s}" if c["model"] else "")]
    for r in result["rows"]:
        line = (f"{r['name']:44s} {r['images_per_s']:9.0f} {r['mb_per_s']:8.1f} "
                f"{r['ratio_to_online']:9.2f} {r['cpu_percent']:7.0f}")
        if c["model"]:
            line += f" {r['data_wait'] * 100:9.0f}%" if r["data_wait"] is not None else f" {'':>10s}"
        lines.append(line)
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    """A horizontal bar chart of img/s per row, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    rows = result["rows"]
    width, bar_h, left = 900, 34, 330
    image = Image.new("RGB", (width, 50 + bar_h * len(rows) + 20), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"cachegen bench: images/s, log scale (batch {result['config']['batch_size']}, "
                        f"{result['config']['device']}, {result['config']['cpu_cores']} CPU cores)", fill="black")
    # Log scale: the rows span three orders of magnitude.
    top = math.log10(max(r["images_per_s"] for r in rows) * 2)
    for i, r in enumerate(rows):
        y = 45 + i * bar_h
        length = int((width - left - 110) * math.log10(max(r["images_per_s"], 1)) / top)
        colour = (46, 125, 50) if r["name"].startswith("cachegen") else (120, 120, 120)
        draw.text((10, y + 8), r["name"][:48], fill="black")
        draw.rectangle([left, y + 4, left + max(length, 1), y + bar_h - 6], fill=colour)
        draw.text((left + length + 6, y + 8), f"{r['images_per_s']:,.0f}  ({r['ratio_to_online']:.1f}x)", fill="black")
    try:
        image.save(out)
    except (OSError, ValueError) as e:
        raise CachegenError(f"cannot write {out}: {e}; give a writable path ending in .png") from None
