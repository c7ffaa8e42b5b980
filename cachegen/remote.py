"""`cachegen build --out URL` (built in a local folder, then uploaded), and `info`/`verify` over a cache at a URL (s3://..., any fsspec protocol): its files
fetched into a temporary folder first (the manifest only for info; every file it lists, as they
are, for verify to judge), through the readers' Stager (same credentials, retries, one-line errors)."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cacheformat.layout import index_path
from cacheformat import FormatError
from cachegen.errors import CachegenError
from readers.manifest import load_manifest
from readers.remote import MANIFEST, Stager, filesystem, is_url


@contextmanager
def local_view(cache: str | Path, *, files: bool = False) -> Iterator[Path]:
    """A local folder holding the cache `cache` (a path: itself), with every listed file if `files`."""
    if not is_url(cache):
        yield Path(str(cache).removeprefix("file://"))
        return
    with tempfile.TemporaryDirectory(prefix="cachegen-") as tmp:
        stager = Stager(str(cache), tmp)
        try:
            if files:
                for shard in load_manifest(stager.root).all_shards():
                    for rel in (shard.relpath, index_path(shard.relpath)):
                        stager.copy(rel)
            yield stager.root
        except FormatError as e:  # a damaged manifest or shard: named by its URL, not the download's path
            raise type(e)(named(str(e), stager.root, cache)) from None


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


def upload(root: Path, url: str) -> int:
    """Upload the cache built in `root` to `url`: its shards, then their indexes, then the manifest
    (a reader trusts nothing the manifest does not list, and a PUT is atomic: an object appears
    complete or not at all). An object already there with the same size and content (its ETag
    where the store gives an MD5, else the bytes read back) is kept: a re-run after a kill uploads
    the rest. Returns the number of files uploaded."""
    stager_fs, base = filesystem(url)
    url = url.rstrip("/")
    shards = load_manifest(root).all_shards()
    names = [s.relpath for s in shards] + [index_path(s.relpath) for s in shards] + [MANIFEST]
    sent = 0
    for rel in names:
        local, remote = root / rel, f"{base}/{rel}"
        try:
            if rel != MANIFEST and _same_object(stager_fs, remote, local):
                continue
            stager_fs.put_file(str(local), remote)
            sent += 1
        except (FileNotFoundError, PermissionError, OSError) as e:
            raise CachegenError(f"cannot upload to {url}/{rel} ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:160]}); check the bucket and the credentials") from None
    return sent


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
