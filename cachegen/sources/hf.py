"""A Hugging Face dataset as a source: a folder `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)
wrote, or parquet files in the hub's layout; an image column (datasets.Image: encoded bytes, or a
path) and an integer label column, class names from its ClassLabel.

Read where it lies, one row at a time, nothing loaded whole and nothing converted: a saved dataset's
Arrow files are memory-mapped by the `datasets` library itself (load_from_disk; its own format, splits
and file list), and parquet files are read a row group at a time with pyarrow (`datasets`' own
parquet loader would first copy the whole dataset into an Arrow cache). Both come with the `hf` extra.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cachegen.errors import CachegenError
from cachegen.sources.base import Source, printable
from cachegen.sources.images import decode_image, read_regular, stamp
from cachegen.sources.npz import MAX_UNNAMED_CLASSES
from cachegen.sources.webdataset import expand

EXTRA = "a Hugging Face dataset source needs the datasets package: pip install 'cachegen[hf]'"
SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes: a DatasetDict's, a Dataset's
IMAGE_NAMES = ("image", "img", "image_bytes", "picture")  # an image column without an Image feature
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
LABEL_NAMES = ("label", "labels", "class", "target", "fine_label", "coarse_label")


class HFSource(Source):
    """Rows of a saved dataset or of parquet files: labels read once (one column), images row by row,
    in each process from files it opens itself (it pickles as where the data is and which columns)."""

    def __init__(self, spec: str, *, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None) -> None:
        self.spec, self.split = spec, split
        self._rows = _open(spec, split)
        self._reopen = os.path.abspath(spec)  # where a worker opens it: a Dask worker's current folder is its own
        features = self._rows.features
        self.image_column = _find(features, image_column, "Image", IMAGE_NAMES, "--image-column", "image")
        self.label_column = _find(features, label_column, "ClassLabel", LABEL_NAMES, "--label-column",
                                  "label")
        self._where = self._rows.where  # what the fingerprint records of the files
        self.labels = self._rows.labels(self.label_column)
        names = getattr(features.get(self.label_column), "names", None)
        if len(self.labels) == 0:
            raise CachegenError(f"{spec} holds no rows")
        if names is None and self.labels.max() >= MAX_UNNAMED_CLASSES:
            raise CachegenError(f"{spec}: labels run up to {int(self.labels.max())}; number the classes 0..K-1")
        self.classes = tuple(names) if names is not None else tuple(str(k) for k in range(int(self.labels.max()) + 1))
        if self.labels.min() < 0 or self.labels.max() >= len(self.classes):
            raise CachegenError(f"{spec}: column {self.label_column!r} holds labels {self.labels.min()}.."
                                f"{self.labels.max()}, not class numbers 0..{len(self.classes) - 1} (a row without "
                                "a label?)")
        self.kind = "hf"
        self.description = printable(f"Hugging Face {self._rows.what} {spec}" + (f" ({split})" if self._rows.split
                                                                                 else ""))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None}

    def load(self, index: int) -> Image.Image:
        if self._rows is None:  # in a worker: open the files here
            self._rows = _open(self._reopen, self.split)
        cell = self._rows.cell(index, self.image_column)
        if isinstance(cell, dict):  # datasets.Image's storage: the encoded bytes, or a path to them
            if cell.get("bytes") is not None:
                return decode_image(cell["bytes"])
            if cell.get("path"):
                return decode_image(read_regular(cell["path"]))
            raise ValueError("its image cell holds neither bytes nor a path")
        if isinstance(cell, bytes):
            return decode_image(cell)
        raise ValueError(f"its image cell is a {type(cell).__name__}, not an image")

    def name(self, index: int) -> str:
        return f"row {index} of {self.description}"

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.image_column}|{self.label_column}|{self.classes}".encode())
        for path, extra in self._where:
            h.update(os.fsencode(os.path.basename(path)) + extra.encode() + stamp(path))
        h.update(self.labels.tobytes())
        return h.hexdigest()


def is_hf(spec: str) -> bool:
    """Whether `spec` names a saved dataset or parquet files (a file, a glob, or a folder of them)."""
    if spec.endswith(".parquet"):
        return True
    path = Path(spec)
    return path.is_dir() and (any((path / name).is_file() for name in SAVED) or _holds_parquet(path))


def _holds_parquet(folder: Path) -> bool:
    """Whether parquet files lie in `folder` or one or two folders down (as _parquet_files finds them),
    without listing a whole ImageFolder tree: a sub-folder that holds an image ends the search."""
    stack = [(str(folder), 0)]
    while stack:
        here, depth = stack.pop()
        try:
            with os.scandir(here) as listing:
                entries = [(e.name.lower(), e.path, e.is_dir(follow_symlinks=False)) for e in listing]
        except OSError:
            continue
        if any(name.endswith(".parquet") for name, _, _ in entries):
            return True
        if depth > 0 and any(name.endswith(IMAGE_SUFFIXES) for name, _, _ in entries):
            return False  # a class folder of an ImageFolder
        if depth < 2:
            stack += [(where, depth + 1) for _, where, is_dir in entries if is_dir]
    return False


class _Arrow:
    """A saved dataset's rows: its memory-mapped Arrow table, as load_from_disk opens it."""

    what = "dataset"

    def __init__(self, path: Path, split: str) -> None:
        datasets = _datasets()
        quiet = datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()  # its bar would start tqdm's monitor thread: the build has its own
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as e:
            raise CachegenError(f"cannot open {path} as a saved Hugging Face dataset ({type(e).__name__}: {e})") \
                from None
        finally:
            if not quiet:
                datasets.utils.enable_progress_bars()
        self.split = None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise CachegenError(f"{path} has no split {split!r}; its splits: {', '.join(data)}: pass --split")
            data, self.split = data[split], split
        elif split != "train":
            raise CachegenError(f"{path} is one dataset, not a DatasetDict of splits: drop --split {split}")
        if data._indices is not None:  # save_to_disk writes rows in order: a mapping is not its format
            raise CachegenError(f"{path} has an indices mapping; save it with flatten_indices() first")
        self.table = data.data.table
        self.features = data.features
        self.where = [(f["filename"], "") for f in data.cache_files]

    def labels(self, column: str) -> np.ndarray:
        return _integers(self.table.column(column))

    def cell(self, index: int, column: str):
        return self.table.column(column)[index].as_py()


class _Parquet:
    """Parquet files' rows, read a row group at a time (the last one kept: rows of a group read in a
    row cost one read)."""

    what = "parquet"

    def __init__(self, files: list[str], split: str, spec: str) -> None:
        _datasets()
        import pyarrow.parquet as pq

        self.split = None
        named = [f for f in files if _split_of(f) == split]
        if named:
            files, self.split = named, split
        elif any(_split_of(f) for f in files):
            splits = sorted({s for f in files if (s := _split_of(f))})
            raise CachegenError(f"{spec} has no split {split!r} (file names say {', '.join(splits)}): pass --split")
        elif split != "train":
            raise CachegenError(f"{spec}: no file names a split: drop --split {split}")
        try:
            self.files = [pq.ParquetFile(f) for f in files]
        except Exception as e:
            raise CachegenError(f"cannot read {spec} as parquet ({type(e).__name__}: {e})") from None
        groups = [(k, g, f.metadata.row_group(g).num_rows) for k, f in enumerate(self.files)
                  for g in range(f.metadata.num_row_groups)]
        self.groups = [(k, g) for k, g, _ in groups]
        self.starts = np.cumsum([0] + [n for _, _, n in groups])
        schema = self.files[0].schema_arrow
        from datasets import Features

        self.features = Features.from_arrow_schema(schema)
        self.where = [(f, str(self.files[k].metadata.num_rows)) for k, f in enumerate(files)]
        self._held = (None, None)

    def labels(self, column: str) -> np.ndarray:
        try:
            return np.concatenate([_integers(f.read(columns=[column]).column(0)) for f in self.files])
        except KeyError:
            raise CachegenError(f"a parquet file of the source has no column {column!r}") from None

    def cell(self, index: int, column: str):
        at = int(np.searchsorted(self.starts, index, side="right")) - 1
        if self._held[0] != (at, column):
            k, g = self.groups[at]
            self._held = ((at, column), self.files[k].read_row_group(g, columns=[column]).column(0))
        return self._held[1][index - int(self.starts[at])].as_py()


def open_hf(spec: str, *, split: str = "train", image_column: str | None = None,
            label_column: str | None = None) -> HFSource:
    return HFSource(spec, split=split, image_column=image_column, label_column=label_column)


def _open(spec: str, split: str):
    path = Path(spec)
    if path.is_dir() and any((path / name).is_file() for name in SAVED):
        return _Arrow(path, split)
    files = _parquet_files(path) if path.is_dir() else [str(path)] if path.is_file() else expand(spec)
    if not files:
        raise CachegenError(f"no parquet files at {spec}")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CachegenError(f"parquet file {printable(missing[0])} does not exist")
    return _Parquet(files, split, spec)


def _parquet_files(folder: Path) -> list[str]:
    """The parquet files of a hub dataset's folder: at its top, or one or two folders down
    (data/train-00000-of-00004.parquet, default/train/0000.parquet), sorted."""
    for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet"):
        found = sorted(str(p) for p in folder.glob(pattern))
        if found:
            return found
    return []


def _split_of(file: str) -> str | None:
    """The split a hub parquet file belongs to: its name's prefix (train-00000-of-00001.parquet) or its
    folder (train/0000.parquet); None where neither says."""
    name, folder = os.path.basename(file), os.path.basename(os.path.dirname(file))
    for split in ("train", "test", "validation", "valid", "val"):
        if name.startswith(f"{split}-") or name == f"{split}.parquet" or folder == split:
            return split
    return None


def _find(features, named: str | None, feature: str, names: tuple[str, ...], option: str, what: str) -> str:
    """The column holding `what`: `named`, else the one whose feature type is `feature`, else the first
    of `names`."""
    columns = list(features)
    if named is not None:
        if named not in features:
            raise CachegenError(f"no column {named!r} ({option}); the columns: {', '.join(columns)}")
        return named
    typed = [c for c in columns if type(features[c]).__name__ == feature]
    if len(typed) == 1:
        return typed[0]
    found = next((c for c in names if c in features), None)
    if found is None:
        raise CachegenError(f"no {what} column found among {', '.join(columns)} (no {feature} feature, none named "
                            f"{' or '.join(names)}): name it with {option}")
    return found


def _integers(column) -> np.ndarray:
    import pyarrow as pa

    if not pa.types.is_integer(column.type) or column.null_count:
        raise CachegenError(f"the label column is {column.type}{' with empty rows' if column.null_count else ''}, "
                            "not integers: name the right one with --label-column")
    return column.to_numpy().astype(np.int64)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise CachegenError(EXTRA) from None
    return datasets
