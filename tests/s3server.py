"""A real S3 endpoint for the tests: moto's server, a separate process speaking HTTP on a free port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """`python -m moto.server` on 127.0.0.1:port; stop() and start() again (the same port) for an outage.
    Its objects live in its memory: a restarted server is empty until they are uploaded again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self._process.poll() is not None:
                    raise RuntimeError("moto server exited on start") from None
                time.sleep(0.1)
        raise RuntimeError("moto server did not start in 60 s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
            self._process = None


def s3fs_filesystem():
    """A fresh s3fs filesystem (credentials and endpoint from the AWS_* environment)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def upload(fs, cache: Path, url: str) -> None:
    """Every file of the cache folder `cache` to `url` (s3://bucket/prefix), the manifest last."""
    bucket = url.removeprefix("s3://").split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    files = sorted(p for p in Path(cache).rglob("*") if p.is_file() and p.name != "manifest.json")
    for p in [*files, Path(cache) / "manifest.json"]:
        fs.put_file(str(p), f"{url.removeprefix('s3://')}/{p.relative_to(cache).as_posix()}")
