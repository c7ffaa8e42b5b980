"""--source-factory FILE.py:make: the user's own map-style Dataset, run at build time only."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from cachegen.sources.factory import FactorySource
from tests.cachegen import sourcecheck as check
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli

# A Dataset of (image, label) made from a seed: PIL images, uint8 CHW tensors or HWC arrays; item BAD
# (where set) raises on every read; the environment is read when make() is called. No `targets`: cachegen reads each item's label.
DATASET = '''
import os
import numpy as np
import torch
from PIL import Image

SIDE, N = 12, 40


class Shapes(torch.utils.data.Dataset):
    classes = ["a", "b", "c"]

    def __init__(self, kind):
        rng = np.random.default_rng(int(os.environ.get("DATA_SEED", "0")))  # read here: the module is imported once
        self.bad = int(os.environ.get("BAD_ITEM", "-1"))
        self.pixels = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(N)]
        self.kind = kind

    def __len__(self):
        return N

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError("this item is broken")
        p = self.pixels[i]
        image = {"pil": Image.fromarray(p), "tensor": torch.from_numpy(p).permute(2, 0, 1), "array": p}[self.kind]
        return image, i % 3


def make():
    return Shapes(os.environ.get("IMAGE_KIND", "pil"))


class Noisy(Shapes):
    def __getitem__(self, i):
        return Image.fromarray(np.random.randint(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)), i % 3


def random():
    return Noisy("pil")


def not_a_dataset():
    return 42


class Floats(Shapes):
    def __getitem__(self, i):
        return torch.rand(3, SIDE, SIDE), i % 3


def floats():
    return Floats("pil")
'''


@pytest.fixture
def factory(tmp_path, monkeypatch):
    path = tmp_path / "mydata.py"
    path.write_text(DATASET)
    for name in ("BAD_ITEM", "DATA_SEED", "IMAGE_KIND"):
        monkeypatch.delenv(name, raising=False)
    return f"{path}:make"


def build(spec: str, out: Path, *args: str, workers: int = 1, expect: int = 0):
    return run_cli("build", "--source-factory", spec, "--out", out, "--epochs", "2", "--transform", "cifar",
                   "--shard-size", "16", "--workers", workers, "--quiet", *args, expect=expect)


@pytest.mark.parametrize("kind", ["pil", "tensor", "array"])
def test_items_are_stored_as_they_are_with_the_datasets_classes(kind, factory, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGE_KIND", kind)
    pixels, _ = check.images()
    labels = [i % 3 for i in range(len(pixels))]
    out = tmp_path / "cache"
    build(factory, out, "--transform", "none")
    m = manifest(out)
    assert m["classes"] == ["a", "b", "c"] and m["source"]["kind"] == "factory"
    assert m["source_spec"] == {"spec": None, "split": "train", "source_factory": factory, "absolute": None}
    source = FactorySource(factory)
    assert source.labels.tolist() == labels
    assert all(np.array_equal(np.asarray(source.load(i)), pixels[i]) for i in range(len(pixels)))


def test_workers_one_and_two_write_the_same_bytes(factory, tmp_path):
    build(factory, tmp_path / "one", workers=1)
    build(factory, tmp_path / "two", workers=2)
    assert check.shard_bytes(tmp_path / "one") == check.shard_bytes(tmp_path / "two")


def test_a_dask_build_writes_a_local_builds_bytes(dask_cluster, factory, tmp_path):
    """Each Dask worker calls the factory itself (the source pickles as its spec)."""
    build(factory, tmp_path / "local", workers=2)
    run = check.dask_build(["--source-factory", factory, "--epochs", "2", "--transform", "cifar", "--shard-size",
                            "16", "--out", str(tmp_path / "dask")], dask_cluster.address)
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out
    assert check.tree(tmp_path / "dask") == check.tree(tmp_path / "local")


def test_the_source_pickles_as_its_spec_and_reopens(factory):
    source = FactorySource(factory)
    copy = pickle.loads(pickle.dumps(source))
    assert copy.dataset is None and len(pickle.dumps(source)) < 4096
    assert np.array_equal(np.asarray(copy.load(5)), np.asarray(source.load(5)))


def test_a_worker_refuses_a_factory_edited_since_the_build_began(factory):
    copy = pickle.loads(pickle.dumps(FactorySource(factory)))
    path = Path(factory.rpartition(":")[0])
    path.write_text(path.read_text() + "\n# edited\n")
    with pytest.raises(Exception, match="its source file changed since the build began"):
        copy.load(0)


def test_other_items_refuse_a_resume(factory, tmp_path, monkeypatch):
    """Same factory file, same length: the items' pixels are part of the identity."""
    check.changed_source_refuses_resume(tmp_path, None, lambda: monkeypatch.setenv("DATA_SEED", "1"),
                                        build=lambda out, *a, expect=0: build(factory, out, *a, expect=expect))


def test_an_edited_factory_refuses_a_resume(factory, tmp_path):
    path = Path(factory.rpartition(":")[0])
    check.changed_source_refuses_resume(tmp_path, None, lambda: path.write_text(path.read_text() + "\n# edited\n"),
                                        build=lambda out, *a, expect=0: build(factory, out, *a, expect=expect))


def test_an_unreadable_item_is_skipped_on_request(factory, tmp_path, monkeypatch):
    monkeypatch.setenv("BAD_ITEM", "7")
    check.bad_item_skipped(tmp_path, None, 7, 40, build=lambda out, *a, expect=0: build(factory, out, *a,
                                                                                        expect=expect))


def test_reading_the_cache_never_runs_the_factory(factory, tmp_path):
    out = tmp_path / "cache"
    build(factory, out)
    Path(factory.rpartition(":")[0]).write_text("raise SystemExit('the factory ran')\n")
    run_cli("info", out)
    run_cli("preview", out, "--out", tmp_path / "p.png")  # no originals column source: drawn without it
    assert_one_line_error(run_cli("bench", out, "--images", "10", expect=1), "runs no code")


@pytest.mark.parametrize("args, fragment", [
    (["data.npz", "--source-factory", "{factory}"], "drop SOURCE"),
    (["--source-factory", "{factory}", "--image-column", "x"], "--image-column does not apply"),
    (["--source-factory", "{factory}", "--split", "test"], "--split does not apply"),
    (["--source-factory", "{where}:not_a_dataset"], "not a map-style Dataset"),
    (["--source-factory", "{where}:random"], "differs each time it is read"),
    (["--source-factory", "{where}:missing"], "has no callable 'missing'"),
    (["--source-factory", "{where}:floats"], "item 0: TypeError: the image is a ndarray float32: give a PIL image"),
    (["--source-factory", "nofile"], "bad --source-factory"),
])
def test_bad_factories_are_refused_in_one_line(args, fragment, factory, tmp_path):
    where = factory.rpartition(":")[0]
    args = [a.format(factory=factory, where=where) for a in args]
    assert_one_line_error(run_cli("build", *args, "--out", tmp_path / "out", "--quiet", expect=1), fragment)


def test_a_torchvision_dataset_gives_its_targets_and_classes(tmp_path):
    """torchvision's ImageFolder as the factory's Dataset: labels from its `targets` (no pass over the
    items), class names from its `classes`."""
    pixels, labels = check.images(n=9)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        (tmp_path / "tree" / f"class{label}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / f"class{label}" / f"{i}.png").write_bytes(check.png(image))
    (tmp_path / "tv.py").write_text("import torchvision\n\n"
                                    f"def make():\n    return torchvision.datasets.ImageFolder({str(tmp_path / 'tree')!r})\n")
    source = FactorySource(f"{tmp_path / 'tv.py'}:make")
    assert source.classes == ("class0", "class1", "class2")
    assert source.labels.tolist() == source.dataset.targets == sorted(labels)
    out = tmp_path / "cache"
    build(f"{tmp_path / 'tv.py'}:make", out, "--transform", "none")
    assert sorted(manifest(out)["epoch_list"][0]["shards"][0]["labels"]) == sorted(labels)
