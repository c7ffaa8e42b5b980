"""Helpers for the builder tests: run the CLI in-process and read caches back."""

from __future__ import annotations

import json
from pathlib import Path

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
    """Every shard of a cache by relative path (what must be byte-identical between builds)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("epoch-*/*.tar"))}


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


@pytest.fixture
def build(npz_source, tmp_path):
    """build(*extra_args, out=...) -> cache folder, from the small npz source, 1 worker, quiet."""
    def _build(*args: str, out: Path | None = None, expect: int = 0):
        out = out or tmp_path / "cache"
        run_cli("build", npz_source[0], "--out", out, "--shard-size", "50", "--workers", "1", "--quiet",
                *args, expect=expect)
        return out
    return _build
