"""Reliability of the builder: kill -9 at random moments, crashes mid-manifest and mid-shard,
corrupted caches, a full disk. Each ends byte-identical to a clean build, or in a one-line error
that names the file. `pytest -m slow` runs the long variants (10 kill moments)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from cacheformat.index import encode_index, index_record
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli, shard_bytes
from tests.conftest import make_npz

STATE = ".cachegen-build.json"
DEAD_PID = 424242  # the pid in the names of temporaries left by a simulated crash


def temporaries(root: Path) -> list[Path]:
    return sorted(root.glob("**/*.tmp-*"))


def assert_not_a_cache(root: Path) -> None:
    """What `info` and `verify` say about a folder whose build never finished."""
    for command in ("info", "verify"):
        assert_one_line_error(run_cli(command, root, expect=1), "a build there was interrupted",
                              "re-run the same `cachegen build` command to resume it")


def assert_same_cache(root: Path, clean: Path) -> None:
    """Every shard byte and the manifest as a clean build made them; nothing temporary left."""
    assert shard_bytes(root) == shard_bytes(clean) and shard_bytes(root)
    assert (root / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert not temporaries(root) and not (root / STATE).exists()
    shards = sum(len(e["shards"]) for e in manifest(clean)["epoch_list"])
    assert run_cli("verify", root).output.strip() == f"ok: {shards} shards verified"


# --- kill -9 at random moments ------------------------------------------------------------------

KILL_ARGS = ["--epochs", "5", "--shard-size", "50", "--transform", "cifar", "--quiet"]  # 60 shards


class BuildProcess:
    """`cachegen build --workers 2` as a real process (`start_method`: its pool's, multiprocessing's)."""

    def __init__(self, source: Path, out: Path, start_method: str = "fork") -> None:
        self.out, self.text = out, None
        script = ("import multiprocessing as mp, sys\n"
                  f"mp.set_start_method({start_method!r})\n"
                  "from cachegen.cli import main\nmain(sys.argv[1:])\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, "build", str(source), "--out", str(out), "--workers", "2",
             *KILL_ARGS], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_until_working(self, timeout: float = 180) -> None:
        """Block until the build has written its state file: imports, source and probe are done."""
        self.wait_for(lambda: (self.out / STATE).exists(), timeout)

    def wait_for_shards(self, count: int, timeout: float = 180) -> None:
        self.wait_for(lambda: len(list(self.out.glob("epoch-*/*.tar"))) >= count, timeout)

    def wait_for(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"build ended before it could be killed: {self.output()}"
            assert time.monotonic() < deadline, "build made no progress"
            time.sleep(0.002)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the build process alone, as the OOM killer or `kill` does (a no-op once the
        build has ended), reap it, and assert that none of its processes outlives it; its exit code."""
        processes = []
        if self.proc.poll() is None:
            processes = psutil.Process(self.proc.pid).children(recursive=True)
            os.kill(self.proc.pid, sig)
        code = self.proc.wait(timeout=60)
        survivors = outliving(processes)
        for process in survivors:  # left to no one else: ended here, then the test fails
            process.kill()
        self.text = self.proc.stdout.read().decode(errors="replace")  # after the survivors: they hold the pipe
        self.proc.stdout.close()
        assert not survivors, f"processes outlived the build killed by {signal.Signals(sig).name}: {survivors}"
        return code

    def output(self) -> str:
        """What it printed (read once it has ended)."""
        if self.text is None:
            self.text = self.proc.stdout.read().decode(errors="replace")
        return self.text


def outliving(processes: list, timeout: float = 60) -> list:
    """Those of `processes` still running after `timeout` seconds (a zombie has ended)."""
    deadline = time.monotonic() + timeout
    while True:
        running = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.01)


def phase(out: Path, shards: int) -> str:
    """Where a kill landed, from what it left."""
    if (out / "manifest.json").exists():
        return "after the manifest"
    if list(out.glob("manifest.json.tmp-*")):
        return "writing the manifest"
    if list(out.glob("epoch-*/*.tar.tmp-*")):
        return "mid-shard"
    finished = len(list(out.glob("epoch-*/*.tar")))
    return "after the last shard" if finished == shards else f"between shards ({finished} done)"


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """A 600-image source, and a clean build of it by a real process, timed per shard."""
    tmp = tmp_path_factory.mktemp("kill")
    source = make_npz(tmp / "data.npz", n=600)[0]
    clean = BuildProcess(source, tmp / "clean")
    try:
        clean.wait_until_working()
        start = time.monotonic()
        clean.wait_for(lambda: (tmp / "clean" / "manifest.json").exists(), timeout=300)
        shards = len(list((tmp / "clean").glob("epoch-*/*.tar")))
        per_shard = 2 * (time.monotonic() - start) / shards  # two workers: two shards in flight
        assert clean.proc.wait(timeout=300) == 0, clean.output()
    finally:
        clean.kill()
    return source, tmp / "clean", shards, per_shard


def kill_at_random_moments(kill_setup, tmp_path, moments: int, seed: int) -> list[str]:
    """Kill a fresh build at `moments` random moments; after each, check what the kill left, then
    resume in-process and compare with the clean build.

    A moment is a number of finished shards plus a random part of the time one shard takes
    (progress, not wall time, so a busy machine moves no kill past the end). The first
    `moments - 1` counts are drawn one in each equal slice of 0..all-1, so early and late kills
    both occur; the last kill waits for every shard, then up to 10 ms: the manifest's turn.
    """
    source, clean, shards, per_shard = kill_setup
    print(f"kill moments drawn with seed {seed}")
    rng = random.Random(seed)
    phases = []
    for k in range(moments):
        out = tmp_path / f"killed-{k}"
        build = BuildProcess(source, out)
        try:
            build.wait_until_working()
            if k < moments - 1:
                build.wait_for_shards(int(shards * (k + rng.random()) / (moments - 1)))
                time.sleep(per_shard * rng.random())
            else:
                build.wait_for_shards(shards)
                time.sleep(0.01 * rng.random())
        finally:
            build.kill()
        phases.append(phase(out, shards))

        # A shard appears under its own name only whole: each is the clean build's, byte for byte.
        left = shard_bytes(out)
        assert left.items() <= shard_bytes(clean).items(), f"kill {k} ({phases[-1]}): a partial shard"
        if (out / "manifest.json").exists():  # killed after the rename: a finished cache
            assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
            assert run_cli("verify", out).output.strip() == f"ok: {shards} shards verified"
        else:
            assert_not_a_cache(out)

        inodes = {p: (out / p).stat().st_ino for p in left}
        run_cli("build", source, "--out", out, "--workers", "1", *KILL_ARGS)  # the same command resumes
        assert {p: (out / p).stat().st_ino for p in left} == inodes  # finished shards kept, not rewritten
        assert_same_cache(out, clean)
    print(f"kill moments: {phases}")
    return phases


def test_kill_at_2_random_moments_then_resume(kill_setup, tmp_path):
    kill_at_random_moments(kill_setup, tmp_path, moments=2, seed=1)


@pytest.mark.slow
def test_kill_at_10_random_moments_then_resume(kill_setup, tmp_path):
    kill_at_random_moments(kill_setup, tmp_path, moments=10, seed=random.randrange(1 << 30))


@pytest.mark.parametrize("sig,start_method", [(signal.SIGKILL, "fork"), (signal.SIGKILL, "spawn"),
                                              (signal.SIGTERM, "fork")])  # fork: a handler the workers inherit
def test_a_build_killed_alone_while_its_workers_are_busy_leaves_no_process(kill_setup, tmp_path, sig, start_method):
    """The OOM killer's SIGKILL or a `kill` reaches the build process only, not its group: its workers
    end with it (BuildProcess.kill asserts it). SIGTERM is a Ctrl-C: temporaries removed, one line,
    and the state a re-run resumes from (resuming after a kill: the tests above)."""
    source, clean, shards, _ = kill_setup
    out = tmp_path / "cache"
    build = BuildProcess(source, out, start_method)
    try:
        build.wait_for_shards(2)
    finally:
        code = build.kill(sig)
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM, build.output()
        assert build.output().strip() == "cachegen: interrupted; re-run the same command to resume"
        assert not temporaries(out)
    else:
        assert code == -signal.SIGKILL
    assert shard_bytes(out).items() <= shard_bytes(clean).items() and (out / STATE).exists()
    assert_not_a_cache(out)


# --- crashes simulated at exact points -----------------------------------------------------------

def crash_leftovers(out: Path, shard: str, manifest_text: bytes) -> None:
    """What a crash leaves while a shard and the manifest are half-written: their temporaries,
    named as the builder names them, and no finished shard under that name."""
    path = out / shard
    data = path.read_bytes()
    path.unlink()
    path.with_name(f"{path.name}.tmp-{DEAD_PID}").write_bytes(data[:len(data) // 2])
    (out / f"manifest.json.tmp-{DEAD_PID}").write_bytes(manifest_text[:len(manifest_text) // 2])


def state_of(m: dict) -> dict:
    """The build state a build writes first: its manifest without what only the end knows."""
    return {k: v for k, v in m.items()
            if k not in ("epochs", "source_spec", "epoch_list", "source_shards", "skipped", "mean", "std")}


def test_crash_while_writing_the_first_manifest(build, tmp_path):
    clean = build("--epochs", "2", out=tmp_path / "clean")
    out = tmp_path / "crashed"
    shutil.copytree(clean, out)
    text = (out / "manifest.json").read_bytes()
    (out / "manifest.json").unlink()
    (out / STATE).write_text(json.dumps(state_of(json.loads(text))))
    crash_leftovers(out, "epoch-0001/shard-000002.tar", text)

    assert_not_a_cache(out)  # a manifest's temporary is not a manifest
    assert "epoch-0001/shard-000002.tar" not in shard_bytes(out)
    build("--epochs", "2", out=out)
    assert_same_cache(out, clean)


def test_crash_while_writing_the_manifest_of_a_grown_cache(build, tmp_path):
    clean = build("--epochs", "2", out=tmp_path / "clean")
    out = build("--epochs", "1", out=tmp_path / "crashed")
    shutil.copytree(clean / "epoch-0001", out / "epoch-0001")
    grown = (clean / "manifest.json").read_bytes()
    (out / STATE).write_text(json.dumps(state_of(json.loads(grown))))
    crash_leftovers(out, "epoch-0001/shard-000004.tar", grown)
    (out / "epoch-0000" / f"shard-000001.tar.tmp-{DEAD_PID}").write_bytes(b"\0" * 1000)  # and a stray one

    # The old manifest still describes the old cache; no temporary or unlisted shard counts.
    assert "1 augmented epoch, 5 shards" in run_cli("info", out).output
    assert run_cli("verify", out).output.strip() == "ok: 5 shards verified"
    build("--epochs", "2", out=out)
    assert_same_cache(out, clean)


# --- corruption: verify names each bad file ------------------------------------------------------

@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A 2-epoch cache, one built with another seed and one as png: the donors of foreign shards."""
    tmp = tmp_path_factory.mktemp("caches")
    source = make_npz(tmp / "data.npz")[0]
    made = {}
    for name, extra in (("good", []), ("seed1", ["--seed", "1"]), ("png", ["--format", "png"])):
        made[name] = tmp / name
        run_cli("build", source, "--out", made[name], "--epochs", "2", "--shard-size", "50", "--workers", "1",
                "--quiet", *extra)
    return made


SHARD = "epoch-0001/shard-000003.tar"


def flip(where: float):
    def damage(root: Path, caches: dict) -> None:
        data = bytearray((root / SHARD).read_bytes())
        data[min(int(len(data) * where), len(data) - 1)] ^= 0x20
        (root / SHARD).write_bytes(bytes(data))
    return damage


def truncate(size: int):
    def damage(root: Path, caches: dict) -> None:
        os.truncate(root / SHARD, size if size >= 0 else (root / SHARD).stat().st_size + size)
    return damage


def copy_from(donor: str | None, shard: str = SHARD):
    def damage(root: Path, caches: dict) -> None:
        shutil.copy((caches[donor] if donor else root) / shard, root / SHARD)
    return damage


def edit_entry(field: str, change):
    """Change one field of SHARD's manifest entry, leaving the manifest well-formed."""
    def damage(root: Path, caches: dict) -> None:
        m = json.loads((root / "manifest.json").read_text())
        entry = m["epoch_list"][1]["shards"][3]
        entry[field] = change(entry[field])
        (root / "manifest.json").write_text(json.dumps(m, separators=(",", ":")))
    return damage


def edit_index_label(root: Path, caches: dict) -> None:
    """Give SHARD's first sample another label in its index, and record the index's new checksum:
    an index consistent with the manifest that no longer says what the shard holds."""
    index = root / SHARD.replace(".tar", ".idx")
    table = np.load(index)
    table[0, 2] = 3 - table[0, 2]
    data = encode_index(*table.T)
    index.write_bytes(data)
    edit_entry("index", lambda _: index_record(data))(root, caches)


def index_from(donor: str):
    def damage(root: Path, caches: dict) -> None:
        shutil.copy(caches[donor] / SHARD.replace(".tar", ".idx"), root / SHARD.replace(".tar", ".idx"))
    return damage


def deleted(root: Path, caches: dict) -> None:
    (root / SHARD).unlink()


def made_a_folder(root: Path, caches: dict) -> None:
    (root / SHARD).unlink()
    (root / SHARD).mkdir()


SHARD_FAULTS = {  # fault: (damage, what verify's BAD line says)
    "flipped byte in a tar header": (flip(0.0), "is not a readable tar (bad checksum)"),
    "flipped byte in a payload": (flip(0.5), "sha256 mismatch"),
    "flipped byte in the end padding": (flip(1.0), "sha256 mismatch"),
    "truncated by one byte": (truncate(-1), "truncated or replaced"),
    "truncated to nothing": (truncate(0), "truncated or replaced"),
    "deleted": (deleted, "missing"),
    "replaced by a folder": (made_a_folder, "missing"),
    "from a cache with another seed": (copy_from("seed1"), "sha256 mismatch"),
    "from a png cache": (copy_from("png"), "truncated or replaced"),
    "replaced by its neighbour": (copy_from(None, "epoch-0001/shard-000002.tar"), "sha256 mismatch"),
    "listed with another sha256": (edit_entry("sha256", lambda sha: "0" * 64), "sha256 mismatch"),
    "its index gives another label": (edit_index_label, "contents disagree with its index (labels)"),
    "its index from a cache with another seed": (index_from("seed1"), "fails its sha256 check"),
    "its index deleted": (lambda root, caches: (root / SHARD.replace(".tar", ".idx")).unlink(), "is missing"),
}


@pytest.mark.parametrize("fault", SHARD_FAULTS)
def test_verify_names_a_bad_shard(caches, tmp_path, fault):
    root = tmp_path / "cache"
    shutil.copytree(caches["good"], root)
    damage, message = SHARD_FAULTS[fault]
    damage(root, caches)
    result = run_cli("verify", root, expect=1)
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and bad[0].startswith(f"BAD {root / SHARD}") and message in bad[0], result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: 1 of 10 shards are bad")
    assert "Traceback" not in result.output


# Every way a manifest can break the format is tested once, against the contract, in
# tests/format/test_manifest.py; here, that such a manifest reaches the user as one line, and the
# edits that are consistent in themselves, which only verify (recomputing the layout, the stats
# and the fingerprint) can see.
MANIFEST_FAULTS = {  # fault: (edit of the manifest's text, what the one-line error says)
    "cut short": (lambda t: t[:len(t) // 2], "unreadable or not JSON"),
    "the older format": (lambda t: t.replace('"format_version":2', '"format_version":1'),
                         "was built by an older cachegen (format 1, this one reads 2): rebuild it"),
    "the seed edited": (lambda t: t.replace('"seed":0', '"seed":7'), "does not hold the samples its seed"),
    "shard_size edited": (lambda t: t.replace('"shard_size":50', '"shard_size":60'), "its seed and shard_size make"),
    "mean edited": (lambda t: re.sub(r'"mean":\[0\.', '"mean":[0.1', t), "mean/std disagree"),
    "transform edited": (lambda t: t.replace('"spec":"cifar"', '"spec":"imagenet"'), "disagrees with its fingerprint"),
}
VERIFY_ONLY = ("the seed edited", "shard_size edited", "mean edited", "transform edited")


@pytest.mark.parametrize("fault", MANIFEST_FAULTS)
def test_verify_and_info_name_a_damaged_or_edited_manifest(caches, tmp_path, fault):
    root = tmp_path / "cache"
    shutil.copytree(caches["good"], root)
    path = root / "manifest.json"
    edit, message = MANIFEST_FAULTS[fault]
    text = edit(path.read_text())
    assert text != path.read_text(), "the edit did not apply"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert_one_line_error(run_cli("verify", root, expect=1), str(path), message)
    if fault in VERIFY_ONLY:
        run_cli("info", root)
    else:
        assert_one_line_error(run_cli("info", root, expect=1), str(path), message)


# --- a full disk ---------------------------------------------------------------------------------

class Tmpfs:
    """A size-limited tmpfs at `path`: mount(size) makes it (or skips the test), grow(size) remounts it bigger."""

    def __init__(self, path: Path) -> None:
        self.path, self.mounted = path, False

    def mount(self, size: int) -> Path:
        self.path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
        self.mounted = True
        return self.path

    def grow(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    disk = Tmpfs(tmp_path / "disk")
    yield disk
    if disk.mounted:
        subprocess.run(["umount", str(disk.path)], check=True)


def pages(size: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    return -(-size // page) * page


@pytest.mark.parametrize("full_at", ["mid-shard", "manifest"])
def test_disk_full_then_resume_in_place_on_a_bigger_disk(build, npz_source, tmp_path, tmpfs, full_at):
    clean = build("--epochs", "2", out=tmp_path / "clean")
    shards = sum(pages(p.stat().st_size) for p in clean.glob("epoch-*/shard-*"))  # shards and index files
    state = json.dumps(state_of(manifest(clean)), separators=(",", ":"))
    assert pages(len(state)) == pages(1)
    # tmpfs charges whole pages per file: at "manifest" every shard and the state file fit, the
    # manifest's temporary does not; at "mid-shard" the disk fills around the fourth shard.
    size = {"mid-shard": 3 * shards // 10, "manifest": shards + pages(1) + pages((clean / "manifest.json")
                                                                             .stat().st_size) - pages(1)}[full_at]
    out = tmpfs.mount(size) / "cache"
    result = run_cli("build", npz_source[0], "--out", out, "--epochs", "2", "--shard-size", "50", "--workers", "1",
                     "--quiet", expect=1)  # what the `build` fixture runs
    if full_at == "mid-shard":  # the build's size estimate refuses it before anything is written
        assert_one_line_error(result, "this build needs ~", "GB free")  # (a disk filled mid-shard: test_commit.py)
        assert not out.exists()
    else:
        assert_one_line_error(result, "cannot write", str(out / "manifest.json"), "re-run the same command to resume")
        assert not temporaries(out) and (out / STATE).exists()
        assert_not_a_cache(out)
        left = shard_bytes(out)
        assert len(left) == 2 * 10 and left.items() <= shard_bytes(clean).items()

    tmpfs.grow(16 << 20)
    build("--epochs", "2", out=out)
    assert_same_cache(out, clean)
