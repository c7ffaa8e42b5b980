"""CSV / JSONL lists as a source: `path,label` rows, paths relative to the list, labels names or integers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cachegen.sources import open_source
from tests.cachegen import sourcecheck as check
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli

NAMES = ("benign", "malignant", "normal")


def write_list(root: Path, pixels, labels, *, kind: str = "csv", names: bool = True, bad: int | None = None,
               header: tuple[str, str] = ("path", "label")) -> Path:
    """Images under root/images/<k>.png and a list naming them (relative paths) with their labels."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label) in enumerate(zip(pixels, labels)):
        (root / "images" / f"{i}.png").write_bytes(b"\x89PNG broken" if i == bad else check.png(image))
        rows.append((f"images/{i}.png", NAMES[label] if names else label))
    path = root / f"train.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({header[0]: p, header[1]: lab}) + "\n" for p, lab in rows))
    else:
        path.write_text(f"{header[0]},{header[1]}\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


@pytest.fixture
def listed(tmp_path):
    pixels, labels = check.images()
    return str(write_list(tmp_path / "data", pixels, labels)), pixels, labels


def test_a_csv_of_names_is_stored_as_it_is_with_its_classes(listed, tmp_path):
    spec, pixels, labels = listed
    check.stored(tmp_path / "cache", pixels, labels, spec=spec)
    assert manifest(tmp_path / "cache")["classes"] == list(NAMES)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_integer_labels_and_named_columns(kind, tmp_path):
    pixels, labels = check.images(n=9)
    path = write_list(tmp_path / "d", pixels, labels, kind=kind, names=False, header=("file_id", "diagnosis"))
    source = open_source(str(path), image_column="file_id", label_column="diagnosis")
    assert source.labels.tolist() == labels and source.classes == ("0", "1", "2")
    assert np.array_equal(np.asarray(source.load(4)), pixels[4])
    result = run_cli("build", path, "--out", tmp_path / "out", "--quiet", expect=1)
    assert_one_line_error(result, "no image path column", "--image-column")


def test_workers_one_and_two_write_the_same_bytes(listed, tmp_path):
    check.same_bytes_for_any_worker_count(tmp_path, listed[0])


def test_a_dask_build_writes_a_local_builds_bytes(dask_cluster, listed, tmp_path):
    check.same_bytes_on_dask(dask_cluster, tmp_path, listed[0])


def test_a_changed_image_refuses_a_resume(listed, tmp_path):
    spec, pixels, _ = listed
    image = Path(spec).parent / "images" / "3.png"
    check.changed_source_refuses_resume(tmp_path, spec, lambda: image.write_bytes(check.png(255 - pixels[3])))


def test_a_changed_label_refuses_a_resume(listed, tmp_path):
    spec = Path(listed[0])
    check.changed_source_refuses_resume(
        tmp_path, str(spec), lambda: spec.write_text(spec.read_text().replace("images/0.png,benign",
                                                                             "images/0.png,normal")))


def test_an_unreadable_image_is_skipped_on_request(tmp_path):
    pixels, labels = check.images()
    check.bad_item_skipped(tmp_path, str(write_list(tmp_path / "d", pixels, labels, bad=6)), 6, len(pixels))


@pytest.mark.parametrize("row, fragment", [
    ("images/gone.png,benign", "row 5: images/gone.png does not exist"),
    ("images/0.png,", "row 5: label '' is neither a class name nor an integer"),
    (",benign", "row 5: no image path"),
])
def test_a_bad_row_is_named_in_one_line(row, fragment, tmp_path):
    pixels, labels = check.images(n=2)
    path = write_list(tmp_path / "d", pixels, labels)
    path.write_text(path.read_text() + "\n" + row + "\n")  # a blank line: rows count as an editor's lines
    assert_one_line_error(run_cli("build", path, "--out", tmp_path / "out", "--quiet", expect=1), fragment)


def test_bad_jsonl_labels_are_named(tmp_path):
    pixels, labels = check.images(n=2)
    path = write_list(tmp_path / "d", pixels, labels, kind="jsonl")
    path.write_text(path.read_text() + json.dumps({"path": "images/0.png", "label": 1.5}) + "\n")
    assert_one_line_error(run_cli("build", path, "--out", tmp_path / "out", "--quiet", expect=1),
                          "row 3: label 1.5 is neither")


def test_a_column_option_is_refused_where_the_source_has_no_columns(tmp_path):
    result = run_cli("build", "--image-column", "img", "--out", tmp_path / "out", "--quiet", expect=1)
    assert_one_line_error(result, "--image-column names a column", "drop it")


def test_a_relative_list_is_read_from_any_folder(listed, tmp_path, monkeypatch):
    check.read_from_another_folder(monkeypatch, tmp_path, "data/train.csv", 11, listed[1][11])
