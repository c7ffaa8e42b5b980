"""Reliability of the readers: a flipped byte, a truncated, deleted or foreign shard, a damaged or
hand-edited manifest end in a ReaderError naming the file, never in wrong data or a numpy (or
libpng) crash; build temporaries are never read; 2 and 3 real DDP processes over 7 shards get equal
batch counts and disjoint samples, bounded by a timeout; 50 epochs keep memory, threads, file
descriptors and mappings flat. `pytest -m slow` runs the larger variants."""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import os
import re
import shutil
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loader_checks import collect, ddp_epoch, digest, epoch_contents, pairs, index_columns
from readers import CachedLoader, LiveLoader, ReaderError, load_manifest, open_loader
from readers.plan import rank_length
from test_reader_ddp import _free_port

# The "seven" caches: SEVEN_SAMPLES images of SEVEN_SIDE^2 x 3, SEVEN_SHARD per shard: 7 shards per
# epoch (6 x 48 + 43). 331 is prime, so neither the shard count nor the samples split evenly
# between 2 or 3 ranks.
SEVEN_SAMPLES, SEVEN_SIDE, SEVEN_SHARD, SEVEN_CLASSES = 331, 32, 48, 5
DEAD_PID = 424242  # in the names of the temporaries an interrupted build leaves


@pytest.fixture(scope="module")
def seven(tmp_path_factory) -> dict[str, Path]:
    """Caches of one source, cifar preset: "a" (seed 0, 2 epochs), "b" (seed 1, 1 epoch: the
    "other cache" whose shards are the same size) and "live" (seed 0, 2 epochs, source pass)."""
    from click.testing import CliRunner

    from cachegen.cli import main

    root = tmp_path_factory.mktemp("seven")
    rng = np.random.default_rng(331)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (SEVEN_SAMPLES, SEVEN_SIDE, SEVEN_SIDE, 3), np.uint8),
             labels=rng.integers(0, SEVEN_CLASSES, SEVEN_SAMPLES))
    for name, mode, seed, epochs in (("a", "cached", 0, 2), ("b", "cached", 1, 1), ("live", "live", 0, 2)):
        args = ["build", str(root / "src.npz"), "--out", str(root / name), "--mode", mode, "--seed", str(seed),
                "--epochs", str(epochs), "--shard-size", str(SEVEN_SHARD), "--transform", "cifar", "--workers", "1",
                "--quiet"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"cachegen {' '.join(args)} failed:\n{result.output}{result.exception!r}"
    return {name: root / name for name in ("a", "b", "live")}


def _loader(cache, **kw) -> CachedLoader:
    return CachedLoader(cache, **{"batch_size": 32, "device": "cpu", "normalize": False, "shuffle": False, **kw})


def _read_every_epoch(loader) -> int:
    """Samples delivered over every cached epoch (the whole cache is read)."""
    n = 0
    for epoch in range(loader.manifest.num_epochs):
        loader.set_epoch(epoch)
        n += sum(len(x) for x, _ in loader)
    return n


def _private_copy(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / cache.name))


# --- a flipped byte ------------------------------------------------------------------------------

def _regions(shard, encoding: str, header: int) -> dict[str, list[int]]:
    """Byte positions of one shard by what they hold: the image payloads, within npy ones the
    magic and the pixels, and the rest (tar headers, .cls members, padding, end-of-archive)."""
    payload, magic, pixels = [], [], []
    for o, s in zip(index_columns(shard)[0].tolist(), index_columns(shard)[1].tolist()):
        payload += range(o, o + s)
        if encoding == "npy":
            magic += range(o, o + 6)
            pixels += range(o + header, o + s)
    other = sorted(set(range(shard.bytes)) - set(payload))
    return {"payload": payload, "magic": magic, "pixels": pixels, "other": other}


@pytest.mark.parametrize("encoding", ["npy", "png"])
def test_a_flipped_byte_is_never_misread(caches, tmp_path, encoding):
    """42 (npy) / 18 (png) single-byte flips over one shard (tar headers, .cls members, npy magic and header,
    pixels, png chunks, end-of-archive blocks). Unverified: a flip outside the pixels changes
    nothing or is a ReaderError naming the shard (npy magic: payload check; png: chunk CRC, no
    libpng segfault); a pixel flip changes that one byte. Verified: always a sha256 error."""
    cache = _private_copy(caches[encoding], tmp_path)
    clean_loader = _loader(cache, batch_size=300)
    clean = np.concatenate(collect(clean_loader)[0])
    shard = clean_loader.manifest.epochs[0][1]
    regions = _regions(shard, encoding, clean_loader.manifest.npy_header_bytes)
    rng = np.random.default_rng(0)
    picks = {name: rng.choice(where, 12, replace=False).tolist() for name, where in regions.items() if where}
    picks["other"] = picks["other"][:4] + [0, shard.bytes - 1]  # the first header byte, the last zero block
    original = shard.path.read_bytes()
    seen = Counter()
    for region, positions in picks.items():
        for pos in positions:
            data = bytearray(original)
            data[pos] ^= 0x5A
            shard.path.write_bytes(bytes(data))
            try:
                got = np.concatenate(collect(_loader(cache, batch_size=300))[0])
                changed = int((got != clean).sum())
                outcome = "1 byte changed" if changed == 1 else "unchanged" if changed == 0 else f"{changed} bytes"
            except ReaderError as e:
                assert str(shard.path) in str(e), e
                outcome = "ReaderError"
            seen[region, outcome] += 1
            allowed = {"pixels": {"1 byte changed"}, "magic": {"ReaderError"},
                       "payload": {"ReaderError"} if encoding == "png" else {"unchanged", "ReaderError",
                                                                             "1 byte changed"},
                       "other": {"unchanged"}}[region]
            assert outcome in allowed, f"flip at byte {pos} ({region}): {outcome}"
            with pytest.raises(ReaderError, match=rf"shard {re.escape(str(shard.path))} fails its sha256 check"):
                list(_loader(cache, verify=True))
    shard.path.write_bytes(original)
    assert sum(seen.values()) == (42 if encoding == "npy" else 18), seen


# --- truncated, grown, deleted -------------------------------------------------------------------

@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("cut", ["empty", "1 byte", "end-of-archive blocks", "half", "grown"])
def test_a_shard_cut_between_epochs_is_named(damaged_cache, cut, verify):
    """The loader reads a good epoch, then a shard is cut (or grown): the next pass names it."""
    loader = _loader(damaged_cache, shuffle=True, prefetch=2, verify=verify)
    assert _read_every_epoch(loader) == 600
    shard = loader.manifest.epochs[1][3]
    size = {"empty": 0, "1 byte": shard.bytes - 1, "end-of-archive blocks": shard.bytes - 1024,
            "half": shard.bytes // 2, "grown": shard.bytes + 512}[cut]
    os.truncate(shard.path, size)
    loader.set_epoch(0)
    assert sum(len(x) for x, _ in loader) == 300  # epoch 0 does not read that shard
    loader.set_epoch(1)
    with pytest.raises(ReaderError, match=rf"shard {re.escape(str(shard.path))} is {size} bytes, "
                                          rf"the manifest says {shard.bytes} \(truncated or replaced\)"):
        list(loader)


@pytest.mark.parametrize("what", ["shard", "epoch folder"])
def test_a_shard_deleted_mid_training_is_named(damaged_cache, what):
    loader = _loader(damaged_cache, shuffle=True, prefetch=2)
    loader.set_epoch(0)
    assert sum(len(x) for x, _ in loader) == 300
    shard = loader.manifest.epochs[1][2]
    if what == "shard":
        shard.path.unlink()
    else:
        shutil.rmtree(shard.path.parent)
    loader.set_epoch(2)  # wraps to cached epoch 0: untouched
    assert sum(len(x) for x, _ in loader) == 300
    loader.set_epoch(3)
    with pytest.raises(ReaderError, match=r"shard .*epoch-0001/shard-00000\d\.tar is missing"):
        list(loader)


# --- a shard from another cache ------------------------------------------------------------------

@pytest.mark.parametrize("size", ["same size", "other size"])
def test_a_shard_from_another_cache(seven, tmp_path, size):
    """Shard 2 of cache "a" replaced by a shard of cache "b" (another seed). Same size: the file
    looks right to every check but the checksum, so only verify=True tells (and unverified reads
    must still not crash); another size: the size check names it, verify or not."""
    cache = _private_copy(seven["a"], tmp_path)
    target = _loader(cache).manifest.epochs[0][2]
    donor = _loader(seven["b"]).manifest.epochs[0][2 if size == "same size" else 6]
    assert (donor.bytes == target.bytes) == (size == "same size")
    shutil.copyfile(donor.path, target.path)
    if size == "same size":
        unverified = _loader(cache)
        unverified.set_epoch(0)
        images, labels = collect(unverified)
        assert sum(map(len, images)) == SEVEN_SAMPLES  # wrong pixels, right count, no crash
        assert pairs(images, labels) != epoch_contents(seven["a"], 0)
        with pytest.raises(ReaderError, match=rf"shard {re.escape(str(target.path))} fails its sha256 check"):
            _read_every_epoch(_loader(cache, verify=True))
    else:
        for verify in (False, True):
            with pytest.raises(ReaderError, match=rf"shard {re.escape(str(target.path))} is {donor.bytes} bytes, "
                                                  rf"the manifest says {target.bytes}"):
                _read_every_epoch(_loader(cache, verify=verify))


@pytest.mark.parametrize("size", ["same size", "other size"])
def test_a_source_shard_from_another_cache(seven, tmp_path, size):
    cache = _private_copy(seven["live"], tmp_path)
    target = load_manifest(cache).source_shards[2]
    donor = _loader(seven["b"]).manifest.epochs[0][2 if size == "same size" else 6]
    assert (donor.bytes == target.bytes) == (size == "same size")
    shutil.copyfile(donor.path, target.path)
    if size == "same size":
        assert sum(len(x) for x, _ in LiveLoader(cache, batch_size=64, device="cpu", workers=0)) == SEVEN_SAMPLES
        with pytest.raises(ReaderError, match=rf"{re.escape(str(target.path))} fails its sha256 check"):
            LiveLoader(cache, batch_size=64, device="cpu", workers=0, verify=True)
    else:
        with pytest.raises(ReaderError, match=rf"{re.escape(str(target.path))} is {donor.bytes} bytes"):
            LiveLoader(cache, batch_size=64, device="cpu", workers=0)


# --- a damaged or hand-edited manifest -----------------------------------------------------------

# Damaged or hand-edited manifests and index files: tests/format (the contract checks them, once).


# --- the live reader: a source shard damaged after the loader was made ---------------------------

@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", ["cut", "emptied", "deleted", "a folder"])
def test_a_source_shard_damaged_after_construction_is_named(seven, tmp_path, damage, workers):
    """test_live_loader.py covers damage found on construction; here it happens afterwards (a
    cut file used to surface as numpy's "cannot reshape", an empty one as mmap's ValueError). In
    a worker process the ReaderError arrives wrapped by the DataLoader, the path in its text."""
    cache = _private_copy(seven["live"], tmp_path)
    loader = LiveLoader(cache, batch_size=64, device="cpu", workers=workers, normalize=False)
    shard = loader.manifest.source_shards[3]
    if damage in ("cut", "emptied"):
        os.truncate(shard.path, 5000 if damage == "cut" else 0)
    else:
        shard.path.unlink()
        if damage == "a folder":
            shard.path.mkdir()
    message = {"cut": "is 5000 bytes, the manifest says", "emptied": "is 0 bytes, the manifest says",
               "deleted": " is missing", "a folder": ": Is a directory"}[damage]
    with pytest.raises(ReaderError, match=re.escape(str(shard.path)) + ".*" + re.escape(message)):
        list(loader)


# --- build temporaries ---------------------------------------------------------------------------

def _temporary(path: Path) -> Path:
    from cacheformat.layout import TMP_MARK  # the naming of files being written: shard-000001.tar.tmp-<pid>

    return path.with_name(f"{path.name}{TMP_MARK}{DEAD_PID}")


def test_an_interrupted_first_build_is_not_a_cache(seven, tmp_path):
    """A build killed before its manifest's rename: finished shards, a shard temporary, and a
    complete manifest under its temporary name. No reader takes it for a cache."""
    from cachegen.manifest import BUILD_STATE

    cache = _private_copy(seven["a"], tmp_path)
    (cache / "manifest.json").rename(_temporary(cache / "manifest.json"))
    (cache / BUILD_STATE).write_text("{}")
    shard = cache / "epoch-0001" / "shard-000006.tar"
    shard.rename(_temporary(shard))
    for read in (load_manifest, lambda c: CachedLoader(c, batch_size=8), lambda c: LiveLoader(c, batch_size=8),
                 lambda c: open_loader(c, batch_size=8)):
        with pytest.raises(ReaderError, match=rf"no cache at {re.escape(str(cache))} yet: a build there was "
                                              r"interrupted before writing manifest.json; re-run the same"):
            read(cache)


@pytest.mark.parametrize("mode", ["a", "live"])
def test_a_shard_temporary_is_never_read(seven, tmp_path, mode):
    """A finished shard under its temporary name (the build died between write and rename) is
    reported missing by its real name; temporaries of another build next to every shard and a
    foreign manifest.json.tmp change nothing (verify on)."""
    cache = _private_copy(seven[mode], tmp_path)
    manifest = load_manifest(cache)
    shards = manifest.source_shards if mode == "live" else [s for e in manifest.epochs for s in e]
    foreign = _loader(seven["b"]).manifest.epochs[0]
    for shard, donor in zip(shards, foreign * 3):
        shutil.copyfile(donor.path, _temporary(shard.path))
    shutil.copyfile(seven["b"] / "manifest.json", _temporary(cache / "manifest.json"))

    def read(c) -> list[tuple[torch.Tensor, torch.Tensor]]:
        options = dict(batch_size=64, device="cpu", normalize=False, verify=True)
        loader = LiveLoader(c, workers=0, **options) if mode == "live" else CachedLoader(c, **options)
        batches = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches += [(x.clone(), y.clone()) for x, y in loader]
        return batches

    got, want = read(cache), read(seven[mode])
    assert len(got) == len(want) == 12
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    victim = shards[1].path
    victim.unlink()  # only its temporary is left
    with pytest.raises(ReaderError, match=rf"{re.escape(str(victim))}[: ].*missing"):
        if mode == "live":
            LiveLoader(cache, batch_size=64, device="cpu", workers=0)
        else:
            _read_every_epoch(_loader(cache))


# --- DDP: real processes, gloo, 7 shards ---------------------------------------------------------

DDP_TIMEOUT_S = 120  # per run of all ranks; a hang (a rank stuck in a collective) fails the test
DDP_BATCH = 16


def _ddp_worker(rank: int, world_size: int, caches: dict[str, str], port: int, out: str, runs: list[dict]) -> None:
    torch.set_num_threads(1)  # world_size processes share 2 cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results = {}
        for run in runs:
            options = dict(batch_size=run["batch_size"], device="cpu", normalize=False, drop_last=run["drop_last"],
                           prefetch=run["prefetch"])  # rank and world size from torch.distributed
            if run["kind"] == "live":
                loader = LiveLoader(caches["live"], workers=0, **options)
            else:
                loader = CachedLoader(caches["a"], **options)
            results[run["name"]] = {epoch: ddp_epoch(loader, epoch) for epoch in run["epochs"]}
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _ddp(seven: dict[str, Path], out: Path, world_size: int, runs: list[dict], timeout: float) -> list[dict]:
    """Every rank's results of `runs`, from world_size spawned processes; fails after `timeout`."""
    caches = {k: str(v) for k, v in seven.items()}
    context = mp.spawn(_ddp_worker, args=(world_size, caches, _free_port(), str(out), runs), nprocs=world_size,
                       join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            for process in context.processes:
                process.join()
            pytest.fail(f"DDP ranks still running after {timeout}s: a rank is stuck in a collective")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def _check_ddp(results: list[dict], run: str, epoch: int, world_size: int, drop_last: bool,
               everything: Counter) -> tuple[int, int]:
    """Assert the split; return (batches per rank, samples delivered twice)."""
    per_rank = [r[run][str(epoch)] for r in results]
    samples, batches = rank_length(SEVEN_SAMPLES, batch_size=DDP_BATCH, world_size=world_size, drop_last=drop_last)
    assert [p["batches"] for p in per_rank] == [p["len"] for p in per_rank] == [batches] * world_size
    assert [len(p["samples"]) for p in per_rank] == [samples] * world_size
    union = sum((Counter(p["samples"]) for p in per_rank), Counter())
    assert set(union) <= set(everything)  # every sample is one of the cached epoch's
    repeats = sum(union.values()) - len(union)
    if drop_last:
        assert repeats == 0  # disjoint ranks
        assert len(union) == world_size * batches * DDP_BATCH
    else:
        assert set(union) == set(everything)  # the whole epoch, padded by repeating a few samples
        assert repeats == world_size * samples - SEVEN_SAMPLES and max(union.values()) == 2
    return batches, repeats


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ddp_results(request, seven, tmp_path_factory):
    """One spawn per world size, running both drop_last settings (half the process start-ups)."""
    world_size = request.param
    runs = [{"name": f"drop_last={d}", "kind": "cached", "drop_last": d, "batch_size": DDP_BATCH, "prefetch": 2,
             "epochs": [0]} for d in (True, False)]
    return world_size, _ddp(seven, tmp_path_factory.mktemp(f"ddp{world_size}"), world_size, runs, DDP_TIMEOUT_S)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_ranks_split_seven_shards_evenly(seven, ddp_results, drop_last):
    """331 samples, 7 shards, 2 or 3 ranks, batch 16. drop_last: 10 (world 2) / 6 (world 3)
    full batches per rank, disjoint; without: 11 / 7 batches, and the padding repeats exactly
    1 (world 2) / 2 (world 3) samples, each delivered twice."""
    world_size, results = ddp_results
    everything = Counter(digest(img, label) for (img, label) in epoch_contents(seven["a"], 0))
    batches, repeats = _check_ddp(results, f"drop_last={drop_last}", 0, world_size, drop_last, everything)
    assert (batches, repeats) == {(2, True): (10, 0), (3, True): (6, 0),
                                  (2, False): (11, 1), (3, False): (7, 2)}[world_size, drop_last]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [4, 5, 8])
def test_ddp_more_ranks_epochs_and_the_live_reader(seven, tmp_path, world_size):
    """4, 5 and 8 ranks (8 > 7 shards: ranks share shards), 3 epochs (epoch 2 wraps), prefetch
    0 and 2, both drop_last settings, and a LiveLoader that must deliver the very same samples."""
    runs = [{"name": f"{kind} drop_last={d}", "kind": kind, "drop_last": d, "batch_size": DDP_BATCH,
             "prefetch": p, "epochs": [0, 1, 2]} for kind, p in (("cached", 0), ("live", 0)) for d in (True, False)]
    runs.append({"name": "cached prefetch", "kind": "cached", "drop_last": False, "batch_size": DDP_BATCH,
                 "prefetch": 2, "epochs": [0, 1, 2]})
    results = _ddp(seven, tmp_path, world_size, runs, 300)
    for epoch in (0, 1, 2):
        everything = Counter(digest(img, label) for (img, label) in epoch_contents(seven["a"], epoch % 2))
        for run in runs:
            _check_ddp(results, run["name"], epoch, world_size, run["drop_last"], everything)
        for d in (True, False):
            assert [r[f"live drop_last={d}"][str(epoch)] for r in results] == \
                [r[f"cached drop_last={d}"][str(epoch)] for r in results]
        assert [r["cached prefetch"][str(epoch)] for r in results] == \
            [r["cached drop_last=False"][str(epoch)] for r in results]


# --- long runs: memory, threads, processes, files ------------------------------------------------

def _resources() -> dict[str, int]:
    """RSS (kB), OS threads, open file descriptors and memory mappings of this process.

    glibc's free lists are trimmed first: without it RSS saws between +0 and +32 MB with the
    arenas of the DataLoader's per-epoch threads (LiveLoader, workers=1), memory no one holds.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps the allocator's caches
        pass
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return {"rss_kb": int(status["VmRSS"].split()[0]), "threads": int(status["Threads"]),
            "fds": len(os.listdir("/proc/self/fd")), "maps": maps}


# An epoch of cache "a" is 331 x 3 KB = 1 MB of pixels in 7 mapped shard files, delivered in
# 11 batches of 96 KB. Keeping one batch per epoch would grow RSS by 45 x 96 KB = 4.3 MB from
# epoch 5 to epoch 50, keeping an epoch's window or mappings by 45 MB; measured growth (RSS after
# a malloc_trim) is 4 kB to 0.9 MB, so 4 MB is a bound with 4x margin that still catches a
# batch per epoch. Threads and file descriptors must not change at all; mappings may move by a
# few as malloc's arenas come and go (a leaked shard map per epoch would add 300).
RSS_GROWTH_KB = 4 * 1024
MAPS_SLACK = 16


def _assert_flat(at_5: dict, at_end: dict, threads_before: set) -> None:
    assert at_end["rss_kb"] - at_5["rss_kb"] < RSS_GROWTH_KB, (at_5, at_end)
    assert at_end["threads"] == at_5["threads"] and at_end["fds"] == at_5["fds"], (at_5, at_end)
    assert at_end["maps"] - at_5["maps"] <= MAPS_SLACK, (at_5, at_end)
    _assert_all_gone(threads_before)


def _assert_all_gone(threads_before: set) -> None:
    """No thread started since `threads_before` and no child process left, allowing a closed
    multiprocessing queue's feeder thread the moment it takes to end."""
    deadline = time.monotonic() + 5
    while [t for t in threading.enumerate() if t not in threads_before] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [t for t in threading.enumerate() if t not in threads_before] == []
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(("prefetch", "verify", "stop_after"), [
    (0, False, None), (2, False, None), (2, True, None), (2, False, 3)],
    ids=["prefetch0", "prefetch2", "prefetch2-verify", "prefetch2-break-each-epoch"])
def test_fifty_epochs_stay_flat(seven, prefetch, verify, stop_after):
    """50 epochs of cache "a" (11 batches each, or 3 and a break): memory, threads, files flat.
    Closing an epoch's iterator (what a break does, once the loop drops it) ends its reader thread
    before close() returns: none of this loader's threads is left running between epochs."""
    threads_before = set(threading.enumerate())
    loader = CachedLoader(seven["a"], batch_size=32, device="cpu", prefetch=prefetch, verify=verify)
    batches, closes = 0, []
    for epoch in range(50):
        loader.set_epoch(epoch)
        it = iter(loader)
        for i, _ in enumerate(it):
            batches += 1
            if i + 1 == stop_after:
                break
        it.close()  # what dropping the loop's iterator does
        closes.append([t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()])
        if epoch == 4:
            at_5 = _resources()
    at_end = _resources()
    assert batches == 50 * (stop_after or 11)
    _assert_flat(at_5, at_end, threads_before)
    assert closes == [[]] * 50, [c for c in closes if c][:3]


def test_live_epochs_share_their_workers_and_close_leaves_nothing(seven):
    """6 epochs served by one worker process, kept between them (persistent); threads and files
    flat; close() leaves no process and no thread behind."""
    threads_before = set(threading.enumerate())
    loader = LiveLoader(seven["live"], batch_size=64, device="cpu", workers=1)
    for epoch in range(6):
        loader.set_epoch(epoch)
        assert sum(len(x) for x, _ in loader) == SEVEN_SAMPLES
        workers = [p.pid for p in multiprocessing.active_children()]
        if epoch == 0:
            first = workers
        assert len(workers) == 1 and workers == first
        if epoch == 1:
            at_2 = _resources()
    at_end = _resources()
    assert at_end["threads"] == at_2["threads"] and at_end["fds"] == at_2["fds"], (at_2, at_end)
    loader.close()
    _assert_all_gone(threads_before)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_fifty_live_epochs_stay_flat(seven, workers):
    threads_before = set(threading.enumerate())
    loader = LiveLoader(seven["live"], batch_size=64, device="cpu", workers=workers)
    for epoch in range(50):
        loader.set_epoch(epoch)
        assert sum(len(x) for x, _ in loader) == SEVEN_SAMPLES
        if epoch == 4:
            at_5 = _resources()
    at_end = _resources()
    loader.close()  # the workers (kept across epochs) stop: no process or thread is left
    _assert_flat(at_5, at_end, threads_before)


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["png", "jpg"])
def test_fifty_compressed_epochs_stay_flat(caches, encoding):
    threads_before = set(threading.enumerate())
    loader = CachedLoader(caches[encoding], batch_size=32, device="cpu", prefetch=2)
    for epoch in range(50):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        if epoch == 4:
            at_5 = _resources()
    _assert_flat(at_5, _resources(), threads_before)
