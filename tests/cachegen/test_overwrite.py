"""`--overwrite` builds beside the old cache and replaces it only when complete; a lock keeps a
second build out of a folder being built. Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from tests.cachegen.conftest import manifest, run_cli, shard_bytes

SLOW_ARGS = ["--epochs", "3", "--shard-size", "20", "--transform", "slow_aug:make", "--quiet"]


def cachegen(*args, env=None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cachegen", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    output = proc.communicate(timeout=timeout)[0]
    return proc.returncode, output


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the build made no progress"
        time.sleep(0.002)


def one_line_error(rc: int, output: str, *fragments: str) -> None:
    lines = output.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def image_folder(root: Path, broken: bool) -> Path:
    """Two classes of 24x24 PNGs; with `broken`, one of them is not an image."""
    rng = __import__("numpy").random.default_rng(5)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(30):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype="uint8")).save(root / name / f"{k:02d}.png")
    if broken:
        (root / "b" / "15.png").write_bytes(b"not a png")
    return root


def test_a_failed_overwrite_leaves_the_old_cache_intact_and_a_fixed_one_replaces_it(build, tmp_path):
    out = build("--epochs", "2")
    old_shards, old_manifest = shard_bytes(out), (out / "manifest.json").read_bytes()
    folder = image_folder(tmp_path / "folder", broken=True)
    args = ["build", folder, "--out", out, "--overwrite", "--epochs", "2", "--workers", "2", "--quiet"]

    one_line_error(*finish(cachegen(*args)), "15.png", f"{out} is untouched")
    assert shard_bytes(out) == old_shards and (out / "manifest.json").read_bytes() == old_manifest
    assert run_cli("verify", out).output.startswith("ok: 10 shards")

    (folder / "b" / "15.png").unlink()  # fixed: the same command now replaces the old cache
    rc, output = finish(cachegen(*args))
    assert rc == 0, output
    assert manifest(out)["source"]["kind"] == "folder" and manifest(out)["source"]["num_samples"] == 59
    assert run_cli("verify", out).output.startswith("ok: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data.npz", "folder"]  # no sibling left
    assert not (out / ".cachegen-lock").exists()


def test_a_second_build_into_the_same_folder_fails_at_once_naming_the_first(slow_source, tmp_path):
    source, env = slow_source
    out, gate = tmp_path / "cache", tmp_path / "gate"
    gate.touch()  # holds the first build at its first sample until the second has been refused
    first = cachegen("build", source, "--out", out, "--workers", "1", *SLOW_ARGS,
                     env={**env, "SLOW_AUG_GATE": str(gate)})
    try:
        wait_for(first, lambda: (out / ".cachegen-lock").exists())
        for extra in ([], ["--overwrite"]):
            second = subprocess.run([sys.executable, "-m", "cachegen", "build", str(source), "--out", str(out),
                                     *SLOW_ARGS, *extra], env=env, capture_output=True, text=True, timeout=120)
            one_line_error(second.returncode, second.stdout + second.stderr,
                           f"another cachegen build (pid {first.pid}) is writing {out}")
            assert first.poll() is None  # refused while the first was still at work
        gate.unlink()
        rc, output = finish(first)
    finally:
        first.kill()
    assert rc == 0, output
    assert run_cli("verify", out).output.strip() == "ok: 36 shards verified"
    assert not (out / ".cachegen-lock").exists()


def test_the_lock_of_a_killed_build_is_taken_over(slow_source, tmp_path):
    source, env = slow_source
    out = tmp_path / "cache"
    killed = cachegen("build", source, "--out", out, "--workers", "2", *SLOW_ARGS, env=env, start_new_session=True)
    try:
        wait_for(killed, lambda: any(out.glob("epoch-*/*.tar")))
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        finish(killed)
    assert (out / ".cachegen-lock").read_text().strip() == str(killed.pid)  # left behind, its holder gone
    run_cli("build", source, "--out", out, "--workers", "1", *SLOW_ARGS)
    assert run_cli("verify", out).output.strip() == "ok: 36 shards verified"
    assert not (out / ".cachegen-lock").exists()


def test_overwrite_of_the_current_folder(build, npz_source, tmp_path, monkeypatch):
    out = build("--epochs", "1")
    monkeypatch.chdir(out)
    run_cli("build", npz_source[0], "--out", ".", "--epochs", "1", "--seed", "3", "--overwrite", "--quiet",
            "--workers", "1")
    assert manifest(out)["seed"] == 3 and run_cli("verify", out).output.startswith("ok: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data.npz"]


def test_a_build_removes_its_temporaries_and_nothing_a_link_in_the_cache_points_at(build, tmp_path):
    out = build("--epochs", "1")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.tmp-1").write_text("the user's")
    (out / "notes").symlink_to(notes, target_is_directory=True)
    (out / "epoch-0000" / "shard-000001.tar.tmp-424242").write_bytes(b"\0" * 100)  # what a killed build leaves
    build("--epochs", "2", out=out)  # grows the cache: the temporaries sweep runs
    assert (notes / "notes.tmp-1").read_text() == "the user's"
    assert not list(out.glob("epoch-*/*.tmp-*"))
