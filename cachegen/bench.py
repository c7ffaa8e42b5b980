"""`cachegen bench`: cached vs live vs online augmentation vs stock webdataset vs plain read(),
side by side in one run, on this machine.

Every row is warmed up (untimed), then timed over whole batches, pass after pass, until it has
seen at least `min_images` images and `min_seconds` seconds: a small dataset is read many times
rather than timed over a few milliseconds."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cachegen.augmenter import MixedShapes
from cachegen.build import build
from cachegen.cachesource import where
from cachegen.config import BuildConfig, default_workers, parse_device
from cachegen.errors import CachegenError
from cachegen.manifest import read_manifest
from cachegen.doctor import machine_line
from cachegen.online import describe_loader, online_dataset
from cachegen.online import online_loader as make_online_loader


@dataclass
class Row:
    name: str
    images: int
    seconds: float
    cpu_seconds: float
    image_bytes: int  # uint8 pixels per image delivered
    data_wait: float | None = None  # share of a training step spent waiting for data (--model)
    kind: str = "loader"  # "loader"; "model": the model alone; "ceiling": plain read(), no batches
    disk_bytes_per_sample: int | None = None  # the cache the row reads, its shards' bytes a sample; None: no cache

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    def as_dict(self, online: float | None) -> dict:
        return {**asdict(self), "images_per_s": round(self.rate, 1),
                "mb_per_s": round(self.rate * self.image_bytes / 1e6, 1),
                "cpu_percent": round(100 * self.cpu_seconds / self.seconds, 1),
                "ratio_to_online": round(self.rate / online, 2) if online else None}


# What each column means: printed under the table, and in `cachegen bench --help`.
COLUMNS = {
    "img/s": "images delivered per second of wall time (with --model: images trained on per second)",
    "MB/s": "the same in megabytes of uint8 pixels (img/s x height x width x channels / 1e6)",
    "disk/sample": "the shards of the cache the row reads, in bytes a sample (online reads the source: -)",
    "x online": "img/s divided by the online row's img/s, measured in the same run (1.00 = online)",
    "CPU %": "CPU time of this process and its worker processes over the row's wall time, x 100: "
             "100 = one core busy all the time; the most is cores x 100",
    "data wait": "(--model) share of the step time spent waiting for the next batch rather than training",
    "images": "images timed in the row, after the warm-up",
    "s": "wall seconds timed in the row",
}


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


class _Passes:
    """Batches of `passes()`, one pass after another (an epoch's end starts the next pass)."""

    def __init__(self, name: str, passes: Callable[[], Iterable]) -> None:
        self.name, self.passes, self.it = name, passes, iter(passes())

    def next(self):
        for _ in range(2):
            try:
                return next(self.it)
            except StopIteration:
                self.close()
                self.it = iter(self.passes())
        raise CachegenError(f"bench: {self.name} delivered no batch in a whole pass")

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close:
            close()


def timed(name: str, passes: Callable[[], Iterable], *, min_images: int, min_seconds: float, warmup: int,
           image_bytes: int, step: Callable | None = None, kind: str = "loader") -> Row:
    """One row: warm up on `warmup` images (untimed), then consume whole batches of `passes()`
    (pass after pass) until at least `min_images` images and `min_seconds` seconds; with `step`,
    time how long each batch took to arrive. For the benchmark scripts too."""
    batches = _Passes(name, passes)
    try:
        warmed = 0
        while warmed < warmup:
            images, labels = batches.next()
            if step is not None:
                step(images, labels)
            warmed += len(labels)
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        seen, waited, stepped = 0, 0.0, 0.0
        while seen < min_images or time.perf_counter() - t0 < min_seconds:
            w0 = time.perf_counter()
            images, labels = batches.next()
            w1 = time.perf_counter()
            if step is not None:
                step(images, labels)
                stepped += time.perf_counter() - w1
            waited += w1 - w0
            seen += len(labels)
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
    finally:
        batches.close()
    return Row(name, seen, seconds, cpu, image_bytes, data_wait=waited / (waited + stepped) if step is not None else None,
               kind=kind)


# On a CPU the rows that compute in this process (CachedLoader, the batched live row; with --model
# the model alone) run twice: with torch's threads, and with one. On a loaded machine (other jobs
# on the cores) torch's intra-op thread pool spins at its barriers, and its ops can run many times
# faster with one thread than with two; one thread in one process is also the fewest cores of any
# row. Both are shown so that neither hides the other.
ONE_THREAD = "1 thread"  # a row whose name says this runs with torch.set_num_threads(1)


def _in_process_rows(name: str, detail: str, dev: torch.device, make: Callable) -> list[tuple[str, Callable]]:
    """`name (detail)` once on a GPU; on a CPU with torch's threads and with one."""
    def named(threads: str) -> str:
        said = ", ".join(filter(None, [threads, detail]))
        return f"{name} ({said})" if said else name

    threads = torch.get_num_threads()
    if dev.type != "cpu" or threads == 1:
        return [(named(ONE_THREAD if dev.type == "cpu" else ""), make)]
    return [(named(f"{threads} threads"), make), (named(ONE_THREAD), make)]


def _model_rows(step, dev: torch.device, shape, batch_size: int) -> list[tuple[str, Callable]]:
    """The model alone on one synthetic batch already in place (warmed up): its own limit."""
    h, w, c = shape
    synthetic = (torch.randn(batch_size, c, h, w, device=dev), torch.zeros(batch_size, dtype=torch.int64, device=dev))
    for _ in range(3):
        step(*synthetic)
    return _in_process_rows("model alone", "synthetic batch on device", dev, lambda: iter(lambda: synthetic, None))


@contextmanager
def one_thread(active: bool) -> Iterator[None]:
    """torch's intra-op threads set to 1 inside, where `active`; as they were outside."""
    threads = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def disk_per_sample(cache: Path) -> int:
    """What one sample of `cache` costs on disk: its shards' bytes over their samples (a live
    cache's: its source pass). Index files and the manifest, a few bytes a sample, are left out."""
    from cacheformat.manifest import read_manifest as read_format

    shards = read_format(cache).all_shards()
    return round(sum(s.bytes for s in shards) / max(1, sum(s.samples for s in shards)))


def _plain_read(shards: list[str], entries: list[dict]) -> Iterator[tuple[None, range]]:
    """The ceiling: each shard's bytes read whole, as (None, its samples) per shard."""
    for path, entry in zip(shards, entries):
        with open(path, "rb") as f:
            f.read()
        yield None, range(entry["samples"])


def _stock_loader(shards: list[str], encoding: str, channels: int, batch_size: int, workers: int,
                  dev: torch.device):
    """Stock webdataset over the same shards, its workers kept and batches pinned as the online row's;
    png/jpg decoded by its own image handler (PIL) to HWC uint8, as a webdataset user writes it."""
    import webdataset as wds

    pixels = "l8" if channels == 1 else "rgb8"
    stock = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode(pixels).to_tuple(encoding, "cls")
    return wds.WebLoader(stock.batched(batch_size), batch_size=None, num_workers=workers, persistent_workers=True,
                         pin_memory=dev.type == "cuda")


def _hwc(batch: torch.Tensor) -> torch.Tensor:
    """A batch of images as (B, H, W, C): webdataset's "l8" decodes a grey image to (H, W)."""
    return batch[..., None] if batch.ndim == 3 else batch


def normalizer(mean, std, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (B, C, H, W) -> float32 on `device`, (x / 255 - mean) / std: what the online and
    webdataset rows do to their batches, as the loaders do to theirs."""
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


class _Run(NamedTuple):
    """A row to time: its name, what makes a pass of its batches, its kind (Row.kind), what the
    progress line calls it (its name where empty), and its cache's bytes a sample (Row's)."""

    name: str
    make: Callable[[], Iterable]
    kind: str = "loader"
    said: str = ""
    disk: int | None = None


def run_bench(cache: Path | None, *, batch_size: int = 256, workers: int | None = None, images: int = 20000,
              min_seconds: float = 3.0, warmup: int = 1000, model: bool = False, device: str | None = None,
              trust_code: bool = False, progress: Callable[[str], None] = print, source: str | None = None,
              resize: int | None = None) -> dict:
    """Measure every way of feeding batches; return {'rows': [...], 'config': {...}}.

    Each row: `warmup` images untimed, then passes repeated until >= `images` images and
    >= `min_seconds` seconds have been timed. The online and live rows augment with the cache's
    transform: a `module:factory` only with `trust_code` (the sample cache built here needs none).
    `source`: where the cache's source is now, where it moved (cachegen.cachesource); `resize`: the
    side the live rows' cache resizes the source to, where the cache has no --resize of its own."""
    workers = workers or default_workers()
    dev = parse_device(device)  # before any building: a bad --device fails at once
    loader_workers = max(1, workers)
    with tempfile.TemporaryDirectory(prefix="cachegen-bench-") as tmp:
        cache, m, online_ds, live_dir = _caches(cache, Path(tmp), workers, trust_code, progress, source, resize)
        step = _model(dev, len(m["classes"])) if model else None
        runs, online_setup = _runs(cache, m, online_ds, live_dir, dev, batch_size, loader_workers, step)
        rows = []
        limits = dict(min_images=images, min_seconds=min_seconds, warmup=warmup,
                      image_bytes=int(np.prod(m["output_shape"])))
        for run in runs:
            progress(f"measuring {run.said or run.name} ...")
            with one_thread(ONE_THREAD in run.name):
                rows.append(timed(run.name, run.make, step=None if run.kind == "ceiling" else step, kind=run.kind,
                                  **limits))
            rows[-1].disk_bytes_per_sample = run.disk
        del runs  # the loaders (their persistent workers) end here, with the temporary caches
    online_rate = next(r.rate for r in rows if r.name.startswith("online"))
    return {"config": {"cache": str(cache), "batch_size": batch_size, "workers": loader_workers,
                       "min_images": images, "min_seconds": min_seconds, "warmup_images": warmup,
                       "device": str(dev), "model": model, "cpu_cores": default_workers(), "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads(), "online": online_setup,
                       "machine": machine_line()},
            # The ceiling has no training step: with --model its ratio to online would compare unlike things.
            "rows": [r.as_dict(None if model and r.kind == "ceiling" else online_rate) for r in rows]}


def _caches(cache: Path | None, tmp: Path, workers: int, trust_code: bool, progress: Callable[[str], None],
            source: str | None = None, resize: int | None = None) -> tuple[Path, dict, object, Path]:
    """(cached cache, its manifest, its online dataset, a live cache of the same build in `tmp`);
    without `cache`, a sample cache built in `tmp` first. A live cache stores the source at one
    shape: of a source of mixed sizes built without --resize, `resize` makes it one (bench --resize)."""
    if cache is None:
        progress("building a sample cache (2 epochs) and a live cache to measure ...")
        cache = tmp / "cached"
        build(BuildConfig(out=cache, epochs=2, workers=workers, quiet=True, mode="cached"))
        trust_code = True  # built here, by us
    m = read_manifest(cache)
    if m["mode"] != "cached":
        raise CachegenError(f"{cache} is a live cache: bench needs a cached one (build with --mode cached)")
    if "mask" in m:
        raise CachegenError(f"{cache} holds masks: bench measures (image, label) batches; for (image, mask) batches "
                            "run `python scripts/bench_seg.py --cache CACHE`")
    # Checks the source is still there and unchanged; refuses code the user did not trust.
    online_ds = online_dataset(cache, trust_code=trust_code, source=source)
    live_dir = tmp / "live"
    spec, t = m["source_spec"], m["transform"]
    if resize is not None and t["resize"] is not None:
        raise CachegenError(f"{cache} was built with --resize {t['resize']}: bench reads its source at that size; "
                            "leave out --resize")
    try:
        build(BuildConfig(source=where(m, source), split=spec["split"], image_column=spec.get("image_column"),
                          label_column=spec.get("label_column"), out=live_dir, epochs=m["epochs"],
                          transform=t["spec"], schedule=t["schedule"], size=t["size"], resize=t["resize"] or resize,
                          seed=m["seed"], workers=workers, quiet=True, mode="live", shard_size=str(m["shard_size"]),
                          encoding=m["image"]["encoding"], quality=m["image"].get("quality")))  # stored as the cache is
    except MixedShapes:
        raise CachegenError(f"the source images of {cache} differ in size, and bench's live rows store them at one: "
                            f"pass `cachegen bench --resize N` (e.g. --resize {t['size']}, the cache's output side)") \
            from None
    return cache, m, online_ds, live_dir


def _runs(cache: Path, m: dict, online_ds, live_dir: Path, dev: torch.device, batch_size: int, workers: int,
          step: Callable | None) -> tuple[list[_Run], str]:
    """The rows, in table order, each over a loader of its own iterated pass after pass (each pass
    the next epoch, as in training); and how the online row's DataLoader is set up."""
    from readers import CachedLoader, open_loader  # cachegen may use the readers; never the reverse

    factory = online_ds.factory  # the same factory for the live rows: imported once, on the user's word
    normalize = normalizer(m["mean"], m["std"], dev)
    entries = m["epoch_list"][0]["shards"]
    shards = [str(Path(cache) / s["path"]) for s in entries]
    cached_loader = CachedLoader(cache, batch_size=batch_size, device=dev, seed=1)
    live_loader = open_loader(live_dir, batch_size=batch_size, device=dev, seed=1, workers=workers,
                              augment_on="cpu", factory=factory)
    # The same live cache augmented in batches on the device (Kornia), no worker processes.
    device_loader = open_loader(live_dir, batch_size=batch_size, device=dev, seed=1, augment_on="device",
                                factory=factory)
    online_loader = make_online_loader(online_ds, batch_size=batch_size, workers=workers, device=dev)
    stock_loader = _stock_loader(shards, m["image"]["encoding"], m["image"]["shape"][2], batch_size, workers, dev)

    def online():
        return ((normalize(x), y) for x, y in online_loader)

    def stock_webdataset():
        return ((normalize(_hwc(torch.as_tensor(x)).permute(0, 3, 1, 2)), torch.as_tensor(y)) for x, y in stock_loader)

    cached_disk, live_disk = disk_per_sample(cache), disk_per_sample(live_dir)

    for path in shards:  # warm the page cache: every row reads from memory
        Path(path).read_bytes()
    model = _model_rows(step, dev, m["output_shape"], batch_size) if step is not None else []
    runs = [*(_Run(name, make, "model") for name, make in model),
            *(_Run(*row, disk=cached_disk)
              for row in _in_process_rows("cachegen CachedLoader", "", dev, lambda: cached_loader)),
            _Run(f"cachegen LiveLoader, per sample ({workers} workers)", lambda: live_loader, disk=live_disk),
            *(_Run(*row, disk=live_disk) for row in _in_process_rows(f"cachegen LiveLoader, batched on {dev.type}",
                                                                     "no workers", dev, lambda: device_loader)),
            _Run(f"online: torchvision DataLoader ({workers} workers)", online),
            _Run(f"stock webdataset ({workers} workers)", stock_webdataset, disk=cached_disk),
            _Run("plain read() of the shards", lambda: _plain_read(shards, entries), "ceiling",
                 said="plain read() of the shard bytes", disk=cached_disk)]
    return runs, describe_loader(online_loader)


def format_table(result: dict) -> str:
    """The rows as a table, the ceiling (plain read()) in its own, and what every column means."""
    c = result["config"]
    model = c["model"]
    lines = [f"batch {c['batch_size']}, device {c['device']}, {c['cpu_cores']} CPU cores"
             + (", with a training step" if model else ""),
             f"each row: {c['warmup_images']} images of warm-up (untimed), then passes repeated until at least "
             f"{c['min_images']} images and {c['min_seconds']:g} s were timed",
             f"online row: torchvision DataLoader, {c['online']} (as a careful user sets it up; the "
             "per-sample live and webdataset rows use as many workers)",
             c["machine"], ""]

    width = max(len(r["name"]) for r in result["rows"])

    def table(rows: list[dict], with_model: bool) -> list[str]:
        head = f"{'':{width}s} {'img/s':>9s} {'MB/s':>8s} {'disk/sample':>11s} {'x online':>9s} {'CPU %':>7s}"
        head += f" {'data wait':>10s}" if with_model else ""
        out = [head + f" {'images':>8s} {'s':>6s}"]
        for r in rows:
            ratio = f"{r['ratio_to_online']:9.2f}" if r["ratio_to_online"] is not None else f"{'-':>9s}"
            disk = r.get("disk_bytes_per_sample")
            disk = f"{disk / 1000:8.1f} KB" if disk is not None else f"{'-':>11s}"
            line = (f"{r['name']:{width}s} {r['images_per_s']:9.0f} {r['mb_per_s']:8.1f} {disk} {ratio} "
                    f"{r['cpu_percent']:7.0f}")
            if with_model:
                line += f" {r['data_wait'] * 100:9.0f}%" if r["data_wait"] is not None else f" {'':>10s}"
            out.append(line + f" {r['images']:8d} {r['seconds']:6.1f}")
        return out

    lines += table([r for r in result["rows"] if r["kind"] != "ceiling"], model)
    ceiling = [r for r in result["rows"] if r["kind"] == "ceiling"]
    if ceiling:
        lines += ["", "ceiling: the shard bytes read, no decoding, no batches" + (", no training step" if model else "")]
        lines += table(ceiling, False)
    lines += ["", "columns:"] + [f"  {name:9s} {text}" for name, text in COLUMNS.items()
                                  if model or name != "data wait"]
    return "\n".join(lines)


PLOT_SPAN = 560  # pixels of the bars' axis
PLOT_BAR_H = 34
PLOT_RIGHT = 50  # room for the last decade's value


def plot_axis(rates: list[float]) -> tuple[float, float]:
    """The log axis of the --plot chart: from the decade below the slowest row to the decade above
    the fastest (at least one decade)."""
    lo = 10 ** math.floor(math.log10(min(rates)))
    hi = 10 ** math.ceil(math.log10(max(rates)))
    return lo, hi if hi > lo else lo * 10


def plot(result: dict, out: Path) -> None:
    """A horizontal bar chart of img/s per row on a log scale (rows 50x apart both stay readable),
    each bar labelled with its img/s and its ratio to online, every row's name whole, drawn with
    Pillow (no plotting dependency). The ceiling row (plain read()) is named in the title, not drawn."""
    from PIL import Image, ImageDraw

    c = result["config"]
    rows = [r for r in result["rows"] if r["kind"] != "ceiling"]
    ceiling = [r for r in result["rows"] if r["kind"] == "ceiling"]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 20 + int(max(measure.textlength(r["name"]) for r in rows))  # the longest name, whole
    bar_h, right = PLOT_BAR_H, PLOT_RIGHT
    width = left + PLOT_SPAN + right
    image = Image.new("RGB", (width, 70 + bar_h * len(rows) + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"cachegen bench: images/s, log scale (batch {c['batch_size']}, {c['device']}, "
                        f"{c['cpu_cores']} CPU cores" + (", with a training step)" if c["model"] else ")"), fill="black")
    if ceiling:
        draw.text((10, 28), "not drawn: " + ", ".join(f"{r['name']} {r['images_per_s']:,.0f} img/s" for r in ceiling),
                  fill=(90, 90, 90))
    lo, hi = plot_axis([r["images_per_s"] for r in rows])
    decades = math.log10(hi / lo)
    bottom = 55 + bar_h * len(rows)
    for k in range(round(decades) + 1):  # a grid line and its value at every decade
        x = left + int(PLOT_SPAN * k / decades)
        draw.line([x, 50, x, bottom], fill=(220, 220, 220))
        text = f"{lo * 10 ** k:,.0f}"
        draw.text((x - draw.textlength(text) / 2, bottom + 4), text, fill=(90, 90, 90))
    for i, r in enumerate(rows):
        y = 55 + i * bar_h
        length = max(1, int(PLOT_SPAN * math.log10(r["images_per_s"] / lo) / decades))
        colour = (46, 125, 50) if r["name"].startswith("cachegen") else (120, 120, 120)
        draw.text((10, y + 8), r["name"], fill="black")
        draw.rectangle([left, y + 4, left + length, y + bar_h - 6], fill=colour)
        ratio = f"  {r['ratio_to_online']:.2f}x online" if r["ratio_to_online"] is not None else ""
        label = f"{r['images_per_s']:,.0f} img/s{ratio}"
        text_w = draw.textlength(label)
        if length >= text_w + 12:  # on the bar, in white
            draw.text((left + length - text_w - 6, y + 8), label, fill="white")
        else:  # after a short bar
            draw.text((left + length + 6, y + 8), label, fill="black")
    try:
        image.save(out)
    except (OSError, ValueError) as e:
        raise CachegenError(f"cannot write {out}: {e}; give a writable path ending in .png") from None
