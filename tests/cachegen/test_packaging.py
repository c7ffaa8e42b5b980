"""What installing cachegen pulls in: the test tools only with the `test` extra."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_pytest_is_a_test_extra_not_a_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ \[]", d)[0].lower() for d in project["dependencies"]]
    assert "pytest" not in names and "hypothesis" not in names
    assert any(d.startswith("pytest") for d in project["optional-dependencies"]["test"])
    for path in [*ROOT.glob("cachegen/*.py"), *ROOT.glob("readers/*.py")]:  # and no runtime code needs it
        assert not re.search(r"^\s*(import|from)\s+(pytest|hypothesis)\b", path.read_text(), re.M), path
