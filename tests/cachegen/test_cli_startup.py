"""The command line starts fast: `--help`, `--version`, `info` and `verify` of a local npy cache and
the rejection of a bad option never import torch (seconds and a GB of memory on some machines);
`doctor` reports what a bug report needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachegen import __version__
from tests.cachegen.conftest import run_cli
from tests.conftest import make_npz

ROOT = Path(__file__).resolve().parents[2]
# Runs `cachegen ARGS` in a fresh interpreter and says, on exit (click exits through SystemExit),
# whether torch was imported.
_PROBE = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
from cachegen.cli import main
main(sys.argv[1:], prog_name="cachegen")
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder holding `cache`, a 2-epoch npy cache of a small .npz (built once for this file)."""
    folder = tmp_path_factory.mktemp("startup")
    source = make_npz(folder / "data.npz")[0]
    run_cli("build", source, "--out", folder / "cache", "--epochs", "2", "--shard-size", "50", "--workers", "1", "-q")
    return folder


def cachegen(*args, cwd: Path) -> tuple[int, str, bool]:
    """(exit code, output, whether torch was imported) of `cachegen ARGS` in a new process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    imported = done.stderr.strip().splitlines()[-1]
    assert imported.startswith("torch imported:"), done.stderr
    return done.returncode, done.stdout + done.stderr, imported.endswith("True")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["build", "--help"], ["info", "cache"],
                                  ["info", "cache", "--json"], ["verify", "cache"],
                                  ["build", "--epochs", "0"], ["build", "--transform", "cifr"],
                                  ["build", "--size", "-3"], ["info", "missing"]])
def test_no_torch_for_help_info_verify_or_a_bad_option(folder, args):
    code, output, imported = cachegen(*args, cwd=folder)
    assert not imported, f"`cachegen {' '.join(args)}` imported torch:\n{output}"
    assert "Traceback" not in output
    assert code == (0 if args[-1] in ("--help", "--version", "cache", "--json") else 1), output


def test_the_probe_sees_torch_where_it_is_imported(folder, tmp_path):
    """The check above can fail: a command that needs torch (preview augments images) is seen."""
    code, output, imported = cachegen("preview", "cache", "--out", tmp_path / "grid.png", cwd=folder)
    assert code == 0 and imported, output


def test_version_is_the_package_version():
    result = run_cli("--version")
    assert result.output.strip() == f"cachegen, version {__version__}"


def test_pyproject_takes_its_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cachegen.__version__"}


def test_bad_transform_suggests_the_preset_meant(tmp_path):
    code, output, _ = cachegen("build", "--transform", "cifr", cwd=tmp_path)
    assert code == 1 and "unknown --transform 'cifr' (did you mean cifar?)" in output
    code, output, _ = cachegen("build", "--transform", "qqq", cwd=tmp_path)
    assert code == 1 and "did you mean" not in output and "unknown --transform 'qqq'" in output


def test_doctor_reports_versions_machine_and_the_cache(folder):
    root = folder / "cache"
    text = run_cli("doctor", root).output
    for label in ("cachegen", "packages", "gpu", "cores", "memory", "disk", "cache"):
        assert any(line.startswith(label) for line in text.splitlines()), (label, text)
    report = json.loads(run_cli("doctor", root, "--json").output)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert report["cache"]["is_cache"] and report["cache"]["bytes"] == size
    assert report["packages"]["numpy"] == __import__("numpy").__version__
    assert report["cores"]["usable"] == len(os.sched_getaffinity(0))
    assert 0 < report["cache"]["disk"]["free"] <= report["cache"]["disk"]["total"]
    if Path("/proc/meminfo").exists():
        assert 0 < report["memory"]["available"] <= report["memory"]["total"]
        assert f"{size / 1e6:.1f} MB, " in text.splitlines()[-1]  # the cache against memory and the page cache


def test_doctor_without_a_cache_says_so(tmp_path):
    text = run_cli("doctor", tmp_path).output
    assert "holds no cachegen cache" in text.splitlines()[-1]
    assert "free of" in text


@pytest.mark.parametrize("command, advice", [("build", True), ("info", False), ("bench", False)])
def test_only_an_interrupted_build_is_told_to_resume(command, advice, capsys):
    from cachegen.cli import _one_line_errors

    def interrupted():
        raise KeyboardInterrupt
    interrupted.__name__ = command  # as the Click command of that name
    with pytest.raises(SystemExit) as ended:
        _one_line_errors(interrupted)()
    said = capsys.readouterr().err.strip()
    assert ended.value.code == 130 and said.startswith("cachegen: interrupted")
    assert ("resume" in said) is advice, said
