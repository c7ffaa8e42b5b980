"""A CSV or JSONL list of images and their labels: `path,label` rows under a header (a JSON object a
line), paths relative to the list's folder, labels class names or integers."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cachegen.errors import CachegenError
from cachegen.sources.base import Source, printable
from cachegen.sources.images import decode_image, read_regular, stamp
from cachegen.sources.npz import MAX_UNNAMED_CLASSES

LIST_SUFFIXES = (".csv", ".tsv", ".jsonl")
# The columns a list's image path and label are looked for under, where not named by --image-column
# and --label-column (the names the lists of Kaggle's and medical datasets use most).
PATH_COLUMNS = ("path", "image", "image_path", "file", "filename", "file_name", "img")
LABEL_COLUMNS = ("label", "class", "target", "category", "labels", "class_name")
MAX_LIST_BYTES = 1 << 30  # a list read whole: 1 GB is tens of millions of rows


class ListSource(Source):
    """The images a CSV/JSONL list names, decoded lazily in the workers, with the list's labels."""

    def __init__(self, path: Path, *, image_column: str | None = None, label_column: str | None = None) -> None:
        self.list_path = path
        self.list_sha256, rows = _rows(path)
        if not rows:
            raise CachegenError(f"{path} lists no images: give a header row (path,label) and a row per image")
        first_row, header = rows[0]
        image_key = _column(path, header, image_column, PATH_COLUMNS, "--image-column", "image path")
        label_key = _column(path, header, label_column, LABEL_COLUMNS, "--label-column", "label")
        folder = os.path.abspath(path.parent)  # a Dask worker's current folder is its own
        paths, raw_labels = [], []
        for row, record in rows:
            where = f"{printable(str(path))} row {row}"
            name, label = record.get(image_key), record.get(label_key)
            if not isinstance(name, str) or not name:
                raise CachegenError(f"{where}: no image path in column {image_key!r}")
            file = os.path.join(folder, name)
            if not os.path.isfile(file):
                raise CachegenError(f"{where}: {printable(name)} does not exist (paths are relative to "
                                    f"{printable(folder)}); fix the row or remove it")
            if isinstance(label, bool) or not (isinstance(label, int) or isinstance(label, str) and label.strip()):
                raise CachegenError(f"{where}: label {label!r} is neither a class name nor an integer")
            paths.append(file)
            raw_labels.append((row, label.strip() if isinstance(label, str) else label))
        self.paths = paths
        self.labels, self.classes = _labels(path, raw_labels)
        self.kind, self.description = "list", printable(f"list {path}")

    def load(self, index: int) -> Image.Image:
        return decode_image(read_regular(self.paths[index]))

    def name(self, index: int) -> str:
        return printable(self.paths[index])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.list_sha256.encode())
        for path in self.paths:
            h.update(os.fsencode(os.path.relpath(path, os.path.abspath(self.list_path.parent))) + stamp(path))
        return h.hexdigest()


def is_list(spec: str) -> bool:
    return spec.lower().endswith(LIST_SUFFIXES)


def _rows(path: Path) -> tuple[str, list[tuple[int, dict]]]:
    """(sha256 of the list, [(row number as an editor counts lines, the row as a dict)])."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_LIST_BYTES:
                raise CachegenError(f"{path} is {size} bytes, more than a list of images takes ({MAX_LIST_BYTES})")
            data = f.read(size + 1)
    except OSError as e:
        raise CachegenError(f"cannot read the list {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CachegenError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise CachegenError(f"{path} row {number} is not JSON ({e})") from None
            if not isinstance(record, dict):
                raise CachegenError(f"{path} row {number} is not a JSON object (one a line: "
                                    '{"path": ..., "label": ...})')
            rows.append((number, record))
        return digest, rows
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        return digest, [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]
    except csv.Error as e:
        raise CachegenError(f"{path} row {reader.line_num} is not CSV ({e})") from None


def _column(path: Path, header: dict, named: str | None, known: tuple[str, ...], option: str, what: str) -> str:
    """The key of the column holding `what`: `named` (--image-column/--label-column), else the first
    of `known` the header has (any case)."""
    if named is not None:
        if named not in header:
            raise CachegenError(f"{path} has no column {named!r} ({option}); its columns: {', '.join(header)}")
        return named
    by_case = {str(k).lower(): k for k in header}
    found = next((by_case[k] for k in known if k in by_case), None)
    if found is None:
        raise CachegenError(f"{path}: no {what} column among {', '.join(map(str, header)) or 'none'} (looked for "
                            f"{', '.join(known)}): name it with {option}, or give the list a header row")
    return found


def _labels(path: Path, raw: list[tuple[int, str | int]]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels 0..K-1 and the K class names: integer labels as they are (class k named str(k)); names
    numbered in sorted order, as ImageFolder numbers its folders."""
    def integer(value) -> int | None:
        if isinstance(value, int):
            return value
        text = value.lstrip("+-")
        return int(value) if text.isdigit() and text.isascii() else None

    numbers = [integer(label) for _, label in raw]
    if all(n is not None for n in numbers):
        for (row, label), n in zip(raw, numbers):
            if not 0 <= n < MAX_UNNAMED_CLASSES:
                raise CachegenError(f"{printable(str(path))} row {row}: label {label} is not a class number "
                                    f"0..{MAX_UNNAMED_CLASSES - 1}")
        return np.asarray(numbers, np.int64), tuple(str(k) for k in range(max(numbers) + 1))
    names = sorted({str(label) for _, label in raw})
    number = {name: k for k, name in enumerate(names)}
    return np.asarray([number[str(label)] for _, label in raw], np.int64), tuple(names)
