"""`pytest -m cuda` selects every CUDA test (a registered marker, not a name), and without a GPU
each is skipped rather than failed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _marked_cuda(path: Path) -> set[str]:
    """Test functions of `path` that carry the cuda marker: decorated with it (or its alias
    `cuda`), or in a module whose pytestmark is it. Read from the source, not from pytest."""
    tree = ast.parse(path.read_text())
    whole = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                and "mark.cuda" in ast.unparse(n.value) for n in tree.body)
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if whole or any(d in ("cuda", "pytest.mark.cuda") for d in decorators):
                names.add(node.name)
    return names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skips of a machine without a GPU")
def test_pytest_m_cuda_selects_every_cuda_test_and_skips_them_here():
    expected = set()
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        expected |= _marked_cuda(path)
    assert len(expected) >= 10 and "test_no_host_waits_per_batch" in expected
    pytest_m_cuda = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    listed = subprocess.run([*pytest_m_cuda, "--collect-only"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    assert {i.split("::")[1].split("[")[0] for i in ids} == expected, listed.stdout[-3000:]
    done = subprocess.run(pytest_m_cuda, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{len(ids)} skipped" in done.stdout and " passed" not in done.stdout and " failed" not in done.stdout
