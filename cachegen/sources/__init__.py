"""Sources: one file per kind behind the one `Source` interface (base.py); open_source picks the kind
from the spec. The built-in sample (sample.py), an ImageFolder tree (folder.py), torchvision's on-disk
datasets (torchvision.py), a .npz (npz.py), WebDataset shards or a cachegen cache (webdataset.py), a
CSV/JSONL list (lists.py), a Hugging Face dataset (hf.py); array.py holds the in-memory images three of
them share, images.py decodes the encoded images of the others."""

from __future__ import annotations

from pathlib import Path

from cachegen.errors import CachegenError
from cachegen.sources.array import ArraySource
from cacheformat.mask import mask_class_names
from cachegen.sources.base import Source, printable
from cachegen.sources.folder import FolderSource
from cachegen.sources.hf import HFSource, is_hf, open_hf
from cachegen.sources.lists import ListSource, is_list
from cachegen.sources.npz import open_npz
from cachegen.sources.sample import open_sample
from cachegen.sources.torchvision import TORCHVISION_KINDS, detect, open_torchvision
from cachegen.sources.webdataset import WebDatasetSource, is_shards, open_webdataset


def open_source(spec: str | None, *, split: str = "train", image_column: str | None = None,
                label_column: str | None = None, quiet: bool = True, masks: str | bool | None = None,
                mask_classes: tuple[str, ...] | None = None) -> Source:
    """Open a source from its spec: None/'sample', 'cifar10:ROOT' (and cifar100, mnist,
    fashionmnist), a .npz file, WebDataset shards (a .tar, a brace pattern or glob of them, a folder of
    them, a cachegen cache), a .csv/.tsv/.jsonl list of images and labels, a Hugging Face dataset (a
    save_to_disk folder, parquet files), or a folder (torchvision layout detected, else ImageFolder).
    `image_column`, `label_column`: a list's or a Hugging Face dataset's columns. Not `quiet`: a bar
    while shards' headers are read, where that takes more than a moment.

    `masks`: True for the sample with its shapes' masks; a folder of PNG masks for a folder of
    images (`mask_classes` naming their values). A .npz has masks where it holds a 'masks' array."""
    columns = {"image_column": image_column, "label_column": label_column}
    if spec and (is_list(spec) or is_shards(spec) or is_hf(spec)) and masks is not None:
        raise CachegenError(f"source {spec} has no masks: --masks DIR is for a folder of images, --sample-masks for "
                            "the sample (a .npz holds its own 'masks' array)")
    if spec and (is_list(spec) or is_shards(spec)) and split != "train":
        raise CachegenError(f"source {spec} has no splits: drop --split {split} (give the split's own list or shards)")
    if spec and is_list(spec):
        return ListSource(Path(spec), **columns)
    if spec and is_hf(spec):
        return open_hf(spec, split=split, **columns)
    for option, value in columns.items():
        if value is not None:
            raise CachegenError(f"--{option.replace('_', '-')} names a column of a list (.csv, .jsonl) or a Hugging "
                                f"Face dataset; source {spec or 'sample'} has none: drop it")
    if spec in (None, "", "sample"):
        if masks not in (None, True, False):
            raise CachegenError("--masks DIR is for a folder of images: the sample's masks are --sample-masks")
        return open_sample(split, masks=bool(masks))
    if masks is True:
        raise CachegenError(f"--sample-masks is for the built-in sample, not {spec}: a folder's masks are --masks DIR, "
                            "a .npz's its 'masks' array")
    if masks is not None and not (Path(spec).is_dir() and not detect(Path(spec))):
        raise CachegenError(f"--masks DIR is for a folder of images, not {spec} (a .npz holds its own 'masks' array)")
    if masks is not None:
        return FolderSource(Path(spec), masks=Path(masks), mask_classes=mask_classes)
    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() in TORCHVISION_KINDS:
        return open_torchvision(kind.lower(), Path(rest), split)
    if is_shards(spec):
        return open_webdataset(spec, quiet=quiet)
    path = Path(spec)
    if not path.exists():
        raise CachegenError(f"source {spec} does not exist: give a folder, a .npz, .tar shards, a .csv/.jsonl list, "
                            f"a saved or parquet Hugging Face dataset, '{{cifar10,cifar100,mnist,fashionmnist}}:ROOT' "
                            "or 'sample'")
    if path.is_file():
        if path.suffix != ".npz":
            raise CachegenError(f"source {spec} is a file but not a .npz: give a folder or a .npz")
        return open_npz(path)
    detected = detect(path)
    if detected:
        return open_torchvision(detected, path, split)
    return FolderSource(path)


def reopen(source_spec: dict) -> Source:
    """The source a manifest's `source_spec` names, opened again (preview, bench); a source a
    --source-factory made is refused: a cache is data, and reading one never runs the code it names."""
    if source_spec.get("source_factory"):
        raise CachegenError(f"the cache was built from the Dataset --source-factory {source_spec['source_factory']} "
                            "makes, and what reads a cache runs no code: build from data (a folder, shards, a list) "
                            "to compare with it")
    return open_source(source_spec["spec"], split=source_spec["split"], image_column=source_spec.get("image_column"),
                       label_column=source_spec.get("label_column"), masks=source_spec.get("masks"),
                       mask_classes=mask_class_names(source_spec.get("mask_classes")))


__all__ = ["ArraySource", "FolderSource", "HFSource", "ListSource", "Source", "WebDatasetSource", "open_source", "printable", "reopen"]
