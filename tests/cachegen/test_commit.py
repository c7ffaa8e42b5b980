"""What a build commits: a sample skipped in one epoch is skipped in all; the manifest is checked
with the readers' contract before it is written; a full disk and a crash in the --overwrite swap
lose nothing. Real build processes, with faults injected through cachegen.faults' variables (no
root, no tmpfs needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from cachegen.errors import CachegenError
from cachegen.manifest import write_manifest
from readers import CachedLoader
from tests.cachegen.conftest import manifest, run_cli, shard_bytes
from tests.cachegen.test_overwrite import image_folder, one_line_error

ARGS = ["--epochs", "2", "--shard-size", "50", "--quiet"]


def cachegen(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachegen", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


# --- a read error in one epoch only -----------------------------------------------------------

def test_a_read_error_in_one_epoch_only_skips_the_sample_in_every_epoch(tmp_path):
    folder = image_folder(tmp_path / "folder", broken=False)
    flaky = "a/05.png"  # not among the images the build probes: read once an epoch
    log = tmp_path / "reads"
    common = ["--epochs", "3", "--shard-size", "20", "--on-error", "skip", "--transform", "cifar", "--quiet"]
    done = cachegen("build", folder, "--out", tmp_path / "cache", "--workers", "2", *common,
                    CACHEGEN_FAULT_FLAKY=f"{flaky}:2:{log}")  # its second read fails: one epoch's
    assert done.returncode == 0, output(done)
    assert log.read_bytes() == b"...", "not read once an epoch (and never again)"
    out = tmp_path / "cache"
    m = manifest(out)
    assert m["skipped"] == [5] and [e["samples"] for e in m["epoch_list"]] == [59, 59, 59]
    assert all(5 not in s["indices"] for e in m["epoch_list"] for s in e["shards"])
    assert (out / "skipped.txt").read_text().startswith(f"5\t{folder / flaky}")

    loader = CachedLoader(out, batch_size=16, shuffle=False)
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert sum(len(x) for x, _ in loader) == 59
    assert run_cli("verify", out).output.strip() == "ok: 9 shards verified"
    before = shard_bytes(out)  # a re-run (the image reads again) keeps it all
    assert cachegen("build", folder, "--out", out, "--workers", "1", *common).returncode == 0
    assert shard_bytes(out) == before
    # The same bytes as a build for which that image never reads.
    (folder / flaky).write_bytes(b"not a png")
    run_cli("build", folder, "--out", tmp_path / "broken", "--workers", "1", *common)
    assert shard_bytes(out) == shard_bytes(tmp_path / "broken")


def test_a_device_build_rewrites_a_shard_whose_first_sample_was_skipped_as_a_build_that_never_read_it(tmp_path):
    """--augment-on device seeds a shard's batches from the first sample it holds: the rewrite of
    a shard that lost its first sample gives the bytes of a build for which that image never read."""
    folder = image_folder(tmp_path / "folder", broken=False)
    common = ["--epochs", "3", "--shard-size", "20", "--on-error", "skip", "--transform", "cifar",
              "--augment-on", "device", "--workers", "1", "--quiet"]
    run_cli("build", folder, "--out", tmp_path / "clean", *common)
    # A sample first in a shard of epoch 2, read fine there and in epoch 0, not in epoch 1.
    first = next(s["indices"][0] for s in manifest(tmp_path / "clean")["epoch_list"][2]["shards"] if s["indices"][0])
    flaky = f"{'ab'[first // 30]}/{first % 30:02d}.png"
    log = tmp_path / "reads"
    done = cachegen("build", folder, "--out", tmp_path / "cache", *common, CACHEGEN_FAULT_FLAKY=f"{flaky}:2:{log}")
    assert done.returncode == 0, output(done)
    assert log.read_bytes() == b"..." and manifest(tmp_path / "cache")["skipped"] == [first]
    (folder / flaky).write_bytes(b"not a png")
    run_cli("build", folder, "--out", tmp_path / "broken", *common)
    assert shard_bytes(tmp_path / "cache") == shard_bytes(tmp_path / "broken")


# --- the manifest is checked before it is written ---------------------------------------------

def test_a_manifest_the_readers_would_refuse_is_never_written(build, tmp_path):
    out = build("--epochs", "1")
    good = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    bad = json.loads(json.dumps(good))
    bad["skipped"] = [3]  # what a build that skipped a sample in one epoch only would have written
    with pytest.raises(CachegenError, match="the build made a manifest its readers would refuse, so it was not "
                                            r"written \(.*epoch 0 holds 240 samples, not the 239 of the source"):
        write_manifest(out, bad, {"epoch-0000"})
    os.truncate(out / good["epoch_list"][0]["shards"][2]["path"], 10240)
    with pytest.raises(CachegenError, match=r"shard-000002.tar is 10240 bytes, the manifest says"):
        write_manifest(out, good, {"epoch-0000"})
    assert not (out / "manifest.json").exists()


# --- a full disk, injected at the n-th write ---------------------------------------------------

@pytest.mark.parametrize("full_at,workers", [("3", 1), ("2", 2), ("manifest.json", 1)])
def test_disk_full_at_a_write_then_resume(npz_source, tmp_path, full_at, workers):
    source = npz_source[0]
    clean = tmp_path / "clean"
    run_cli("build", source, "--out", clean, "--workers", "1", *ARGS)
    out = tmp_path / "cache"
    done = cachegen("build", source, "--out", out, "--workers", workers, *ARGS, CACHEGEN_FAULT_ENOSPC=full_at)
    if full_at == "manifest.json":
        one_line_error(done.returncode, output(done), f"cannot write {out / 'manifest.json'}: No space left",
                       "re-run the same command to resume")
        assert len(shard_bytes(out)) == 2 * 10  # every shard and index was written
    else:
        one_line_error(done.returncode, output(done), "disk full while writing", str(out / "epoch-000"),
                       "re-run the same command to resume")
    assert not list(out.glob("**/*.tmp-*")) and (out / ".cachegen-build.json").exists()
    assert shard_bytes(out).items() <= shard_bytes(clean).items()
    run_cli("build", source, "--out", out, "--workers", "1", *ARGS)
    assert shard_bytes(out) == shard_bytes(clean)
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


# --- a crash in the --overwrite swap -------------------------------------------------------------

SWAP_POINTS = [("swap:exchanged", "1"), ("swap:replaced", "1"), ("swap:old-moved", "0"), ("swap:replaced", "0")]


@pytest.mark.parametrize("point,exchange", SWAP_POINTS)
def test_a_crash_in_the_overwrite_swap_loses_neither_cache(npz_source, tmp_path, point, exchange):
    source, out = npz_source[0], tmp_path / "cache"
    run_cli("build", source, "--out", out, "--workers", "1", *ARGS)
    faults = {"CACHEGEN_FAULT_KILL": point, "CACHEGEN_FAULT_NO_EXCHANGE": "1" if exchange == "0" else "0"}
    overwrite = ["build", source, "--out", out, "--workers", "1", *ARGS, "--seed", "1", "--overwrite"]
    done = cachegen(*overwrite, **faults)
    assert done.returncode == -signal.SIGKILL, output(done)
    if point == "swap:old-moved":  # two renames, killed between them: a re-run puts the new one in place
        assert not out.exists()
    else:  # at every other instant --out holds a whole cache: the old one or the new one
        assert manifest(out)["seed"] == 1  # the swap had begun: the new one is complete
        assert run_cli("verify", out).output.startswith("ok: 10 shards")
    done = cachegen(*overwrite, CACHEGEN_FAULT_NO_EXCHANGE=faults["CACHEGEN_FAULT_NO_EXCHANGE"])
    assert done.returncode == 0, output(done)
    assert manifest(out)["seed"] == 1 and run_cli("verify", out).output.startswith("ok: 10 shards")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data.npz"]  # nothing of either left aside


def test_any_build_finishes_a_swap_a_crash_cut_between_its_renames(npz_source, tmp_path):
    source, out = npz_source[0], tmp_path / "cache"
    run_cli("build", source, "--out", out, "--workers", "1", *ARGS)
    done = cachegen("build", source, "--out", out, "--workers", "1", *ARGS, "--seed", "1", "--overwrite",
                    CACHEGEN_FAULT_KILL="swap:old-moved", CACHEGEN_FAULT_NO_EXCHANGE="1")
    assert done.returncode == -signal.SIGKILL and not out.exists()
    run_cli("build", source, "--out", out, "--workers", "1", *ARGS, "--seed", "1")  # no --overwrite: resumes it
    assert manifest(out)["seed"] == 1 and run_cli("verify", out).output.startswith("ok: 10 shards")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data.npz"]


@pytest.mark.parametrize("point,exchange", [("swap:old-moved", "0"), ("swap:exchanged", "1")])
def test_a_crash_in_the_swap_through_a_linked_out_is_finished_by_the_rerun(npz_source, tmp_path, point, exchange):
    """--out a link to the cache: the swap works on the folder it points at, and so does the
    recovery, so the re-run finds both halves."""
    source, real, out = npz_source[0], tmp_path / "real" / "cache", tmp_path / "link"
    real.parent.mkdir()
    run_cli("build", source, "--out", real, "--workers", "1", *ARGS)
    out.symlink_to(real, target_is_directory=True)
    overwrite = ["build", source, "--out", out, "--workers", "1", *ARGS, "--seed", "1", "--overwrite"]
    done = cachegen(*overwrite, CACHEGEN_FAULT_KILL=point, CACHEGEN_FAULT_NO_EXCHANGE="1" if exchange == "0" else "0")
    assert done.returncode == -signal.SIGKILL, output(done)
    done = cachegen(*overwrite, CACHEGEN_FAULT_NO_EXCHANGE="1" if exchange == "0" else "0")
    assert done.returncode == 0, output(done)
    assert out.is_symlink() and manifest(out)["seed"] == 1 and run_cli("verify", out).output.startswith("ok: 10 shards")
    assert sorted(p.name for p in real.parent.iterdir()) == ["cache"]  # nothing of either left aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "link", "real"]
