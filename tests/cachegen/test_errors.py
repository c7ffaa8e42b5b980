"""Bad input: a one-line error, a non-zero exit, no traceback, and nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli


def assert_no_cache(out):
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("**/*.tmp*")) if out.exists() else True


def build_result(source, out, *args):
    return run_cli("build", source, "--out", out, "--quiet", "--workers", "1", "--shard-size", "50", *args,
                   expect=1)


def test_missing_source(tmp_path):
    result = build_result(tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(result, "nope does not exist")
    assert_no_cache(tmp_path / "out")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(build_result(tmp_path / "empty", tmp_path / "out"), "no images in")


def test_file_that_is_not_a_npz(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    assert_one_line_error(build_result(tmp_path / "x.txt", tmp_path / "out"), "not a .npz")


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((0, 8, 8, 3), np.uint8), "labels": np.zeros(0, int)}, "holds no images"),
    ({"images": np.zeros((4, 8, 8, 3), np.float32), "labels": np.zeros(4, int)}, "must be uint8"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.zeros(3, int)}, "must be 4 integers"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.array([0, 1, -1, 2])}, "labels must lie in"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.array([0, 1, 5, 2]),
      "classes": np.array(["a", "b", "c"])}, "labels must lie in 0..2"),
    ({"pictures": np.zeros((4, 8, 8, 3), np.uint8)}, "has no array 'images'"),
])
def test_bad_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    result = build_result(tmp_path / "bad.npz", tmp_path / "out")
    assert_one_line_error(result, message)
    assert_no_cache(tmp_path / "out")


def _folder(tmp_path, n=12, bad=None):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    if bad is not None:
        (root / "class1" / "broken.jpg").write_bytes(bad)
    return root


@pytest.mark.parametrize("content", [b"", b"this is not a jpeg at all"])
def test_corrupt_image_fails_naming_the_file(tmp_path, content):
    root = _folder(tmp_path, bad=content)
    result = build_result(root, tmp_path / "out", "--transform", "val", "--size", "32")
    assert_one_line_error(result, "broken.jpg", "--on-error skip")
    assert_no_cache(tmp_path / "out")


def test_corrupt_image_skipped_on_request(tmp_path):
    root = _folder(tmp_path, bad=b"garbage")
    result = run_cli("build", root, "--out", tmp_path / "out", "--workers", "1", "--size", "32",
                     "--transform", "imagenet", "--epochs", "2", "--on-error", "skip")
    assert "skipped 1 unreadable sample" in result.output
    m = manifest(tmp_path / "out")
    assert len(m["skipped"]) == 1 and all(e["samples"] == 12 for e in m["epoch_list"])
    assert m["source"]["num_samples"] == 13 and m["image"]["shape"] == [32, 32, 3]


def test_skipped_files_are_named_and_all_listed_beside_the_manifest(tmp_path):
    root = _folder(tmp_path, n=12)
    broken = sorted(root / "class2" / f"broken{k:02d}.jpg" for k in range(23))
    for path in broken:
        path.write_bytes(b"not an image")
    result = run_cli("build", root, "--out", tmp_path / "out", "--workers", "1", "--size", "32",
                     "--transform", "val", "--on-error", "skip")
    out = (tmp_path / "out").resolve()
    assert f"skipped 23 unreadable sample(s) (--on-error skip), all listed in {out / 'skipped.txt'}:" in result.output
    named = [line.strip() for line in result.output.splitlines() if line.startswith("  ")]
    assert named[:20] == [str(p) for p in broken[:20]] and named[20] == "... and 3 more"
    listed = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[1] for line in listed] == [str(p) for p in broken]
    assert [int(line.split("\t")[0]) for line in listed] == manifest(out)["skipped"]


def test_the_build_summary_names_the_folder_its_size_and_what_to_run_next(tmp_path):
    out = tmp_path / "cache"
    result = run_cli("build", _folder(tmp_path), "--out", out, "--workers", "1", "--size", "32", "--transform", "val")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    lines = result.stdout.strip().splitlines()  # the progress bar is on stderr
    assert lines[-2] == (f"cachegen: {out.resolve()}: 1 augmented epoch, 1 shard, 12 samples per epoch, "
                         f"32x32x3 images, {size / 1e6:.1f} MB")
    assert lines[-1] == f"next: `cachegen info {out}`, or read it with readers.CachedLoader('{out.resolve()}', batch_size=256)"


def test_folder_of_varied_sizes_needs_a_fixed_output_shape(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    Image.new("RGB", (60, 20)).save(root / "class0" / "wide.png")
    (tmp_path / "augs.py").write_text("import torchvision.transforms as T\n"
                                      "def flip(epoch, epochs):\n    return T.RandomHorizontalFlip()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = build_result(root, tmp_path / "out", "--transform", "augs:flip")
    assert_one_line_error(result, "transform output shape varies", "wide.png")
    assert_no_cache(tmp_path / "out")


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_factory", "has no callable 'no_such_factory'"),
    ("json:", "bad transform"),
    ("sharpen", "unknown --transform 'sharpen'"),
])
def test_bad_transform(npz_source, tmp_path, spec, message):
    result = build_result(npz_source[0], tmp_path / "out", "--transform", spec)
    assert_one_line_error(result, message)
    assert_no_cache(tmp_path / "out")


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--shard-size", "12 apples"], "bad --shard-size"),
    (["--shard-size", "0"], "bad --shard-size"),
    (["--workers", "-1"], "--workers must be"),
    (["--size", "0"], "--size must be positive"),
])
def test_bad_options(npz_source, tmp_path, args, message):
    assert_one_line_error(build_result(npz_source[0], tmp_path / "out", *args), message)
    assert_no_cache(tmp_path / "out")


def test_unwritable_output_folder(npz_source, tmp_path):
    (tmp_path / "a_file").write_text("x")
    result = build_result(npz_source[0], tmp_path / "a_file" / "cache")
    assert_one_line_error(result, "cannot write")


def test_output_folder_that_is_not_a_cache_is_left_alone(npz_source, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert_one_line_error(build_result(npz_source[0], out, "--overwrite"), "not empty and holds no cachegen cache")
    assert (out / "thesis.tex").read_text() == "precious"


def _mount_tmpfs(path, size):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    return path


@pytest.fixture
def small_disk(tmp_path):
    mount = _mount_tmpfs(tmp_path / "small", "400k")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_too_small_is_refused_before_anything_is_written(npz_source, small_disk, tmp_path):
    """The build's size, estimated from its probes, against the free space at --out: refused in one
    line before a shard is written (a disk that fills mid-write all the same is test_commit's
    fault-injected ENOSPC, resumable); the same command on a bigger disk builds it."""
    out = small_disk / "cache"
    result = build_result(npz_source[0], out, "--epochs", "2")
    assert_one_line_error(result, "this build needs ~", "GB free", "choose another --out")
    assert_no_cache(out)
    assert not any(out.glob("epoch-*/*.tar"))
    bigger = tmp_path / "bigger"
    run_cli("build", npz_source[0], "--out", bigger, "--quiet", "--workers", "1", "--shard-size", "50",
            "--epochs", "2")
    assert run_cli("verify", bigger).output.startswith("ok: 10 shards")


def test_read_only_output(npz_source, tmp_path):
    mount = _mount_tmpfs(tmp_path / "ro", "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        assert_one_line_error(build_result(npz_source[0], mount / "cache"), "cannot write")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_info_and_verify_on_a_folder_without_a_cache(tmp_path):
    assert_one_line_error(run_cli("info", tmp_path, expect=1), "manifest.json not found")
    assert_one_line_error(run_cli("verify", tmp_path, expect=1), "manifest.json not found")


def test_damaged_manifest(build):
    out = build("--epochs", "1")
    (out / "manifest.json").write_text('{"format": "cachegen", "format_version": 1, "epoch')
    assert_one_line_error(run_cli("info", out, expect=1), "manifest.json is unreadable or not JSON")


def test_cli_errors_have_no_traceback_as_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cachegen", "build", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
