"""What a build infers from its source, and the options that override it: --size, --channels,
--format against the channel count, `module:factory` / `file.py:factory`, --mode auto's estimate,
and bench's --device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli
from tests.conftest import make_npz


def folder(root: Path, side: int, modes=("RGB",), n: int = 12) -> Path:
    """An ImageFolder of n side x side PNGs in two classes, image k in modes[k % len(modes)]."""
    rng = np.random.default_rng(side)
    for k in range(n):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        image.convert(modes[k % len(modes)]).save(root / f"c{k % 2}" / f"{k:02d}.png")
    return root


def built(source, out, *args) -> dict:
    run_cli("build", source, "--out", out, "--workers", "1", "--quiet", "--epochs", "1", *args)
    return manifest(out)


def test_the_readme_example_a_folder_of_32px_pngs_with_the_cifar_preset(tmp_path):
    m = built(folder(tmp_path / "my_imagefolder", 32), tmp_path / "cache", "--transform", "cifar")
    assert m["output_shape"] == [32, 32, 3] and m["transform"]["size"] == 32


def test_auto_on_a_folder_of_8px_images_keeps_8px_and_says_so(tmp_path):
    result = run_cli("build", folder(tmp_path / "tiny", 8), "--out", tmp_path / "cache", "--workers", "1",
                     "--epochs", "1")
    m = manifest(tmp_path / "cache")
    assert m["transform"]["spec"] == "cifar" and m["output_shape"] == [8, 8, 3]
    assert "8x8x3 images" in result.stdout.strip().splitlines()[-2]  # the summary; the last line says what next


@pytest.mark.parametrize("preset", ["cifar", "imagenet", "mnist", "val"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_preset_honours_size(tmp_path, preset, channels):
    source = make_npz(tmp_path / "data.npz", n=20, size=32, channels=0 if channels == 1 else 3)[0]
    m = built(source, tmp_path / "cache", "--transform", preset, "--size", "24")
    assert m["output_shape"] == [24, 24, channels]
    info = json.loads(run_cli("info", tmp_path / "cache", "--json").output)
    assert info["transform"]["size"] == 24 and info["output_shape"] == [24, 24, channels]


def test_a_cifar_size_larger_than_the_images_is_a_one_line_error(tmp_path):
    result = run_cli("build", folder(tmp_path / "f", 16), "--out", tmp_path / "cache", "--transform", "cifar",
                     "--size", "32", "--quiet", expect=1)
    assert_one_line_error(result, "--size 32 is larger than the images (16x16)", "--resize 32")


@pytest.mark.parametrize("modes, channels", [(("L",), 1), (("1",), 1), (("LA",), 1), (("RGB",), 3),
                                             (("RGBA",), 3), (("L", "RGB"), 3)])
def test_a_folder_keeps_its_channels(tmp_path, modes, channels):
    m = built(folder(tmp_path / "f", 16, modes), tmp_path / "cache", "--transform", "val")
    assert m["image"]["shape"] == [16, 16, channels]


def test_grayscale_pixels_are_kept_and_channels_can_be_forced(tmp_path):
    root = folder(tmp_path / "f", 16, ("L",))
    gray = built(root, tmp_path / "gray", "--transform", "val")
    rgb = built(root, tmp_path / "rgb", "--transform", "val", "--channels", "3")
    assert gray["image"]["shape"] == [16, 16, 1] and rgb["image"]["shape"] == [16, 16, 3]
    shard = gray["epoch_list"][0]["shards"][0]
    data = (tmp_path / "gray" / shard["path"]).read_bytes()
    stored = np.frombuffer(data, np.uint8, 256, shard["offsets"][0] + 128).reshape(16, 16)
    index = shard["indices"][0]
    assert np.array_equal(stored, np.asarray(Image.open(sorted(root.glob("c*/*.png"), key=lambda p: (
        p.parent.name, p.name))[index])))
    npz = make_npz(tmp_path / "rgb.npz", n=20, size=16)[0]
    assert built(npz, tmp_path / "forced", "--transform", "val", "--channels", "1")["image"]["shape"] == [16, 16, 1]
    assert_one_line_error(run_cli("build", npz, "--out", tmp_path / "x", "--channels", "2", expect=1),
                          "--channels must be 1 (grayscale) or 3 (RGB)")


@pytest.mark.parametrize("encoding", ["jpg", "png"])
def test_four_or_two_channels_with_jpg_or_png_is_a_one_line_error(tmp_path, monkeypatch, encoding):
    rgba = make_npz(tmp_path / "rgba.npz", n=20, size=16, channels=4)[0]
    result = run_cli("build", rgba, "--out", tmp_path / "a", "--format", encoding, "--quiet", expect=1)
    assert_one_line_error(result, f"--format {encoding} stores 1 or 3 channels, these images have 4 (RGBA)",
                          "--channels 3")
    assert not (tmp_path / "a").exists()
    assert built(rgba, tmp_path / "b", "--format", encoding, "--channels", "3")["output_shape"] == [16, 16, 3]
    assert built(rgba, tmp_path / "c")["output_shape"] == [16, 16, 4]  # npy stores them as they are
    (tmp_path / "two.py").write_text("def make(epoch, epochs):\n    return lambda image: image.convert('LA')\n")
    monkeypatch.chdir(tmp_path)
    result = run_cli("build", rgba, "--out", tmp_path / "d", "--format", encoding, "--transform", "two:make",
                     expect=1)
    assert_one_line_error(result, f"--format {encoding} stores 1 or 3 channels, these images have 2")


FACTORY = "import torchvision.transforms as T\n\ndef make(epoch, epochs):\n    return T.RandomCrop(24)\n"


def test_a_factory_module_in_the_current_folder(npz_source, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "myaug_here.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path / "work")  # not on sys.path: found as `python train.py` would find it
    assert built(npz_source[0], tmp_path / "cache", "--transform", "myaug_here:make")["output_shape"] == [24, 24, 3]


@pytest.mark.parametrize("spec", ["./aug.py:make", "sub/deeper_aug.py:make", "{abs}/sub/deeper_aug.py:make"])
def test_a_factory_in_a_file(npz_source, tmp_path, monkeypatch, spec):
    (tmp_path / "sub").mkdir()
    (tmp_path / "aug.py").write_text(FACTORY)
    (tmp_path / "sub" / "deeper_aug.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    spec = spec.format(abs=tmp_path)
    m = built(npz_source[0], tmp_path / "cache", "--transform", spec, "--epochs", "2", "--workers", "2")
    assert m["output_shape"] == [24, 24, 3] and m["transform"]["spec"] == spec


@pytest.mark.parametrize("spec, message", [
    ("./missing.py:make", "no file ./missing.py for --transform ./missing.py:make"),
    ("no_such_module_here:make", "cannot import module 'no_such_module_here'"),
    ("./aug.py:nope", "./aug.py has no callable 'nope'"),
    ("./broken.py:make", "cannot import ./broken.py for --transform ./broken.py:make: ZeroDivisionError"),
    ("imports_missing:make", "cannot import module 'imports_missing' for --transform imports_missing:make: "
                             "No module named 'not_installed_anywhere'"),
])
def test_factory_errors_are_one_line(npz_source, tmp_path, monkeypatch, spec, message):
    (tmp_path / "aug.py").write_text(FACTORY)
    (tmp_path / "broken.py").write_text("1 / 0\n")
    (tmp_path / "imports_missing.py").write_text("import not_installed_anywhere\n")
    monkeypatch.chdir(tmp_path)
    result = run_cli("build", npz_source[0], "--out", tmp_path / "cache", "--transform", spec, expect=1)
    assert_one_line_error(result, message)
    assert "Traceback" not in result.output and "importlib" not in result.output


def test_auto_mode_estimates_from_real_encoded_images(tmp_path):
    """Random 32x32 PNGs take ~3 KB each, an all-zero one ~0.1 KB: the estimate must use the former."""
    source = make_npz(tmp_path / "data.npz", n=240)[0]
    cached = built(source, tmp_path / "cached", "--format", "png", "--epochs", "2", "--mode", "cached")
    real = sum(s["bytes"] for e in cached["epoch_list"] for s in e["shards"])
    limit = real * 0.8 / 1e9  # just under what the cache really takes
    result = run_cli("build", source, "--out", tmp_path / "auto", "--format", "png", "--epochs", "2", "--workers",
                     "1", "--max-cache-gb", f"{limit:.9f}")
    assert manifest(tmp_path / "auto")["mode"] == "live", result.output
    estimate = float(result.output.split("would take ~")[1].split(" GB")[0])
    assert 0.7 * real / 1e9 <= estimate <= 1.3 * real / 1e9


@pytest.mark.parametrize("device, message", [
    ("cpux", "unknown --device 'cpux': use cpu or cuda"),
    ("meta", "--device meta: use cpu or cuda"),
    pytest.param("cuda", "torch sees no CUDA GPU here; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    ("cuda:99", "--device cuda:99"),
])
def test_bench_with_a_bad_device_is_a_one_line_error(tmp_path, device, message):
    assert_one_line_error(run_cli("bench", "--device", device, expect=1), message)
