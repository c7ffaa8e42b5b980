"""`cachegen build --out URL` (built in a local folder, then uploaded), and `info`/`verify` over a cache at a URL (s3://..., any fsspec protocol): its files
fetched into a temporary folder first (the manifest only for info; every file it lists, as they
are, for verify to judge), through the readers' Stager (same credentials, retries, one-line errors)."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cacheformat.layout import index_path
from cacheformat import as_error
from cachegen import faults
from cachegen.errors import CachegenError
from cachegen.manifest import MANIFEST, describe_difference, identity
from readers.manifest import load_manifest
from readers.remote import Stager, filesystem, is_url


@contextmanager
def local_view(cache: str | Path, *, files: bool = False) -> Iterator[Path]:
    """A local folder holding the cache `cache` (a path: itself), with every listed file if `files`."""
    if not is_url(cache):
        yield Path(str(cache).removeprefix("file://"))
        return
    with tempfile.TemporaryDirectory(prefix="cachegen-") as tmp:
        stager = Stager(str(cache), tmp)
        # A damaged manifest or shard: named by its URL, not the download's path.
        with as_error(None, lambda text: named(text, stager.root, cache)):
            if files:
                for shard in load_manifest(stager.root, stager.sizes()).all_shards():  # all there, first
                    for rel in (shard.relpath, index_path(shard.relpath)):
                        stager.copy(rel)
            yield stager.root


def named(text: str, root: Path, cache: str | Path) -> str:
    """`text` with the local folder's path spelt as the cache's URL."""
    return text.replace(str(root), str(cache).rstrip("/"))


def stage_folder(url: str) -> Path:
    """Where `cachegen build --out URL` builds before uploading, unless --stage says: a folder of
    the system's temporary directory named by the URL, so a re-run resumes there."""
    return Path(tempfile.gettempdir()) / f"cachegen-stage-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def check_writable(url: str) -> None:
    """Write and delete a probe object under `url` before building: a missing bucket, denied
    access or an unreachable endpoint is a one-line error now, not after the build."""
    fs, base = filesystem(url)
    probe = f"{base}/.cachegen-write-test"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001 - whatever the backend raises, one line naming the URL
        raise CachegenError(f"cannot write to --out {url.rstrip('/')} ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]}); check the bucket, the endpoint and "
                            "the credentials") from None


GENERATION = "g-"  # g-<12 hex>/: where an upload puts objects whose keys the cache there already uses
_CACHE_OBJECT = re.compile(rf"({GENERATION}[0-9a-f]{{12}}/)?(epoch-\d{{4}}|source)/shard-\d{{6}}\.(tar|idx)")


def upload(root: Path, url: str, *, overwrite: bool = False) -> int:
    """Upload the cache built in `root` to `url` so that a reader of the cache already there
    (through its manifest) reads consistent objects until the new manifest lands: no object that
    manifest lists is ever written. A shard already there with the same bytes (and index) is kept
    and listed where it is; any other goes to its own key, or under a generation prefix (g-<hash
    of the new manifest>/) where the old manifest lists that key. Shards, then their indexes, then
    the manifest (a PUT is atomic); then the cache objects no manifest lists any more are deleted.
    An object already at its key with the same content is kept: a re-run after a kill uploads the
    rest. Returns the number of files uploaded.

    Raises:
        CachegenError: `url` holds another cache and not `overwrite`, or an upload fails.
    """
    fs, base = filesystem(url)
    fs.invalidate_cache()  # fsspec keeps listings per instance: what is there now, not at the last run
    url = url.rstrip("/")
    new = load_manifest(root)
    old = _remote_manifest(fs, base)
    if old is not None and identity(old) != identity(new.raw) and not overwrite:
        raise CachegenError(f"{url} holds a different cache (differs in: {describe_difference(old, new.raw)}); "
                            f"pass --overwrite to replace it (the new one is built in {root})")
    placed = _placement(new, old)
    sent = sum(_put(fs, root / local, f"{base}/{remote}", f"{url}/{remote}")
               for local, remote in _files(new, placed))
    manifest = _relocated(new.raw, placed)
    faults.kill_at("upload:before-manifest")
    _put_bytes(fs, json.dumps(manifest, separators=(",", ":")).encode(), f"{base}/{MANIFEST}", f"{url}/{MANIFEST}")
    faults.kill_at("upload:before-cleanup")
    _remove_stale(fs, base, set(placed.values()))
    return sent + 1


def _remote_manifest(fs, base: str) -> dict | None:
    """The manifest at the URL as JSON, or None where there is none (or it is not JSON)."""
    try:
        data = fs.cat_file(f"{base}/{MANIFEST}")
        raw = json.loads(data)
    except (FileNotFoundError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _placement(new, old: dict | None) -> dict[str, str]:
    """Where each shard of `new` goes at the URL (local relpath -> remote relpath)."""
    old_shards = [s for e in (old or {}).get("epoch_list", []) for s in e.get("shards", [])] + \
        list((old or {}).get("source_shards", []))
    listed = {s.get("path") for s in old_shards if isinstance(s, dict)}
    same = {(s.get("sha256"), (s.get("index") or {}).get("sha256")): s.get("path") for s in old_shards
            if isinstance(s, dict)}
    generation = GENERATION + hashlib.sha256(json.dumps(new.raw, sort_keys=True).encode()).hexdigest()[:12]
    placed = {}
    for shard in new.all_shards():
        kept = same.get((shard.sha256, shard.index_sha256))
        placed[shard.relpath] = kept if isinstance(kept, str) else \
            shard.relpath if shard.relpath not in listed else f"{generation}/{shard.relpath}"
    return placed


def _files(new, placed: dict[str, str]) -> list[tuple[str, str]]:
    """(local relpath, remote relpath) of every file to upload: the shards, then their indexes."""
    shards = new.all_shards()
    return [(s.relpath, placed[s.relpath]) for s in shards] + \
        [(index_path(s.relpath), index_path(placed[s.relpath])) for s in shards]


def _relocated(raw: dict, placed: dict[str, str]) -> dict:
    """The manifest `raw` with each shard listed where it went."""
    out = json.loads(json.dumps(raw))
    for shard in [s for e in out["epoch_list"] for s in e["shards"]] + out.get("source_shards", []):
        shard["path"] = placed[shard["path"]]
    return out


def _put(fs, local: Path, remote: str, named: str) -> int:
    """Upload `local` to `remote` unless the same object is there; 1 if uploaded."""
    try:
        if _same_object(fs, remote, local):
            return 0
        fs.put_file(str(local), remote)
    except OSError as e:
        raise _upload_error(named, e) from None
    return 1


def _put_bytes(fs, data: bytes, remote: str, named: str) -> None:
    try:
        fs.pipe_file(remote, data)
    except OSError as e:
        raise _upload_error(named, e) from None


def _upload_error(named: str, e: BaseException) -> CachegenError:
    return CachegenError(f"cannot upload to {named} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
                         "check the bucket and the credentials, then re-run the same command")


def _remove_stale(fs, base: str, listed: set[str]) -> None:
    """Delete the cache objects under `base` the manifest no longer lists (an overwritten cache's)."""
    rels = {key: key[len(base):].lstrip("/") for key in fs.find(base)}
    stale = [key for key, rel in rels.items()
             if _CACHE_OBJECT.fullmatch(rel) and rel.rsplit(".", 1)[0] + ".tar" not in listed]
    if stale:
        fs.rm(stale)
    fs.invalidate_cache()


def _same_object(fs, remote: str, local: Path) -> bool:
    try:
        info = fs.info(remote)
    except FileNotFoundError:
        return False
    if info.get("size") != local.stat().st_size:
        return False
    etag = str(info.get("ETag", "")).strip('"')
    data = local.read_bytes()
    if etag and "-" not in etag:  # a single-part upload's ETag is the MD5 of its bytes
        return etag == hashlib.md5(data).hexdigest()
    return fs.cat_file(remote) == data
