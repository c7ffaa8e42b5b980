"""`cachegen build --dask ADDRESS`: the shards written by a real Dask cluster's worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachegen.cli import main
from tests.conftest import make_npz

SLOW = """
import time

def factory(epoch, epochs):
    def slow(image):
        time.sleep(0.02)  # long enough for a worker to be killed mid-build
        return image.rotate(90 * (epoch % 4))
    return slow
"""


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def local_build(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["build", *args, "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output


def dask_build(args: list[str], address: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "cachegen", "build", *args, "--dask", address, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def test_a_dask_build_is_byte_identical_to_a_local_build(dask_cluster, tmp_path):
    source = make_npz(tmp_path / "data.npz", n=120, size=16)[0]
    common = [str(source), "--epochs", "3", "--shard-size", "25", "--transform", "cifar"]
    local_build([*common, "--out", str(tmp_path / "local")])
    run = dask_build([*common, "--out", str(tmp_path / "dask")], dask_cluster.address)
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out
    assert tree(tmp_path / "dask") == tree(tmp_path / "local")


def test_a_dask_build_augmented_on_the_client_is_byte_identical_to_a_local_build(dask_cluster, tmp_path):
    """--device: the client augments each shard (on its GPU; on the CPU here), the cluster's workers
    load the source and write the shards."""
    source = make_npz(tmp_path / "data.npz", n=120, size=16)[0]
    common = [str(source), "--epochs", "2", "--shard-size", "25", "--transform", "cifar", "--augment-on", "device"]
    local_build([*common, "--out", str(tmp_path / "local")])  # augmented in the local workers
    run = dask_build([*common, "--device", "cpu", "--out", str(tmp_path / "dask")], dask_cluster.address)
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out
    assert tree(tmp_path / "dask") == tree(tmp_path / "local")


def _slow_build_under_way(dask_cluster, tmp_path) -> tuple[list[str], Path, subprocess.Popen]:
    """(arguments, --out, the process) of a slow Dask build that has finished 2 shards (or ended)."""
    source = make_npz(tmp_path / "data.npz", n=200, size=16)[0]
    (tmp_path / "slow.py").write_text(SLOW)
    common = [str(source), "--epochs", "2", "--shard-size", "10", "--transform", f"{tmp_path / 'slow.py'}:factory"]
    out = tmp_path / "dask"
    run = dask_build([*common, "--out", str(out)], dask_cluster.address)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/*.tar"))) < 2 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    return common, out, run


def test_a_worker_killed_mid_build_costs_only_its_tasks(dask_cluster, tmp_path):
    common, out, run = _slow_build_under_way(dask_cluster, tmp_path)
    assert run.poll() is None, "the build ended before a worker could be killed"
    victim = dask_cluster.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    local_build([*common, "--out", str(tmp_path / "local")])
    assert tree(out) == tree(tmp_path / "local")  # no temporary of the killed worker left either


def test_an_unreachable_scheduler_is_one_line(tmp_path):
    pytest.importorskip("distributed")
    from s3server import free_port

    source = make_npz(tmp_path / "data.npz", n=20, size=16)[0]
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s",
           "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run([sys.executable, "-m", "cachegen", "build", str(source), "--epochs", "1", "--out",
                          str(tmp_path / "c"), "--dask", address, "--quiet"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Dask scheduler at {address}" in lines[0], run.stderr
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_a_client_killed_mid_build_resumes_like_a_local_build(dask_cluster, tmp_path):
    common, out, run = _slow_build_under_way(dask_cluster, tmp_path)
    run.kill()  # the client: its tasks are released on the cluster
    run.communicate()
    assert not (out / "manifest.json").exists()
    again = dask_build([*common, "--out", str(out)], dask_cluster.address)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    local_build([*common, "--out", str(tmp_path / "local")])
    assert tree(out) == tree(tmp_path / "local")
