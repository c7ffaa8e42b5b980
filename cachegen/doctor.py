"""`cachegen doctor`: what a bug report needs about this machine, and a cache's place on it.

Versions are read from the installed packages' metadata (nothing is imported for them); torch is
imported once, last, for what only it knows: its CUDA build and the GPUs it sees.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from cacheformat.locks import builder
from cacheformat.manifest import MANIFEST
from cachegen import __version__

PACKAGES = ("torch", "torchvision", "numpy", "pillow", "webdataset", "kornia", "click",
            "fsspec", "s3fs", "distributed")  # the last three: the cluster extra


def package_versions() -> dict[str, str | None]:
    """Installed version of each package cachegen uses (None: not installed)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none: not Linux)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def cores() -> dict[str, int]:
    """Cores in the machine and those this process may use (a container or taskset may give fewer)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {"machine": os.cpu_count() or 1, "usable": usable}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else what platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line naming the machine a measurement ran on: CPU, cores, torch's threads, GPU. For the
    benchmark scripts' output (their figures are only comparable with this beside them)."""
    import torch

    c = cores()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""  # others' jobs too
    return (f"machine: {cpu_model()}, {c['usable']} of {c['machine']} cores usable{load}, torch {torch.__version__} "
            f"with {threads} thread{'s' * (threads != 1)}, {gpu}")


def folder_bytes(root: Path) -> int:
    """Bytes of the files under `root` (0 where it is not a folder)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def disk_at(path: Path) -> dict[str, int]:
    """Total and free bytes of the file system holding `path` (or its nearest existing parent)."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"total": usage.total, "free": usage.free}


def gpus() -> dict:
    """torch's view: its version, CUDA build, and each GPU it sees (name, memory)."""
    try:
        import torch
    except ImportError as e:
        return {"error": f"torch cannot be imported: {e}"}
    out = {"cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "devices": []}
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["devices"].append({"name": p.name, "memory": p.total_memory, "capability": f"{p.major}.{p.minor}"})
    out["threads"] = torch.get_num_threads()
    return out


def report(cache: Path) -> dict:
    """Everything `cachegen doctor` prints, as a dict (its --json)."""
    mem = meminfo()
    return {"cachegen": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": package_versions(), "cores": cores(),
            "memory": {"total": mem.get("MemTotal"), "available": mem.get("MemAvailable"),
                       "page_cache": mem.get("Cached")},
            "cache": {"path": str(cache), "is_cache": (cache / MANIFEST).is_file(), "builder_pid": builder(cache),
                      "bytes": folder_bytes(cache), "disk": disk_at(cache)},
            "torch": gpus()}


def _gb(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def format_report(r: dict) -> str:
    """The report as lines a user can paste into an issue."""
    packages = "  ".join(f"{k} {v or '-'}" for k, v in r["packages"].items())
    t = r["torch"]
    gpu = t.get("error") or (
        ", ".join(f"{d['name']} ({_gb(d['memory'])}, sm {d['capability']})" for d in t["devices"])
        if t["devices"] else f"none seen by torch (CUDA build: {t['cuda_build'] or 'none, a CPU-only torch'})")
    mem, cache = r["memory"], r["cache"]
    lines = [f"cachegen   {r['cachegen']}  (Python {r['python']}, {r['platform']})",
             f"packages   {packages}",
             f"gpu        {gpu}",
             f"cores      {r['cores']['usable']} usable of {r['cores']['machine']}"
             + (f"; torch uses {t['threads']} threads" if "threads" in t else ""),
             f"memory     {_gb(mem['total'])} total, {_gb(mem['available'])} available, "
             f"{_gb(mem['page_cache'])} in the page cache",
             f"disk       {_gb(cache['disk']['free'])} free of {_gb(cache['disk']['total'])} at {cache['path']}"]
    lines.append(_cache_line(r))
    return "\n".join(lines)


def _cache_line(r: dict) -> str:
    """How the cache compares with the memory that keeps it hot: a cache larger than the page cache
    can hold is read from disk every epoch."""
    mem, cache = r["memory"], r["cache"]
    if cache.get("builder_pid") is not None:
        state = "is being grown" if cache["is_cache"] else "is being built"
        return f"cache      {cache['path']} {state} by a cachegen build (pid {cache['builder_pid']}) now"
    if not cache["is_cache"]:
        return f"cache      {cache['path']} holds no cachegen cache (give its folder: `cachegen doctor CACHE`)"
    size = cache["bytes"]
    line = f"cache      {_gb(size)}"
    if mem["total"] and size:
        line += f", {size / mem['total']:.1%} of memory"
        if mem["page_cache"] is not None:
            line += f"; the page cache holds {mem['page_cache'] / size:.3g}x the cache's size now"
        if size > mem["total"]:
            line += " (larger than memory: every epoch is read from disk)"
    return line
