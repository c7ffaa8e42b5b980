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


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_extras_have_lower_bounds_so_pip_does_not_search_old_releases():
    """Without a lower bound an old pip's resolver, on any conflict, downloads release after release
    of a package (a hundred of huggingface_hub's once) before it gives up on it."""
    for extra, requirements in _extras().items():
        for requirement in requirements:
            if not requirement.startswith("cachegen["):
                assert ">=" in requirement, (extra, requirement)


def test_the_boto3_window_is_the_botocore_window_of_aiobotocore():
    """moto brings boto3, s3fs brings aiobotocore, and both pin botocore: the test extra bounds boto3
    (whose versions are botocore's) to exactly what the installed aiobotocore accepts, so pip takes
    them together at once. When aiobotocore is upgraded, move the window with it."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("aiobotocore") or []
    except metadata.PackageNotFoundError:
        pytest.skip("aiobotocore is not installed (the test extra brings it)")
    botocore = next(Requirement(r) for r in requires if Requirement(r).name == "botocore")
    boto3 = next(Requirement(r) for r in _extras()["test"] if Requirement(r).name == "boto3")
    assert boto3.specifier == botocore.specifier, (str(boto3), str(botocore))
    aiobotocore = next(Requirement(r) for r in _extras()["test"] if Requirement(r).name == "aiobotocore")
    assert aiobotocore.specifier.contains(metadata.version("aiobotocore"))
