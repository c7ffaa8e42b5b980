"""Builds with segmentation masks: each sample's mask stored beside its image (`<key>.mask.npy`),
moved with it by the transform, byte-identical for any worker count; a bad mask is a one-line
error naming it, or skipped in every epoch."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cacheformat import FormatError
from cacheformat.manifest import read_manifest
from cachegen.sources.sample import CLASSES, MASK_CLASSES, open_sample
from tests.cachegen.conftest import assert_one_line_error, run_cli, shard_bytes
from tests.conftest import make_seg_npz

# Geometric moves without resampling (a padded crop, a flip): an image whose first channel is
# 20 * its mask must stay so, pixel for pixel, when the mask moves with it.
GEOMETRIC = '''
from torchvision import tv_tensors
from torchvision.transforms import v2


def make(epoch, epochs):
    return v2.Compose([v2.RandomCrop(16, padding=4), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])


def jitter(epoch, epochs):
    return v2.ColorJitter(brightness=0.5, contrast=0.5)


def fills(epoch, epochs):
    return v2.RandomCrop(16, padding=8, fill={"others": 0, tv_tensors.Mask: 9})


def one(epoch, epochs):
    return lambda image: image
'''


def read_cache(root: Path, epoch: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Source index -> (image HWC, mask HW) of every sample of a cached epoch, read with tarfile."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for shard in sorted((root / f"epoch-{epoch:04d}").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext in ("npy", "mask.npy"):
                    array = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                    out.setdefault(int(key.rpartition("_")[2]), {})[ext] = array
    return {k: (v["npy"], v["mask.npy"]) for k, v in out.items()}


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "segaug.py"
    path.write_text(GEOMETRIC)
    return lambda name: f"{path}:{name}"


def build(source, out, *args, expect=0):
    return run_cli("build", source, "--out", out, "--shard-size", "16", "--workers", "1", "--quiet", *args,
                   expect=expect)


def test_stored_masks_are_the_source_masks_under_none(tmp_path):
    path, images, masks = make_seg_npz(tmp_path / "seg.npz")
    build(path, tmp_path / "c", "--transform", "none")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["mask"]["classes"] == ["0", "1", "2", "3", "4"] and m["mask"]["dtype"] == "uint8"
    assert m["mask"]["shape"] == [16, 16] and m["mask"]["member"] == "mask.npy"
    got = read_cache(tmp_path / "c")
    assert sorted(got) == list(range(len(images)))
    for i, (image, mask) in got.items():
        assert mask.dtype == np.uint8 and np.array_equal(mask, masks[i]) and np.array_equal(image, images[i])
    assert read_manifest(tmp_path / "c").mask.classes == ("0", "1", "2", "3", "4")
    run_cli("verify", tmp_path / "c")
    info = run_cli("info", tmp_path / "c").output
    assert "5-class masks" in info and "mask.npy uint8 16x16" in info


def test_geometric_transforms_move_the_mask_with_its_image(tmp_path, factories):
    path, _, _ = make_seg_npz(tmp_path / "seg.npz")
    build(path, tmp_path / "c", "--transform", factories("make"), "--epochs", "2")
    for epoch in (0, 1):
        got = read_cache(tmp_path / "c", epoch)
        moved = 0
        for i, (image, mask) in got.items():
            assert image.shape == (16, 16, 3) and mask.shape == (16, 16)
            assert np.array_equal(image[..., 0], mask.astype(np.uint8) * 20), i  # aligned pixel for pixel
            moved += not np.array_equal(mask, make_seg_npz(tmp_path / "again.npz")[2][i])
        assert moved > len(got) // 2  # the transform did move most samples


def test_photometric_transforms_leave_the_mask(tmp_path, factories):
    path, images, masks = make_seg_npz(tmp_path / "seg.npz")
    build(path, tmp_path / "c", "--transform", factories("jitter"))
    got = read_cache(tmp_path / "c")
    assert all(np.array_equal(mask, masks[i]) for i, (_, mask) in got.items())
    assert sum(not np.array_equal(image, images[i]) for i, (image, _) in got.items()) > len(got) // 2


def test_seg_preset_keeps_the_mask_on_the_shapes():
    """The sample's masks mark its shapes: where the mask is set, the colour is the shape's, far
    from the background's on every channel."""
    source = open_sample("test", masks=True)
    assert source.mask_classes == MASK_CLASSES and MASK_CLASSES[1:] == CLASSES
    for i in range(50):
        mask, image = source.load_mask(i), source.images[i].astype(float)
        assert set(np.unique(mask)) == {0, int(source.labels[i]) + 1}
        assert np.abs(image[mask > 0].mean(0) - image[mask == 0].mean(0)).min() > 40


def test_same_bytes_for_one_and_two_workers(tmp_path):
    path, _, _ = make_seg_npz(tmp_path / "seg.npz", n=64, size=24)
    build(path, tmp_path / "one", "--transform", "seg", "--epochs", "2", "--size", "16")
    build(path, tmp_path / "two", "--transform", "seg", "--epochs", "2", "--size", "16", "--workers", "2")
    one, two = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert one == two and len(one) == 16


def test_many_classes_store_uint16(tmp_path):
    names = [f"c{k}" for k in range(300)]
    path, _, masks = make_seg_npz(tmp_path / "seg.npz", n=8, mask_classes=names)
    np.savez(path, **{**dict(np.load(path)), "masks": masks.astype(np.uint16) * 70})  # up to 280
    build(path, tmp_path / "c", "--transform", "none")
    got = read_cache(tmp_path / "c")
    assert got[3][1].dtype == np.uint16 and np.array_equal(got[3][1], masks[3].astype(np.uint16) * 70)
    run_cli("verify", tmp_path / "c")


def test_a_value_outside_the_classes_is_named_or_skipped_in_every_epoch(tmp_path, factories):
    path, images, masks = make_seg_npz(tmp_path / "seg.npz", mask_classes=["bg", "a", "b", "c", "d"])
    masks[7, 2, 3] = 9
    np.savez(path, images=images, labels=np.zeros(len(images), int), masks=masks,
             mask_classes=np.array(["bg", "a", "b", "c", "d"]))
    assert_one_line_error(build(path, tmp_path / "c", "--transform", "none", expect=1), "mask 7 of npz",
                          "outside the 5 mask classes", "--on-error skip")
    build(path, tmp_path / "s", "--transform", factories("make"), "--epochs", "3", "--on-error", "skip")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["skipped"] == [7]
    assert all(7 not in read_cache(tmp_path / "s", e) and len(read_cache(tmp_path / "s", e)) == 39 for e in range(3))


def test_a_transform_filling_masks_outside_the_classes_is_refused(tmp_path, factories):
    path, _, _ = make_seg_npz(tmp_path / "seg.npz")
    assert_one_line_error(build(path, tmp_path / "c", "--transform", factories("fills"), expect=1),
                          "not a class")


def test_a_transform_of_the_image_alone_is_refused(tmp_path, factories):
    path, _, _ = make_seg_npz(tmp_path / "seg.npz")
    assert_one_line_error(build(path, tmp_path / "c", "--transform", factories("one"), expect=1), "transform(image, mask)")


def _folder(tmp_path: Path, n: int = 6) -> tuple[Path, Path, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    images, masks, kept = tmp_path / "images", tmp_path / "masks", []
    for i in range(n):
        sub = "a" if i % 2 else "b/c"
        (images / sub).mkdir(parents=True, exist_ok=True)
        (masks / sub).mkdir(parents=True, exist_ok=True)
        mask = rng.integers(0, 3, (12, 10)).astype(np.uint8)
        image = np.repeat((mask * 60)[..., None], 3, axis=2)
        Image.fromarray(image).save(images / sub / f"img{i}.jpg" if i == 0 else images / sub / f"img{i}.png")
        Image.fromarray(mask).save(masks / sub / f"img{i}.png")
        kept.append(mask)
    return images, masks, kept


def test_folder_masks_at_the_same_relative_path(tmp_path):
    images, masks, kept = _folder(tmp_path)
    build(images, tmp_path / "c", "--masks", masks, "--mask-classes", "bg,a,b", "--transform", "none")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["mask"]["classes"] == ["bg", "a", "b"] and m["source_spec"]["masks"] == str(masks)
    got = read_cache(tmp_path / "c")
    paths = sorted(str(p.relative_to(images)) for p in images.rglob("img*"))  # the source's order
    for i, rel in enumerate(paths):
        assert np.array_equal(got[i][1], kept[int(Path(rel).stem[3:])])


@pytest.mark.parametrize("damage, named", [
    ("missing", "no mask"), ("size", "12x10, its image 10x12"), ("value", "outside the 3 mask classes"),
    ("rgb", "is a RGB image"),
])
def test_a_bad_folder_mask_is_named_or_skipped(tmp_path, damage, named):
    images, masks, _ = _folder(tmp_path)
    bad = masks / "a" / "img3.png"
    if damage == "missing":
        bad.unlink()
    elif damage == "size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad)
    elif damage == "value":
        Image.fromarray(np.full((12, 10), 7, np.uint8)).save(bad)
    else:
        Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(bad)
    result = build(images, tmp_path / "c", "--masks", masks, "--mask-classes", "3", "--transform", "none", expect=1)
    assert_one_line_error(result, str(bad), named)
    build(images, tmp_path / "s", "--masks", masks, "--mask-classes", "3", "--on-error", "skip", "--transform", "none")
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["skipped"] == [1]  # a/img3 is second


@pytest.mark.parametrize("args, named", [
    (("--sample-masks", "--teacher", "t.py:make"), "one kind of target"),
    (("--sample-masks", "--transform", "cifar"), "seg, seg-val, none"),
    (("--sample-masks", "--augment-on", "device"), "--augment-on cpu"),
    (("--mask-classes", "3"), "pass --masks too"),
    (("--sample-masks", "--masks", "m"), "pass one"),
])
def test_options_a_build_with_masks_refuses(tmp_path, args, named):
    assert_one_line_error(run_cli("build", "--out", tmp_path / "c", *args, expect=1), named)


def test_masks_options_for_the_wrong_source(tmp_path):
    path, _, _ = make_seg_npz(tmp_path / "seg.npz")
    assert_one_line_error(build(path, tmp_path / "c", "--sample-masks", expect=1), "for the built-in sample")
    assert_one_line_error(build(path, tmp_path / "c", "--masks", tmp_path, "--mask-classes", "3", expect=1),
                          "for a folder of images")
    assert_one_line_error(build(path, tmp_path / "c", "--transform", "imagenet", expect=1), "seg, seg-val, none")


def test_a_mask_block_that_disagrees_is_refused(tmp_path):
    path, _, _ = make_seg_npz(tmp_path / "seg.npz")
    build(path, tmp_path / "c", "--transform", "none")
    raw = json.loads((tmp_path / "c" / "manifest.json").read_text())
    for edit, named in ((lambda m: m["mask"].update(dtype="uint16"), "smallest"),
                        (lambda m: m["mask"].update(shape=[8, 8]), "stored images"),
                        (lambda m: m["mask"].update(classes=[]), "mask classes")):
        m = json.loads(json.dumps(raw))
        edit(m)
        (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(FormatError, match=named):
            read_manifest(tmp_path / "c")


def test_a_live_cache_stores_the_source_masks(tmp_path):
    path, images, masks = make_seg_npz(tmp_path / "seg.npz")
    build(path, tmp_path / "c", "--mode", "live", "--transform", "seg")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["mode"] == "live" and m["transform"]["augment_on"] == "cpu" and m["mask"]["shape"] == [16, 16]
    stored = {}
    for shard in sorted((tmp_path / "c" / "source").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mask.npy"):
                    stored[int(member.name[4:12])] = np.load(io.BytesIO(tar.extractfile(member).read()))
    assert sorted(stored) == list(range(len(masks))) and all(np.array_equal(stored[i], masks[i]) for i in stored)
    run_cli("verify", tmp_path / "c")


def test_overlay_draws_each_class_over_the_image():
    from cachegen.preview import PALETTE, overlay

    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 2], [0, 0, 13]])
    out = overlay(image, mask)
    assert (out[mask == 0] == 100).all()
    assert tuple(out[0, 1]) == tuple((100 + PALETTE[0]) // 2) and tuple(out[0, 2]) == tuple((100 + PALETTE[1]) // 2)
    assert tuple(out[1, 2]) == tuple((100 + PALETTE[0]) // 2)  # 13 wraps around the palette
    assert overlay(image[:, :, :1], mask).shape == (2, 3, 3)


@pytest.mark.parametrize("mode", ["cached", "live"])
def test_preview_draws_masks(tmp_path, mode):
    path, _, _ = make_seg_npz(tmp_path / "seg.npz")
    build(path, tmp_path / "c", "--mode", mode, "--transform", "seg", "--epochs", "2")
    out = tmp_path / "p.png"
    assert "3 columns" in run_cli("preview", tmp_path / "c", "--out", out, "--samples", "3", "--epochs", "2").output
    assert np.asarray(Image.open(out)).shape[2] == 3  # masks drawn in colour (overlay, above)


def test_bench_points_a_cache_with_masks_to_bench_seg(tmp_path):
    path, _, _ = make_seg_npz(tmp_path / "seg.npz")
    build(path, tmp_path / "c", "--transform", "none")
    assert_one_line_error(run_cli("bench", tmp_path / "c", expect=1), "holds masks", "scripts/bench_seg.py")


def test_a_resumed_build_indexes_a_finished_shard_with_masks_again(tmp_path):
    """A shard whose index file is gone is indexed from the shard itself (its mask members
    checked), and the cache ends as it was; one whose mask member is damaged is written again."""
    path, _, _ = make_seg_npz(tmp_path / "seg.npz")
    build(path, tmp_path / "c", "--transform", "seg", "--epochs", "2")
    before = shard_bytes(tmp_path / "c")
    manifest = (tmp_path / "c" / "manifest.json").read_bytes()
    (tmp_path / "c" / "epoch-0001" / "shard-000001.idx").unlink()  # the same build indexes the shard again
    build(path, tmp_path / "c", "--transform", "seg", "--epochs", "2")
    assert shard_bytes(tmp_path / "c") == before and (tmp_path / "c" / "manifest.json").read_bytes() == manifest
    shard = tmp_path / "c" / "epoch-0000" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b".mask.npy")
    data[at - at % 512 + 512 + 1] ^= 0xFF  # the member's npy header
    shard.write_bytes(bytes(data))
    shard.with_suffix(".idx").unlink()
    build(path, tmp_path / "c", "--transform", "seg", "--epochs", "2")  # the same build rewrites the damaged shard
    assert shard_bytes(tmp_path / "c") == before and (tmp_path / "c" / "manifest.json").read_bytes() == manifest


def test_resize_takes_the_mask_nearest_neighbour(tmp_path):
    import torch
    from torchvision.transforms.v2 import functional as F

    path, _, masks = make_seg_npz(tmp_path / "seg.npz", n=6, size=24)
    build(path, tmp_path / "c", "--transform", "none", "--resize", "10")
    for i, (image, mask) in read_cache(tmp_path / "c").items():
        want = F.center_crop(F.resize(torch.from_numpy(masks[i])[None], [10], F.InterpolationMode.NEAREST), [10])[0]
        assert image.shape == (10, 10, 3) and np.array_equal(mask, want.numpy())


def test_a_live_cache_augmented_on_the_device_with_masks(tmp_path):
    """--mode live --augment-on device: recorded, read in batches with Kornia by default, previewed so."""
    import torch

    from readers import open_loader

    path, _, _ = make_seg_npz(tmp_path / "seg.npz", n=32, size=24)
    build(path, tmp_path / "c", "--mode", "live", "--augment-on", "device", "--transform", "seg", "--size", "16")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["transform"]["augment_on"] == "device" and m["mask"]["shape"] == [24, 24]
    loader = open_loader(tmp_path / "c", batch_size=16, targets="mask", device="cpu", normalize=False)
    assert loader.augment_on == "device"
    for images, masks in loader:
        assert images.shape == (16, 3, 16, 16) and masks.shape == (16, 16, 16) and masks.dtype == torch.int64
    assert "3 columns" in run_cli("preview", tmp_path / "c", "--out", tmp_path / "p.png", "--samples", "2",
                                  "--epochs", "2").output
