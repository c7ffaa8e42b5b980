"""WebDataset shards as a source: .tar files of image + cls/json members, read in place; a cache too."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cachegen.sources import WebDatasetSource, open_source, webdataset
from tests.cachegen import sourcecheck as check
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli
from tests.conftest import make_npz


def add(tar: tarfile.TarFile, name: str, data: bytes, **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, pixels, labels, *, per_shard: int = 15, label_as: str = "cls",
                 bad: int | None = None) -> str:
    """Shards `folder/train-00000{0..k}.tar` of png + cls (or json) samples; sample `bad` an
    unreadable png. Returns the brace pattern that names them."""
    folder.mkdir(exist_ok=True)
    count = -(-len(pixels) // per_shard)
    for s in range(count):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * per_shard, min(len(pixels), (s + 1) * per_shard)):
                key = f"sample{i:05d}"
                add(tar, f"{key}.png", b"not a png at all" if i == bad else check.png(pixels[i]))
                label = str(labels[i]).encode() if label_as == "cls" else json.dumps({"label": labels[i]}).encode()
                add(tar, f"{key}.{label_as}", label)
    return str(folder / f"train-{{000000..{count - 1:06d}}}.tar")


@pytest.fixture
def shards(tmp_path):
    pixels, labels = check.images()
    return write_shards(tmp_path / "wds", pixels, labels), pixels, labels


def test_shards_are_stored_as_they_are_with_their_labels(shards, tmp_path):
    spec, pixels, labels = shards
    check.stored(tmp_path / "cache", pixels, labels, spec=spec)


@pytest.mark.parametrize("form", ["glob", "folder", "one file", "list"])
def test_every_way_of_naming_the_shards_finds_them(form, tmp_path):
    pixels, labels = check.images(n=20)
    write_shards(tmp_path / "wds", pixels, labels, per_shard=10)
    spec = {"glob": str(tmp_path / "wds" / "*.tar"), "folder": str(tmp_path / "wds"),
            "one file": str(tmp_path / "wds" / "train-000000.tar"),
            "list": [str(tmp_path / "wds" / f"train-00000{k}.tar") for k in (0, 1)]}[form]
    source = open_source(spec) if form != "list" else WebDatasetSource([Path(p) for p in spec], description="two")
    assert len(source) == (10 if form == "one file" else 20)
    assert source.labels.tolist() == labels[:len(source)]
    assert np.array_equal(np.asarray(source.load(len(source) - 1)), pixels[len(source) - 1])


def test_json_labels(tmp_path):
    pixels, labels = check.images(n=12)
    source = open_source(write_shards(tmp_path / "wds", pixels, labels, label_as="json"))
    assert source.labels.tolist() == labels and source.classes == ("0", "1", "2")


def test_workers_one_and_two_write_the_same_bytes(shards, tmp_path):
    check.same_bytes_for_any_worker_count(tmp_path, shards[0])


def test_a_dask_build_writes_a_local_builds_bytes(dask_cluster, shards, tmp_path):
    check.same_bytes_on_dask(dask_cluster, tmp_path, shards[0])


def test_a_changed_shard_refuses_a_resume(shards, tmp_path):
    spec, pixels, labels = shards
    pixels[3] = 255 - pixels[3]
    check.changed_source_refuses_resume(tmp_path, spec, lambda: write_shards(tmp_path / "wds", pixels, labels))


def test_an_unreadable_image_is_skipped_on_request(tmp_path):
    pixels, labels = check.images()
    spec = write_shards(tmp_path / "wds", pixels, labels, bad=5)
    check.bad_item_skipped(tmp_path, spec, 5, len(pixels))


def test_a_cache_is_a_source_to_augment_again(tmp_path):
    """A cache of the sample's crops, augmented again from its epoch 0: its images, labels and class names."""
    data = make_npz(tmp_path / "data.npz", n=48, size=16)[0]
    first = tmp_path / "first"
    run_cli("build", data, "--out", first, "--epochs", "1", "--transform", "cifar", "--size", "12",
            "--shard-size", "20", "--workers", "1", "--quiet")
    source = open_source(str(first))
    m = manifest(first)
    assert source.classes == tuple(m["classes"]) and len(source) == 48
    shard = m["epoch_list"][0]["shards"][0]
    raw = (first / shard["path"]).read_bytes()
    assert np.array_equal(np.asarray(source.load(0)), np.load(io.BytesIO(raw[shard["offsets"][0]:][:shard["sizes"][0]])))
    assert source.labels[:20].tolist() == shard["labels"]
    again = tmp_path / "again"
    check.build(str(first), again)
    assert manifest(again)["output_shape"] == [12, 12, 3]
    check.same_bytes_for_any_worker_count(tmp_path, str(first))


def test_a_live_cache_is_a_source_through_its_source_pass(tmp_path):
    data, images, labels = make_npz(tmp_path / "data.npz", n=30, size=12)
    live = tmp_path / "live"
    run_cli("build", data, "--out", live, "--mode", "live", "--shard-size", "8", "--workers", "1", "--quiet")
    source = open_source(str(live))
    assert "source pass" in source.description and len(source) == 30
    assert source.labels.tolist() == labels.tolist()  # the source pass is in index order
    assert np.array_equal(np.asarray(source.load(29)), images[29])


def test_the_source_pickles_without_its_open_files(shards):
    source = open_source(shards[0])
    source.load(0)
    assert source._files
    copy = pickle.loads(pickle.dumps(source))
    assert copy._files == {} and np.array_equal(np.asarray(copy.load(7)), shards[1][7])


def test_a_member_past_the_end_of_the_file_is_refused(tmp_path):
    pixels, labels = check.images(n=4)
    spec = write_shards(tmp_path / "wds", pixels, labels, per_shard=4)
    shard = tmp_path / "wds" / "train-000000.tar"
    data = shard.read_bytes()
    # Claim the last png is 1 GB: the header's size field says more than the file holds.
    last = data.rfind(b"sample00003.png")
    info = tarfile.TarInfo.frombuf(data[last:last + 512], "utf-8", "strict")
    info.size = 1 << 30
    shard.write_bytes(data[:last] + info.tobuf(tarfile.USTAR_FORMAT) + data[last + 512:last + 2048])
    result = run_cli("build", spec, "--out", tmp_path / "out", "--quiet", expect=1)
    assert_one_line_error(result, "runs past the end of the file")


def test_links_and_fifos_in_a_shard_are_not_followed(tmp_path):
    """A symlink or FIFO member named like an image is no sample: the samples are the regular members."""
    pixels, labels = check.images(n=2)
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.png", check.png(pixels[0]))
        add(tar, "a.cls", b"0")
        add(tar, "b.png", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "b.cls", b"1")
        add(tar, "c.png", b"", type=tarfile.FIFOTYPE)
        add(tar, "c.cls", b"1")
    with pytest.raises(Exception, match="b has no image member"):
        open_source(str(shard))


def test_a_fifo_in_place_of_a_shard_is_refused(tmp_path):
    pixels, labels = check.images(n=2)
    write_shards(tmp_path / "wds", pixels, labels)
    os.mkfifo(tmp_path / "wds" / "train-000001.tar")
    result = run_cli("build", str(tmp_path / "wds" / "train-{000000..000001}.tar"), "--out", tmp_path / "out",
                     "--quiet", expect=1)
    assert_one_line_error(result, "train-000001.tar", "not a regular file")


@pytest.mark.parametrize("problem, fragment", [
    ("no label", "has no label"), ("no image", "has no image member"), ("gzip", "not a plain (uncompressed) tar"),
    ("bad cls", "is not an integer label"), ("missing", "does not exist"),
])
def test_bad_shards_are_refused_in_one_line(problem, fragment, tmp_path):
    pixels, _ = check.images(n=2)
    shard = tmp_path / "bad.tar"
    if problem == "gzip":
        with tarfile.open(shard, "w:gz") as tar:
            add(tar, "a.png", check.png(pixels[0]))
    elif problem != "missing":
        with tarfile.open(shard, "w") as tar:
            if problem != "no image":
                add(tar, "a.png", check.png(pixels[0]))
            if problem != "no label":
                add(tar, "a.cls", b"x1" if problem == "bad cls" else b"1")
    spec = str(tmp_path / "bad-{0..1}.tar") if problem == "missing" else str(shard)
    assert_one_line_error(run_cli("build", spec, "--out", tmp_path / "out", "--quiet", expect=1), fragment)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_fast_header_walk_and_tarfiles_agree(fmt, tmp_path):
    """Long names (a ustar prefix, a GNU long-name header, a pax header) and a folder member: the
    headers read one by one (or left to tarfile, for the extension headers) give the same samples."""
    pixels, _ = check.images(n=3)
    shard = tmp_path / "mixed.tar"
    deep = "d" * 60 + "/" + "e" * 60 if fmt == tarfile.USTAR_FORMAT else "f" * 150
    with tarfile.open(shard, "w", format=fmt) as tar:
        add(tar, "plain/", b"", type=tarfile.DIRTYPE)
        for i, key in enumerate(["plain/a", f"{deep}/b", "c"]):
            add(tar, f"{key}.png", check.png(pixels[i]))
            add(tar, f"{key}.cls", str(i).encode())
    source = open_source(str(shard))
    assert source.labels.tolist() == [0, 1, 2]
    assert all(np.array_equal(np.asarray(source.load(i)), pixels[i]) for i in range(3))
    with open(shard, "rb") as f:
        by_tarfile = list(webdataset._samples(str(shard), f.fileno(), webdataset._tarfile_members(str(shard), f, 1 << 40)))
    assert by_tarfile == webdataset._walk(str(shard))
    with open(shard, "rb") as f:
        try:
            read_here = list(webdataset._samples(str(shard), f.fileno(),
                                                 webdataset._plain_members(str(shard), f.fileno(), 1 << 40)))
        except webdataset._NotPlain:  # an extension header: left to tarfile
            read_here = None
    assert read_here == (by_tarfile if fmt == tarfile.USTAR_FORMAT else None)


def test_a_relative_pattern_is_read_from_any_folder(shards, tmp_path, monkeypatch):
    check.read_from_another_folder(monkeypatch, tmp_path, "wds/train-{000000..000002}.tar", 20, shards[1][20])


def test_a_process_keeps_few_shards_open(tmp_path, monkeypatch):
    pixels, labels = check.images(n=12)
    source = open_source(write_shards(tmp_path / "wds", pixels, labels, per_shard=1))
    monkeypatch.setattr(webdataset, "OPEN_SHARDS", 3)
    for i in range(12):
        assert np.array_equal(np.asarray(source.load(i)), pixels[i])
        assert len(source._files) <= 3


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_reading_the_headers_shows_a_bar_unless_quiet(quiet, shards, monkeypatch):
    """Before the build's own bar: one while the headers are read, where that takes long (here: at once)."""
    from cachegen.sources import progress

    monkeypatch.setattr(progress, "DELAY_S", 0)
    monkeypatch.setattr("sys.stderr", Terminal())
    open_source(shards[0], quiet=quiet)
    shown = sys.stderr.getvalue()
    assert ("cachegen: reading shard headers" in shown) != quiet, shown
