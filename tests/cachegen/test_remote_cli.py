"""`cachegen info` and `verify` over a cache on S3 (moto's server over HTTP, through AWS_ENDPOINT_URL)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.cachegen.conftest import assert_one_line_error, run_cli
from tests.conftest import make_npz


@pytest.fixture
def uploaded(s3_server, tmp_path):
    from s3server import s3fs_filesystem, upload

    source = make_npz(tmp_path / "data.npz", n=60, size=16)[0]
    run_cli("build", source, "--out", tmp_path / "cache", "--epochs", "2", "--shard-size", "20", "--workers", "1",
            "--quiet")
    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    fs = s3fs_filesystem()
    upload(fs, tmp_path / "cache", url)
    return url, tmp_path / "cache", fs


def test_info_and_verify_take_a_url(uploaded):
    url, cache, _ = uploaded
    remote = json.loads(run_cli("info", url, "--json").output)
    assert remote == json.loads(run_cli("info", cache, "--json").output)
    assert run_cli("info", url).output.startswith(f"cache      {url}")
    assert "ok: 6 shards verified" in run_cli("verify", url).output


def test_verify_names_a_corrupted_object_by_its_url(uploaded):
    url, cache, fs = uploaded
    rel = "epoch-0001/shard-000002.tar"
    data = bytearray((cache / rel).read_bytes())
    data[700] ^= 0xFF
    fs.pipe_file(f"{url.removeprefix('s3://')}/{rel}", bytes(data))
    result = run_cli("verify", url, expect=1)
    assert f"BAD {url}/{rel}" in result.output
    assert "1 of 6 shards are bad" in result.output


def test_a_missing_cache_url_is_one_line(s3_server):
    assert_one_line_error(run_cli("info", "s3://caches/nothing-here", expect=1),
                          "no cache at s3://caches/nothing-here/manifest.json")


def test_build_out_a_url_uploads_shards_indexes_then_the_manifest(s3_server, tmp_path):
    from s3server import s3fs_filesystem

    source = make_npz(tmp_path / "data.npz", n=60, size=16)[0]
    common = [source, "--epochs", "2", "--shard-size", "20", "--workers", "1"]
    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    out = run_cli("build", *common, "--out", url, "--stage", tmp_path / "stage").output
    assert f"uploaded 13 file(s) to {url}" in out  # 6 shards, 6 indexes, the manifest
    run_cli("build", *common, "--out", tmp_path / "local", "--quiet")
    fs = s3fs_filesystem()
    for p in (tmp_path / "local").rglob("*"):
        if p.is_file():
            assert fs.cat_file(f"{url.removeprefix('s3://')}/{p.relative_to(tmp_path / 'local').as_posix()}") == \
                p.read_bytes()
    assert "ok: 6 shards verified" in run_cli("verify", url).output
    # A re-run (after a kill, say) keeps what is there and complete: only the manifest goes again.
    fs.rm_file(f"{url.removeprefix('s3://')}/epoch-0001/shard-000000.idx")
    assert "uploaded 2 file(s)" in run_cli("build", *common, "--out", url, "--stage", tmp_path / "stage").output


def test_build_out_a_url_announces_its_temporary_stage_and_removes_it(s3_server, tmp_path, monkeypatch):
    import tempfile

    from cachegen.remote import stage_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the system's temporary folder, here
    (tmp_path / "tmp").mkdir()
    source = make_npz(tmp_path / "data.npz", n=60, size=16)[0]
    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    out = run_cli("build", source, "--epochs", "2", "--shard-size", "20", "--workers", "1", "--out", url).output
    stage = stage_folder(url)
    assert stage.parent == tmp_path / "tmp"
    assert out.startswith(f"cachegen: building in {stage}, then uploading to {url}"), out
    assert f"uploaded 13 file(s) to {url} (built in {stage}; removing that local copy)" in out
    assert not stage.exists() and not any((tmp_path / "tmp").iterdir())
    assert "ok: 6 shards verified" in run_cli("verify", url).output


def test_build_to_a_missing_bucket_is_one_line(s3_server, tmp_path):
    source = make_npz(tmp_path / "data.npz", n=20, size=16)[0]
    result = run_cli("build", source, "--epochs", "1", "--workers", "1", "--out", "s3://no-such-bucket-x/c",
                     "--stage", tmp_path / "stage", expect=1)
    assert_one_line_error(result, "cannot write to --out s3://no-such-bucket-x/c")
    assert not (tmp_path / "stage").exists()  # refused before any work


def test_verify_of_a_url_names_a_damaged_manifest_by_its_url(uploaded):
    url, cache, fs = uploaded
    raw = json.loads((cache / "manifest.json").read_text())
    raw["epoch_list"][0]["shards"][0]["samples"] += 1
    fs.pipe_file(f"{url.removeprefix('s3://')}/manifest.json", json.dumps(raw).encode())
    result = run_cli("verify", url, expect=1)
    assert_one_line_error(result, f"{url}/manifest.json")
    assert "cachegen-" not in result.output  # not the temporary folder it was downloaded to


# --- --overwrite of a cache at a URL ---------------------------------------------------------------

def _listed(m: dict) -> set[str]:
    """The objects a manifest lists: its shards and their indexes."""
    shards = [s["path"] for e in m["epoch_list"] for s in e["shards"]] + [s["path"] for s in m.get("source_shards", [])]
    return set(shards) | {p[:-len(".tar")] + ".idx" for p in shards}


def _objects(fs, url: str) -> dict[str, bytes]:
    base = url.removeprefix("s3://")
    return {key[len(base) + 1:]: fs.cat_file(key) for key in fs.find(base)}


def _built_at_a_url(tmp_path, epochs: int):
    """(url, the build's arguments but --epochs and --stage, an s3fs, the objects there) of a cache
    of `epochs` epochs built to a fresh URL."""
    from s3server import s3fs_filesystem

    source = make_npz(tmp_path / "data.npz", n=60, size=16)[0]
    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    common = [source, "--shard-size", "20", "--workers", "1", "--quiet", "--out", url]
    run_cli("build", *common, "--epochs", epochs, "--stage", tmp_path / "old")
    fs = s3fs_filesystem()
    return url, [*common, "--epochs", epochs], fs, _objects(fs, url)


def test_overwrite_at_a_url_never_writes_what_the_old_manifest_lists(s3_server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    url, common, fs, before = _built_at_a_url(tmp_path, epochs=2)
    old = json.loads(before["manifest.json"])

    # Killed after every new object is up, before the new manifest lands: the old cache reads as it was.
    new = [*common, "--seed", "1", "--overwrite", "--stage", tmp_path / "new"]
    done = subprocess.run([sys.executable, "-m", "cachegen", "build", *map(str, new)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CACHEGEN_FAULT_KILL": "upload:before-manifest"})
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    during = _objects(fs, url)
    assert {k: during[k] for k in before} == before  # not one object the old manifest lists was written
    assert len(during) > len(before)  # the new cache's objects, under their own keys
    assert "ok: 6 shards verified" in run_cli("verify", url).output
    assert json.loads(run_cli("info", url, "--json").output)["seed"] == 0

    # The same command again: the manifest lands, then what only the old one listed is deleted.
    run_cli("build", *new)
    after = _objects(fs, url)
    m = json.loads(after["manifest.json"])
    assert m["seed"] == 1 and set(after) == _listed(m) | {"manifest.json"}
    # Every key was the old cache's (same layout, other bytes): the new ones went under a generation.
    assert all(p.startswith("g-") for p in _listed(m)) and not _listed(m) & _listed(old)
    assert "ok: 6 shards verified" in run_cli("verify", url).output


def test_a_different_cache_at_the_url_is_not_replaced_without_overwrite(s3_server, tmp_path):
    url, common, fs, before = _built_at_a_url(tmp_path, epochs=1)
    result = run_cli("build", *common, "--seed", "1", "--stage", tmp_path / "new", expect=1)
    assert_one_line_error(result, f"{url} holds a different cache (differs in: seed)", "pass --overwrite")
    assert _objects(fs, url) == before


def test_a_cache_grown_at_its_url_keeps_the_objects_it_shares(s3_server, tmp_path):
    url, common, fs, before = _built_at_a_url(tmp_path, epochs=1)
    run_cli("build", *common[:-2], "--epochs", "2", "--stage", tmp_path / "grown")
    after = _objects(fs, url)
    m = json.loads(after["manifest.json"])
    assert m["epochs"] == 2 and set(after) == _listed(m) | {"manifest.json"}
    assert {k: after[k] for k in before if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # epoch 0: the same objects, kept where they were
    assert "ok: 6 shards verified" in run_cli("verify", url).output


def test_a_remote_manifest_bigger_than_any_manifest_is_not_downloaded(uploaded, tmp_path, monkeypatch):
    import readers.remote
    from readers import CachedLoader, ReaderError

    url, cache, _ = uploaded
    size = (cache / "manifest.json").stat().st_size
    monkeypatch.setattr(readers.remote, "MAX_MANIFEST_BYTES", size - 1)  # the cap, made smaller than this one
    with pytest.raises(ReaderError, match=rf"{url}/manifest.json is {size} bytes, more than any manifest"):
        CachedLoader(url, batch_size=8, local=tmp_path / "staged")
    assert not (tmp_path / "staged").exists() or not any((tmp_path / "staged").rglob("manifest.json"))
