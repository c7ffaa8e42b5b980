"""`cachegen verify`: recomputes checksums and counts, names every bad shard."""

from __future__ import annotations

from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli


def test_verify_passes_on_a_fresh_cache(build):
    out = build("--epochs", "2")
    assert run_cli("verify", out).output.strip() == "ok: 10 shards verified"


def test_verify_names_every_bad_shard(build):
    out = build("--epochs", "2")
    shards = [s["path"] for e in manifest(out)["epoch_list"] for s in e["shards"]]
    flipped, truncated, deleted = (out / shards[1], out / shards[4], out / shards[7])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    deleted.unlink()
    result = run_cli("verify", out, expect=1)
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 3
    assert f"{flipped}: sha256 mismatch" in result.output
    assert f"{truncated}: " in result.output and "truncated" in result.output
    assert f"{deleted}: missing" in result.output
    assert result.output.strip().splitlines()[-1] == "Error: 3 of 10 shards are bad; re-run the same " \
                                                     "`cachegen build` command: it checks every shard and writes the bad ones again"


def test_deleting_a_bad_shard_and_rebuilding_repairs_the_cache(build):
    out = build("--epochs", "1")
    shard = out / manifest(out)["epoch_list"][0]["shards"][2]["path"]
    good = shard.read_bytes()
    shard.write_bytes(good[:100])
    run_cli("verify", out, expect=1)
    shard.unlink()
    build("--epochs", "1", out=out)
    assert shard.read_bytes() == good and run_cli("verify", out).exit_code == 0


def test_hand_edited_manifest_is_reported(build):
    out = build("--epochs", "1")
    path = out / "manifest.json"
    path.write_text(path.read_text().replace('"samples":50', '"samples":51', 1))
    assert_one_line_error(run_cli("verify", out, expect=1), "damaged or was edited by hand")
