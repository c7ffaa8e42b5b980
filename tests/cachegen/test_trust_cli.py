"""`cachegen preview`, `bench` and `info` on a cache that names code: nothing of it runs without
--trust-code (in-process through Click, and as a real `python -m cachegen` in the cache's folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from malicious import evil, evil_caches  # noqa: F401  (fixtures)
from tests.cachegen.conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
FAST = ("--images", "64", "--min-seconds", "0", "--warmup", "0", "--batch-size", "32", "--workers", "1")


def test_preview_without_trust_code_runs_nothing(evil, tmp_path, monkeypatch):
    monkeypatch.chdir(evil.live)
    monkeypatch.syspath_prepend(str(evil.live))  # importable, and still not imported
    result = run_cli("preview", ".", "--out", tmp_path / "grid.png", expect=1)
    assert_one_line_error(result, "factory 'evil:make'", "would import and run it", "--trust-code")
    assert evil.ran() == [] and "evil" not in sys.modules and not (tmp_path / "grid.png").exists()


def test_preview_with_trust_code_runs_the_factory(evil, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(evil.live))  # where the trusted module is found: sys.path
    result = run_cli("preview", evil.live, "--out", tmp_path / "grid.png", "--samples", "3", "--trust-code")
    assert "3 samples x 3 columns" in result.output and (tmp_path / "grid.png").is_file()
    assert evil.ran() == ["IMPORTED", "CALLED"]


def test_preview_of_a_cached_cache_needs_no_trust(evil, tmp_path):
    run_cli("preview", evil.cached, "--out", tmp_path / "grid.png", "--samples", "2")
    assert evil.ran() == []


def test_bench_without_trust_code_runs_nothing(evil, monkeypatch):
    monkeypatch.chdir(evil.cached)
    monkeypatch.syspath_prepend(str(evil.cached))
    result = run_cli("bench", ".", *FAST, expect=1)
    assert_one_line_error(result, "factory 'evil:make'", "--trust-code")
    assert evil.ran() == [] and "evil" not in sys.modules


def test_bench_with_trust_code_measures_every_row(evil, monkeypatch):
    monkeypatch.syspath_prepend(str(evil.cached))
    data = json.loads(run_cli("bench", evil.cached, *FAST, "--json", "--trust-code").stdout)
    in_process_twice = 2 if torch.get_num_threads() > 1 else 0  # CachedLoader and batched rows: also 1 thread
    assert len(data["rows"]) == 6 + in_process_twice and all(row["images"] >= 64 for row in data["rows"])
    assert evil.ran() == ["IMPORTED", "CALLED"]


def test_info_shows_the_factory_and_its_hash(evil):
    recorded = json.loads((evil.live / "manifest.json").read_text())["transform"]["factory_sha256"]
    output = run_cli("info", evil.live).output
    assert f"factory    evil:make  sha256 {recorded}" in output and "--trust-code" in output
    assert evil.ran() == []


@pytest.mark.parametrize("command", [["preview", "."], ["bench", ".", *FAST]])
def test_a_real_cachegen_in_the_cache_folder_refuses_in_one_line(evil, command):
    """The factory the manifest names is not imported, though `python -m` makes it importable.

    This is no claim that `python -m cachegen` is safe in a folder you do not trust: Python puts
    the working directory first on sys.path for `-m` (and `-c`), so a `click.py` or `torch.py`
    there would run before cachegen does (see the test below). Run the `cachegen` command instead."""
    cache = evil.live if command[0] == "preview" else evil.cached
    done = subprocess.run([sys.executable, "-m", "cachegen", *command], cwd=cache, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "factory 'evil:make'" in lines[0], done.stderr
    assert "--trust-code" in lines[0] and "Traceback" not in done.stderr
    assert evil.ran() == []


def test_python_m_cachegen_runs_a_module_the_cache_folder_holds_the_cachegen_command_does_not(evil, tmp_path):
    """Python's own behaviour, shown rather than hidden: `python -m cachegen` in a folder holding a
    `click.py` imports it (the working directory is first on sys.path); the `cachegen` command's
    sys.path starts with its own folder, and never imports it."""
    import shutil

    folder = tmp_path / "downloaded"
    shutil.copytree(evil.cached, folder)
    marker = tmp_path / "marker"
    (folder / "click.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(9)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "cachegen", "info", "."], cwd=folder, capture_output=True, text=True,
                          env=env, timeout=120)
    assert marker.exists() and done.returncode == 9  # the shadow ran: Python's doing, not cachegen's
    marker.unlink()
    command = [sys.executable, "-c", "import sys; sys.path.remove(''); from cachegen.cli import main; main()",
               "info", "."]  # as the console script starts: its folder first, not the working directory
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env, timeout=120)
    assert not marker.exists() and done.returncode == 0, done.stderr


_SPAWN_BUILD = """
import multiprocessing, sys
from cachegen.cli import main
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    main(["build", sys.argv[1], "--out", sys.argv[2], "--workers", "2", "--epochs", "1", "--shard-size", "50",
          "--quiet"])
"""


def test_the_builds_spawned_workers_import_nothing_from_the_working_directory(tmp_path):
    """A program that builds with spawn workers, run in a folder holding a `multiprocessing.py`: each
    worker is a fresh `python -c` whose first import is multiprocessing; not that one."""
    from tests.conftest import make_npz

    source = make_npz(tmp_path / "src.npz", n=100)[0]
    folder = tmp_path / "here"
    folder.mkdir()
    marker = tmp_path / "marker"
    (folder / "multiprocessing.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise ImportError('shadow')\n")
    (tmp_path / "build.py").write_text(_SPAWN_BUILD)
    done = subprocess.run([sys.executable, str(tmp_path / "build.py"), str(source), str(tmp_path / "out")], cwd=folder,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert not marker.exists(), done.stderr[-2000:]
    assert done.returncode == 0 and (tmp_path / "out" / "manifest.json").is_file(), done.stderr[-2000:]
