"""Helpers for the builder tests: run the CLI in-process and read caches back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cachegen.cli import main


def run_cli(*args: str, expect: int = 0):
    """Run `cachegen ARGS` in-process; assert the exit code; return the result."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    """A user error: non-zero exit, one 'Error: ...' line naming the problem, no traceback."""
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def shard_bytes(root: Path) -> dict[str, bytes]:
    """Every shard and index file of a cache by relative path (what must be byte-identical between builds)."""
    return {str(p.relative_to(root)): p.read_bytes()
            for pattern in ("*/*.tar", "*/*.idx") for p in sorted(root.glob(pattern))}


def manifest(root: Path) -> dict:
    """manifest.json with each shard's index columns (offsets, sizes, labels, indices, read with
    np.load) merged into its entry, as the tests read a cache."""
    m = json.loads((root / "manifest.json").read_text())
    for shard in [s for e in m["epoch_list"] for s in e["shards"]] + m.get("source_shards", []):
        table = np.load(root / (shard["path"][:-len(".tar")] + ".idx"))
        shard.update({k: table[:, c].tolist() for c, k in enumerate(("offsets", "sizes", "labels", "indices"))})
    return m


@pytest.fixture
def build(npz_source, tmp_path):
    """build(*extra_args, out=...) -> cache folder, from the small npz source, 1 worker, quiet."""
    def _build(*args: str, out: Path | None = None, expect: int = 0):
        out = out or tmp_path / "cache"
        run_cli("build", npz_source[0], "--out", out, "--shard-size", "50", "--workers", "1", "--quiet",
                *args, expect=expect)
        return out
    return _build
