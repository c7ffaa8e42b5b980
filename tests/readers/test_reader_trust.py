"""A cache is data: no reader imports or calls the code a manifest names unless the user says so
(trust_code=True, or factory= their own copy of it), and none puts the current folder on sys.path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from loader_checks import SAMPLES, epoch_batches
from malicious import evil, evil_caches  # noqa: F401  (fixtures)
from readers import CacheDataset, CachedLoader, LiveLoader, ReaderError, open_loader

OPTIONS = dict(batch_size=32, seed=3, device="cpu", normalize=False)
READERS = {
    "LiveLoader": lambda cache, **kw: LiveLoader(cache, workers=0, **OPTIONS, **kw),
    "open_loader": lambda cache, **kw: open_loader(cache, workers=0, **OPTIONS, **kw),
    "CacheDataset": lambda cache, **kw: CacheDataset(cache, epoch=1, **kw),
}


@pytest.fixture
def no_cwd_on_path(monkeypatch):
    """sys.path without '' or '.': the current folder is importable only if a reader put it there."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _one_line_refusal(error: ReaderError, spec: str) -> None:
    message = str(error)
    assert "\n" not in message and f"factory {spec!r}" in message, message
    assert "would import and run it" in message and "trust_code=True" in message and "factory=" in message


@pytest.mark.parametrize("importable", [False, True])
@pytest.mark.parametrize("reader", READERS)
def test_opening_a_cache_beside_its_module_imports_nothing(evil, reader, importable, monkeypatch, no_cwd_on_path):
    monkeypatch.chdir(evil.live)  # cd cache; python -c "open_loader('.')"
    if importable:  # as it is for `python -c` or a notebook started in that folder
        monkeypatch.syspath_prepend(str(evil.live))
    path = list(sys.path)
    with pytest.raises(ReaderError) as refused:
        READERS[reader](".")
    _one_line_refusal(refused.value, "evil:make")
    assert evil.ran() == [] and "evil" not in sys.modules and sys.path == path


def test_a_cached_cache_naming_a_factory_reads_without_trust_and_runs_nothing(evil, monkeypatch):
    monkeypatch.chdir(evil.cached)
    assert len(epoch_batches(CachedLoader(".", **OPTIONS), 1)) == 4
    assert len(epoch_batches(open_loader(".", **OPTIONS), 0)) == 4 and len(CacheDataset(".", epoch=1)) == 120
    assert evil.ran() == []


@pytest.mark.parametrize("spec", ["builtins:print", "os:kill", "OUTSIDE:make"])
def test_a_manifest_naming_any_callable_or_file_is_refused(evil, spec, tmp_path, monkeypatch, capfd):
    outside = tmp_path / "elsewhere" / "outside.py"  # a working factory outside the cache, marking tmp_path
    outside.parent.mkdir()
    shutil.copy(evil.live / "evil.py", outside)
    spec = spec.replace("OUTSIDE", str(outside))
    cache = evil.with_spec(spec, tmp_path / "cache")
    killed = []
    monkeypatch.setattr(os, "kill", lambda *args: killed.append(args))  # os:kill would be kill(epoch, epochs)
    for reader in READERS.values():
        with pytest.raises(ReaderError) as refused:
            reader(cache)
        _one_line_refusal(refused.value, spec)
    assert killed == [] and capfd.readouterr().out == ""  # builtins:print would print "0 2"
    assert not (tmp_path / "IMPORTED").exists() and evil.ran() == []


def test_trusted_an_outside_file_factory_runs_as_before(evil, tmp_path):
    outside = tmp_path / "elsewhere" / "outside.py"
    outside.parent.mkdir()
    shutil.copy(evil.live / "evil.py", outside)  # the same source: the recorded sha256 matches
    cache = evil.with_spec(f"{outside}:make", tmp_path / "cache")
    batches = epoch_batches(LiveLoader(cache, workers=0, trust_code=True, **OPTIONS), 1)
    assert _same(batches, epoch_batches(CachedLoader(evil.cached, **OPTIONS), 1))
    assert (tmp_path / "IMPORTED").exists() and (tmp_path / "CALLED").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_trusted_a_live_cache_gives_its_cached_builds_batches(evil, workers, monkeypatch):
    monkeypatch.syspath_prepend(str(evil.live))  # where the module the user trusts is importable from
    with LiveLoader(evil.live, workers=workers, trust_code=True, **OPTIONS) as live:
        cached = CachedLoader(evil.cached, **OPTIONS)
        for epoch in (0, 1):
            assert _same(epoch_batches(live, epoch), epoch_batches(cached, epoch)), epoch
    assert evil.ran() == ["IMPORTED", "CALLED"]
    image, label = CacheDataset(evil.live, epoch=1, trust_code=True)[0]
    assert image.shape == (3, 32, 32)


def test_trusted_a_module_is_still_not_looked_for_in_the_current_folder(evil, monkeypatch, no_cwd_on_path):
    monkeypatch.chdir(evil.live)
    path = list(sys.path)
    with pytest.raises(ReaderError, match=r"not on sys.path \(a reader does not look in the current folder\): "
                                          "add the module's folder to PYTHONPATH"):
        LiveLoader(".", workers=0, trust_code=True, **OPTIONS)
    assert evil.ran() == [] and sys.path == path


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_factory_passed_by_hand_is_checked_against_the_recorded_sha256(evil, tmp_path):
    mine = tmp_path / "mine" / "my_augs.py"  # the user's own copy of the code (it marks tmp_path)
    mine.parent.mkdir()
    shutil.copy(evil.live / "evil.py", mine)
    make = _load(mine, "my_augs_for_trust_test").make
    live = LiveLoader(evil.live, workers=0, factory=make, **OPTIONS)
    assert _same(epoch_batches(live, 1), epoch_batches(CachedLoader(evil.cached, **OPTIONS), 1))
    assert evil.ran() == []  # the cache's copy was never imported: the user's was
    edited = tmp_path / "mine" / "edited_augs.py"
    edited.write_text(mine.read_text() + "\n# edited\n")
    with pytest.raises(ReaderError, match="is not the factory .* was built with"):
        LiveLoader(evil.live, workers=0, factory=_load(edited, "edited_augs_for_trust_test").make, **OPTIONS)


def test_trust_code_must_be_a_bool(evil):
    with pytest.raises(ValueError, match="trust_code must be True or False"):
        LiveLoader(evil.live, workers=0, trust_code="yes", **OPTIONS)


@pytest.fixture
def live_copy_folder(source, tmp_path) -> Path:
    """A live cache (cifar preset: no code to trust) of the readers' source, 1 epoch."""
    from click.testing import CliRunner

    from cachegen.cli import main

    out = tmp_path / "live"
    result = CliRunner().invoke(main, ["build", str(source[0]), "--out", str(out), "--mode", "live", "--epochs", "1",
                                       "--shard-size", "100", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


_MARKER = '''
import os
open(os.environ["MARKER"], "w").write("imported from the working directory")
raise ImportError("a shadow module in the cache folder")
'''
_TRAIN = '''
import multiprocessing, sys
from readers import LiveLoader
if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    loader = LiveLoader(".", batch_size=16, device="cpu", workers=1)
    print(sum(len(y) for _, y in loader))
'''


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_live_workers_import_nothing_from_the_working_directory(live_copy_folder, tmp_path, method):
    """A training script run in the cache folder that starts workers by spawn or forkserver: each
    worker is a fresh `python -c` (which puts the working directory first on sys.path) whose first
    import is multiprocessing; the cache's own `multiprocessing.py` must not be it."""
    import subprocess
    import sys

    cache = live_copy_folder
    (cache / "multiprocessing.py").write_text(_MARKER)
    (tmp_path / "train.py").write_text(_TRAIN)
    marker = tmp_path / "marker"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(tmp_path / "train.py"), method], cwd=cache, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root), "MARKER": str(marker)})
    assert not marker.exists(), done.stderr[-2000:]
    assert done.returncode == 0 and done.stdout.split() == [str(SAMPLES)], done.stderr[-2000:]
