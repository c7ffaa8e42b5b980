"""Hugging Face datasets as a source: save_to_disk folders and parquet files, generated here (nothing downloaded)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from tqdm import tqdm

from cachegen.sources import open_source
from cachegen.sources.hf import EXTRA
from tests.cachegen import sourcecheck as check
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli

datasets = pytest.importorskip("datasets")
# save_to_disk's progress bar starts tqdm's monitor thread, which would outlive the test: none, and no bars.
tqdm.monitor_interval = 0
datasets.disable_progress_bars()
NAMES = ["cat", "dog", "fish"]


def dataset(pixels, labels, *, bad: int | None = None, image: str = "image", label: str = "label",
            typed: bool = True):
    """A datasets.Dataset of PNG images (datasets.Image) and ClassLabel labels; row `bad` a broken PNG."""
    cells = [{"bytes": b"\x89PNG broken" if i == bad else check.png(p), "path": None} for i, p in enumerate(pixels)]
    features = datasets.Features({image: datasets.Image() if typed else {"bytes": datasets.Value("binary"),
                                                                         "path": datasets.Value("string")},
                                  label: datasets.ClassLabel(names=NAMES) if typed else datasets.Value("int64")})
    return datasets.Dataset.from_dict({image: cells, label: labels}, features=features)


def saved(folder: Path, pixels, labels, **how) -> str:
    dataset(pixels, labels, **how).save_to_disk(str(folder))
    return str(folder)


def parquet(folder: Path, pixels, labels, *, parts: int = 2, split: str = "train", **how) -> str:
    """The hub's layout: folder/data/<split>-0000k-of-0000n.parquet, row groups of 7 rows."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    data = dataset(pixels, labels, **how)
    step = -(-len(data) // parts)
    for k in range(parts):
        data.select(range(k * step, min(len(data), (k + 1) * step))).to_parquet(
            str(folder / "data" / f"{split}-{k:05d}-of-{parts:05d}.parquet"), batch_size=7)
    return str(folder)


@pytest.fixture(params=["saved", "parquet"])
def hub(request, tmp_path):
    pixels, labels = check.images()
    make = saved if request.param == "saved" else parquet
    return make(tmp_path / request.param, pixels, labels), pixels, labels


def test_rows_are_stored_as_they_are_with_the_classlabel_names(hub, tmp_path):
    spec, pixels, labels = hub
    check.stored(tmp_path / "cache", pixels, labels, spec=spec)
    assert manifest(tmp_path / "cache")["classes"] == NAMES


def test_a_datasetdict_and_hub_splits_are_picked_with_split(tmp_path):
    pixels, labels = check.images(n=12)
    datasets.DatasetDict({"train": dataset(pixels[:8], labels[:8]), "test": dataset(pixels[8:], labels[8:])}) \
        .save_to_disk(str(tmp_path / "dd"))
    test = open_source(str(tmp_path / "dd"), split="test")
    assert len(test) == 4 and np.array_equal(np.asarray(test.load(1)), pixels[9])
    parquet(tmp_path / "hub", pixels[:8], labels[:8], split="train")
    parquet(tmp_path / "hub", pixels[8:], labels[8:], split="test", parts=1)
    assert len(open_source(str(tmp_path / "hub"))) == 8
    assert open_source(str(tmp_path / "hub"), split="test").labels.tolist() == labels[8:]
    one = str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    assert len(open_source(one, split="test")) == 4
    assert len(open_source(str(tmp_path / "hub" / "data" / "train-*.parquet"))) == 8


def test_a_validation_split_is_built_by_its_name(tmp_path):
    """--split takes a DatasetDict's split by name (validation, not only train and test); the sample
    and torchvision's sets, which have train and test only, refuse another in one line."""
    pixels, labels = check.images(n=12)
    datasets.DatasetDict({"train": dataset(pixels[:8], labels[:8]), "validation": dataset(pixels[8:], labels[8:])}) \
        .save_to_disk(str(tmp_path / "dd"))
    run_cli("build", tmp_path / "dd", "--split", "validation", "--epochs", "1", "--out", tmp_path / "val", "--quiet")
    m = manifest(tmp_path / "val")
    assert m["source_spec"]["split"] == "validation" and m["source"]["num_samples"] == 4
    result = run_cli("build", "--split", "validation", "--out", tmp_path / "s", "--quiet", expect=1)
    assert_one_line_error(result, "--split validation", "train or test")


def test_columns_without_features_are_found_by_name_or_named(tmp_path):
    pixels, labels = check.images(n=6)
    spec = saved(tmp_path / "plain", pixels, labels, typed=False, image="picture", label="y")
    source = open_source(spec, label_column="y")
    assert source.image_column == "picture" and source.classes == ("0", "1", "2")
    assert np.array_equal(np.asarray(source.load(5)), pixels[5])
    assert_one_line_error(run_cli("build", spec, "--out", tmp_path / "out", "--quiet", expect=1),
                          "no label column found", "--label-column")


def test_the_source_pickles_without_its_tables(hub):
    spec, pixels, _ = hub
    source = open_source(spec)
    copy = pickle.loads(pickle.dumps(source))
    assert copy._rows is None and len(pickle.dumps(source)) < 8192
    assert np.array_equal(np.asarray(copy.load(33)), pixels[33])


def test_workers_one_and_two_write_the_same_bytes(hub, tmp_path):
    check.same_bytes_for_any_worker_count(tmp_path, hub[0])


def test_a_dask_build_writes_a_local_builds_bytes(dask_cluster, tmp_path):
    pixels, labels = check.images()
    check.same_bytes_on_dask(dask_cluster, tmp_path, parquet(tmp_path / "hub", pixels, labels))


def test_changed_rows_refuse_a_resume(hub, tmp_path):
    spec, pixels, labels = hub
    pixels[2] = 255 - pixels[2]
    again = saved if Path(spec).name == "saved" else parquet

    def change():
        rewritten = again(tmp_path / "rewritten", pixels, labels)
        for old, new in zip(sorted(Path(spec).rglob("*.*")), sorted(Path(rewritten).rglob("*.*"))):
            old.write_bytes(new.read_bytes())

    check.changed_source_refuses_resume(tmp_path, spec, change)


def test_an_unreadable_image_is_skipped_on_request(tmp_path):
    pixels, labels = check.images()
    check.bad_item_skipped(tmp_path, parquet(tmp_path / "hub", pixels, labels, bad=9), 9, len(pixels))


def test_bad_options_are_refused_in_one_line(hub, tmp_path):
    spec = hub[0]
    result = run_cli("build", spec, "--split", "test", "--out", tmp_path / "out", "--quiet", expect=1)
    assert_one_line_error(result, "one dataset, not a DatasetDict" if spec.endswith("saved") else "no split 'test'")
    result = run_cli("build", spec, "--image-column", "nope", "--out", tmp_path / "out", "--quiet", expect=1)
    assert_one_line_error(result, "no column 'nope' (--image-column)")


def test_without_the_extra_the_source_is_refused_naming_it(hub, tmp_path, monkeypatch):
    """Where `datasets` cannot be imported (None in sys.modules: an ImportError): one line naming the hf extra."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    result = run_cli("build", hub[0], "--out", tmp_path / "out", "--quiet", expect=1)
    assert_one_line_error(result, EXTRA)


def test_a_relative_spec_is_read_from_any_folder(hub, tmp_path, monkeypatch):
    check.read_from_another_folder(monkeypatch, tmp_path, Path(hub[0]).name, 30, hub[1][30])


def test_an_image_cell_holding_a_path_is_read_from_it(tmp_path):
    """datasets.Image stores a path where the bytes were not embedded: the file is read."""
    pixels, labels = check.images(n=5)
    files = []
    for i, image in enumerate(pixels):
        files.append(str(tmp_path / f"{i}.png"))
        Path(files[-1]).write_bytes(check.png(image))
    data = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": f} for f in files], "label": labels},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.ClassLabel(names=NAMES)}))
    data.to_parquet(str(tmp_path / "paths.parquet"))
    source = open_source(str(tmp_path / "paths.parquet"))
    assert np.array_equal(np.asarray(source.load(3)), pixels[3])


def test_telling_an_imagefolder_from_a_hub_folder_lists_one_class_folder(tmp_path, monkeypatch):
    """An ImageFolder is not searched through for parquet files: the search ends at its first class folder."""
    from cachegen.sources import hf

    for k in range(5):
        (tmp_path / "tree" / f"c{k}").mkdir(parents=True)
        (tmp_path / "tree" / f"c{k}" / "0.png").write_bytes(b"")
    listed = []
    scandir = os.scandir
    monkeypatch.setattr(hf.os, "scandir", lambda p: listed.append(p) or scandir(p))
    assert not hf.is_hf(str(tmp_path / "tree")) and len(listed) == 2
    pixels, labels = check.images(n=4)
    parquet(tmp_path / "hub", pixels, labels, parts=1)
    (tmp_path / "hub" / "README.png").write_bytes(b"")  # a hub folder may hold pictures of its own
    assert hf.is_hf(str(tmp_path / "hub"))
