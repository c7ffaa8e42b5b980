"""The worker pool, with real processes: the spawn start method, and a worker killed by the OS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.cachegen.conftest import manifest, run_cli, shard_bytes

ARGS = ["--epochs", "3", "--shard-size", "20", "--transform", "slow_aug:make", "--quiet"]  # 36 shards


def test_a_build_under_spawn_gives_the_same_bytes(slow_source, tmp_path):
    source, env = slow_source
    clean = tmp_path / "clean"
    run_cli("build", source, "--out", clean, "--workers", "1", *ARGS)
    script = ("import multiprocessing as mp, sys\nmp.set_start_method('spawn')\n"
              "from cachegen.cli import main\nmain(sys.argv[1:])\n")
    out = tmp_path / "spawned"
    done = subprocess.run([sys.executable, "-c", script, "build", str(source), "--out", str(out), "--workers", "2",
                           *ARGS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert shard_bytes(out) == shard_bytes(clean) and len(shard_bytes(clean)) == 2 * 36  # shards and index files
    assert manifest(out) == manifest(clean)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_worker_killed_mid_build_ends_it_in_one_line_and_a_rerun_resumes(slow_source, tmp_path):
    source, env = slow_source
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "cachegen", "build", str(source), "--out", str(out), "--workers", "2", *ARGS]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("epoch-*/*.tar"))) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the build made no progress"
            time.sleep(0.002)
        victim = children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)  # what the OOM killer does
        output = proc.communicate(timeout=120)[0]  # never a hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    assert lines[0].startswith(f"Error: worker process {victim} was killed by SIGKILL"), output
    assert "re-run the same command to resume" in lines[0]
    kept = shard_bytes(out)
    assert 2 <= len(kept) < 2 * 36 and not (out / "manifest.json").exists()  # shards and index files
    assert not list(out.glob("**/*.tmp-*"))
    inodes = {p: (out / p).stat().st_ino for p in kept}

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {p: (out / p).stat().st_ino for p in kept} == inodes  # finished shards kept, not rewritten
    clean = tmp_path / "clean"
    run_cli("build", source, "--out", clean, "--workers", "1", *ARGS)
    assert shard_bytes(out) == shard_bytes(clean)
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


def test_ctrl_c_stops_the_pool_cleanly_and_a_rerun_resumes(slow_source, tmp_path):
    """Ctrl-C reaches the whole process group: the workers leave it to the main process, which
    stops them, removes their temporaries and says how to resume."""
    source, env = slow_source
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "cachegen", "build", str(source), "--out", str(out), "--workers", "2", *ARGS]
    # SIGINT as a terminal delivers it: a test run from a background job (`pytest &`) has it ignored,
    # and children inherit that.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not any(out.glob("epoch-*/*.tar")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130 and output.strip() == "cachegen: interrupted; re-run the same command to resume"
    assert not list(out.glob("**/*.tmp-*")) and not (out / "manifest.json").exists()
    run_cli("build", source, "--out", out, "--workers", "1", *ARGS)
    clean = tmp_path / "clean"
    run_cli("build", source, "--out", clean, "--workers", "1", *ARGS)
    assert shard_bytes(out) == shard_bytes(clean) and len(shard_bytes(out)) == 2 * 36
