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
