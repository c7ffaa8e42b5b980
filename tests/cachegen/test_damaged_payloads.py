"""Damaged png and jpg payloads through `cachegen verify`, a resume that indexes the shard again,
and the readers: a flipped byte inside one image, with the checksums left (caught first, by
sha256) or rewritten so they pass (caught by the one decode path, cacheformat.payload). Each runs
in a real subprocess: never a crash (libpng's errors segfault torchvision), always one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_npz

SHARD = "epoch-0000/shard-000001.tar"
ARGS = ["--epochs", "1", "--shard-size", "20", "--workers", "1", "--transform", "cifar", "--quiet"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A png and a jpg cache of one small source, and that source."""
    tmp = tmp_path_factory.mktemp("payloads")
    source = make_npz(tmp / "data.npz", n=60, size=16)[0]
    for encoding in ("png", "jpg"):
        done = cli("build", source, "--out", tmp / encoding, "--format", encoding, *ARGS)
        assert done.returncode == 0, done.stdout
    return tmp, source


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachegen", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def payload(root: Path, sample: int) -> tuple[int, int]:
    """(offset, size) of `sample`'s image payload in SHARD, from its index file."""
    table = np.load(root / SHARD.replace(".tar", ".idx"))
    return int(table[sample, 0]), int(table[sample, 1])


def fix_png_crcs(data: bytearray, start: int, end: int) -> None:
    """Rewrite the CRC of every chunk of the PNG at data[start:end], so a flipped byte passes them."""
    pos = start + 8
    while pos + 12 <= end:
        length = int.from_bytes(data[pos:pos + 4], "big")
        data[pos + 8 + length:pos + 12 + length] = zlib.crc32(data[pos + 4:pos + 8 + length]).to_bytes(4, "big")
        pos += 12 + length


def damage(root: Path, encoding: str, where: str, checksums: str) -> None:
    """Flip one byte of sample 3's payload in SHARD: in the pixel data (`middle`) or a jpg's frame
    header (`frame`: its height); `checksums` "kept" leaves the manifest's sha256 (now wrong),
    "rewritten" records the new one (and a png's chunk CRCs)."""
    path = root / SHARD
    data = bytearray(path.read_bytes())
    offset, size = payload(root, 3)
    if where == "middle":
        data[offset + size // 2] ^= 0x10
    elif where == "bomb":  # SOF0: FF C0, length (2), precision (1), height (2), width (2): 20000x20000
        sof = offset + bytes(data[offset:offset + size]).index(b"\xff\xc0")
        data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2
    else:  # SOF0: FF C0, length (2), precision (1), height (2)
        sof = bytes(data[offset:offset + size]).index(b"\xff\xc0")
        data[offset + sof + 6] ^= 0x01
    if checksums == "rewritten":
        if encoding == "png":
            fix_png_crcs(data, offset, offset + size)
        m = json.loads((root / "manifest.json").read_text())
        entry = next(s for s in m["epoch_list"][0]["shards"] if s["path"] == SHARD)
        entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (root / "manifest.json").write_text(json.dumps(m, separators=(",", ":")))
    path.write_bytes(bytes(data))


CASES = [("png", "middle", "kept"), ("png", "middle", "rewritten"), ("jpg", "middle", "kept"),
         ("jpg", "frame", "rewritten")]


def copy_damaged(built, tmp_path, encoding, where, checksums) -> Path:
    root = tmp_path / encoding
    shutil.copytree(built[0] / encoding, root)
    damage(root, encoding, where, checksums)
    return root


def named(checksums: str, encoding: str) -> str:
    """What the line says: the checksum fails first, else the decode names the sample."""
    return "sha256 mismatch" if checksums == "kept" else "sample e0000_"


@pytest.mark.parametrize("encoding,where,checksums", CASES)
def test_verify_names_a_damaged_payload_in_one_line(built, tmp_path, encoding, where, checksums):
    root = copy_damaged(built, tmp_path, encoding, where, checksums)
    done = cli("verify", root)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, (done.returncode, done.stderr)  # not -11: no segfault
    assert len(lines) == 2 and lines[0].startswith(f"BAD {root / SHARD}"), done.stderr
    assert named(checksums, encoding) in lines[0] and lines[1].startswith("Error: 1 of 3 shards are bad")
    if checksums == "rewritten":
        assert f"does not decode as {encoding}" in lines[0]


@pytest.mark.parametrize("encoding,where,checksums", CASES)
def test_a_resume_that_finds_a_damaged_shard_writes_it_again(built, tmp_path, encoding, where, checksums):
    root = copy_damaged(built, tmp_path, encoding, where, checksums)
    (root / SHARD.replace(".tar", ".idx")).unlink()  # the resume must index the shard from its bytes
    done = cli("build", built[1], "--out", root, "--format", encoding, *[a for a in ARGS if a != "--quiet"])
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert f"1 shard(s) failed their check and are written again: {SHARD}" in done.stdout
    assert cli("verify", root).returncode == 0
    assert (root / SHARD).read_bytes() == (built[0] / encoding / SHARD).read_bytes()


@pytest.mark.parametrize("encoding,where", [("png", "middle"), ("jpg", "frame")])
def test_the_readers_name_a_damaged_payload_whose_checksums_pass(built, tmp_path, encoding, where):
    root = copy_damaged(built, tmp_path, encoding, where, "rewritten")
    code = ("import sys\nfrom readers import CachedLoader, ReaderError\n"
            f"try:\n    list(CachedLoader({str(root)!r}, batch_size=8, shuffle=False))\n"
            "except ReaderError as e:\n    print(e)\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, (done.returncode, done.stderr)  # the error, not a segfault
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and f"{root / SHARD}: sample 3 does not decode as {encoding}" in lines[0], lines


BOMB_RUNS = {  # how each side reads the cache: argv, and the exit code its one-line error gives
    "verify": (["-m", "cachegen", "verify"], 1),
    "preview": (["-m", "cachegen", "preview"], 1),
    "reader": (["-c", "import sys\nfrom readers import CachedLoader, ReaderError\ntry:\n    list(CachedLoader("
                "sys.argv[1], batch_size=8, shuffle=False))\nexcept ReaderError as e:\n    print(e, file=sys.stderr)\n"
                "    sys.exit(1)\n"], 1),
    # payloads decoded in batches (nvJPEG on CUDA; the same batched call on the CPU here): peak memory
    # printed, since a batched decode that failed would still be retried one by one and named
    "batched": (["-c", "import resource, sys\nfrom readers import CachedLoader, ReaderError\ntry:\n    list(CachedLoader("
                 "sys.argv[1], batch_size=8, shuffle=False, decode_on='device', device='cpu'))\n"
                 "except ReaderError as e:\n    print(e, file=sys.stderr)\n"
                 "    print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
                 "    sys.exit(1)\n"], 1),
}


@pytest.mark.parametrize("side", sorted(BOMB_RUNS))
def test_a_jpeg_whose_header_claims_a_huge_image_is_refused_before_decoding(built, tmp_path, side):
    """A payload whose frame header says 20000x20000 (libjpeg would allocate 1.2 GB for it, from a
    few hundred bytes), checksums rewritten: each side names its header against the manifest's shape."""
    root = copy_damaged(built, tmp_path, "jpg", "bomb", "rewritten")
    argv, code = BOMB_RUNS[side]
    extra = ["--out", str(tmp_path / "p.png"), "--samples", "30"] if side == "preview" else []  # reaches shard 1
    done = subprocess.run([sys.executable, *argv, str(root), *extra], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "its frame header says 20000x20000, the manifest 16x16" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    if side == "batched":  # refused before the decoder allocated the 1.2 GB the header asks for (2.1 GB peak)
        assert int(done.stderr.split("maxrss")[1]) < 1_600_000, done.stderr


def test_bench_decode_prints_each_ratio():
    script = Path(__file__).parents[2] / "scripts" / "bench_decode.py"
    done = subprocess.run([sys.executable, str(script), "--sizes", "8", "--seconds", "0.01", "--images", "24",
                           "--cache-size", "16", "--repeats", "1"], capture_output=True,
                          text=True, timeout=300, env={**os.environ,
                                                       "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ") and "with 1 thread," in lines[0]
    assert [line.split(":")[0] for line in lines[1:3]] == ["8x8 png", "8x8 jpg"] and all("ratio" in x for x in lines[1:3])
    # threads against processes on the same payloads, then the cache read with 1 and 2 decode threads
    kinds = [line.split()[:2] for line in lines if "x 1 thread " in line]
    assert kinds == [["1", "thread"], ["2", "threads"], ["2", "processes"]]
    pool = [line for line in lines if line.lstrip().startswith("decode_threads")]
    assert [line.split(":")[0].strip() for line in pool] == ["decode_threads 1", "decode_threads 2"]
    assert "1.00x 1 thread(s)" in pool[0] and "x 1 thread(s)" in pool[1] and "KB per sample on disk" in done.stdout
