"""A real lightning.Trainer (strategy="ddp") and a real accelerate.Accelerator (under torchrun), each
2 CPU processes over gloo, fed by CachedLoader: the ranks read disjoint halves, every epoch is a
different cached epoch in a fresh order, and a run stopped at a checkpoint and resumed trains on
exactly the batches of an uninterrupted run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loader_checks import collect, digest, epoch_contents
from readers import CachedLoader

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EPOCHS, BATCH = 3, 32  # 300 samples over 2 ranks: 150 each, 5 batches (the last of 22) per epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(harness: str, cache: Path, out: Path, *args: str) -> list[list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / harness), "--cache", str(cache), "--out", str(out), *args]
    if harness.startswith("accelerate"):
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(_free_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _expected(cache: Path) -> list[list[tuple[int, list[str]]]]:
    """What each rank's batches must be: the loader's own epochs 0..EPOCHS-1 for that rank."""
    per_rank = []
    for rank in (0, 1):
        loader = CachedLoader(cache, batch_size=BATCH, device="cpu", normalize=False, seed=11, rank=rank, world_size=2)
        batches = []
        for epoch in range(EPOCHS):
            loader.set_epoch(epoch)
            for images, labels in zip(*collect(loader)):
                batches.append((epoch, [digest(img.tobytes(), int(y)) for img, y in zip(images, labels)]))
        per_rank.append(batches)
    return per_rank


def _check(cache: Path, first: list[dict], resumed: list[dict], stop: int) -> None:
    assert [(r["rank"], r["world_size"]) for r in first + resumed] == [(0, 2), (1, 2)] * 2
    got = [[(b["epoch"], b["samples"]) for b in first[r]["batches"] + resumed[r]["batches"]] for r in (0, 1)]
    assert [len(first[r]["batches"]) for r in (0, 1)] == [stop, stop]
    assert got == _expected(cache)  # exactly an uninterrupted run's batches, resume included
    for epoch in range(EPOCHS):
        ranks = [Counter(s for e, samples in got[r] if e == epoch for s in samples) for r in (0, 1)]
        assert not set(ranks[0]) & set(ranks[1])  # disjoint halves
        cached = epoch_contents(cache, epoch % 2)
        assert ranks[0] + ranks[1] == Counter({digest(img, label): n for (img, label), n in cached.items()})
    for r in (0, 1):  # every epoch begins with a different batch
        firsts = [next(samples for e, samples in got[r] if e == epoch) for epoch in range(EPOCHS)]
        assert len({tuple(f) for f in firsts}) == EPOCHS


@pytest.mark.parametrize("stop", [7, 5])  # mid-epoch 1; the end of epoch 0
def test_lightning_ddp_reads_halves_advances_and_resumes(npy_cache, tmp_path, stop):
    pytest.importorskip("lightning")
    first = _run("lightning_harness.py", npy_cache, tmp_path / "first", "--stop-at-step", str(stop))
    resumed = _run("lightning_harness.py", npy_cache, tmp_path / "resumed", "--resume",
                   str(tmp_path / "first" / f"step={stop}.ckpt"))
    _check(npy_cache, first, resumed, stop)


@pytest.mark.parametrize("stop", [7, 5])
def test_accelerate_torchrun_reads_halves_advances_and_resumes(npy_cache, tmp_path, stop):
    pytest.importorskip("accelerate")
    first = _run("accelerate_harness.py", npy_cache, tmp_path / "first", "--stop-at-step", str(stop))
    resumed = _run("accelerate_harness.py", npy_cache, tmp_path / "resumed", "--resume", str(tmp_path / "first" / "state"))
    _check(npy_cache, first, resumed, stop)
