"""Resume: a build killed with SIGKILL, re-run, ends byte-identical to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli, shard_bytes

ARGS = ["--epochs", "2", "--shard-size", "250", "--quiet"]  # the built-in sample: 40 shards


def start_build(out, workers):
    return subprocess.Popen([sys.executable, "-m", "cachegen", "build", "--out", str(out), "--workers",
                             str(workers), *ARGS], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_when(proc, ready, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"build ended before it could be killed: {proc.stdout.read()}"
        assert time.monotonic() < deadline, "build made no progress"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the pool's workers too, as kill -9 of a job would
    proc.wait(timeout=30)


def test_resume_after_kill_is_byte_identical(tmp_path):
    out = tmp_path / "cache"
    proc = start_build(out, workers=2)
    kill_when(proc, lambda: len(list(out.glob("epoch-0000/shard-*.tar"))) >= 3)
    assert not (out / "manifest.json").exists()
    assert_one_line_error(run_cli("info", out, expect=1), "a build there was interrupted", "re-run the same")
    finished = shard_bytes(out)
    assert 3 <= len(finished) < 2 * 40  # shards and index files

    run_cli("build", "--out", out, "--workers", "1", *ARGS)  # the same command, another worker count
    resumed = shard_bytes(out)
    assert {k: resumed[k] for k in finished} == finished  # what was finished was kept, not rewritten
    assert not list(out.glob("**/*.tmp*")) and not (out / ".cachegen-build.json").exists()

    clean = tmp_path / "clean"
    run_cli("build", "--out", clean, "--workers", "2", *ARGS)
    assert resumed == shard_bytes(clean) and len(resumed) == 2 * 40
    assert manifest(out) == manifest(clean)
    assert run_cli("verify", out).output.startswith("ok: 40 shards")


def test_interrupted_build_of_another_config_is_refused(tmp_path):
    out = tmp_path / "cache"
    proc = start_build(out, workers=1)
    kill_when(proc, lambda: (out / ".cachegen-build.json").exists())
    result = run_cli("build", "--out", out, "--seed", "3", *ARGS, expect=1)
    assert_one_line_error(result, "holds a different cache", "seed")
