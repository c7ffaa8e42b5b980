"""What a user meets once the first build works: the tools find a cache's source from any folder,
a moved source is pointed at with --source, bench reads a folder of mixed sizes; every piece of
advice an error gives is followed here and works."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from readers.errors import ReaderError
from tests.cachegen.conftest import assert_one_line_error, run_cli, shard_bytes

FAST = ("--images", "64", "--min-seconds", "0", "--warmup", "0", "--batch-size", "32", "--workers", "1")


def make_folder(root, sizes=((40, 40),), per_class: int = 8, classes=("a", "b")):
    """An ImageFolder of PNGs, image i of each class at sizes[i % len(sizes)] (w, h)."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _folder_cache(tmp_path, monkeypatch, *extra, sizes=((40, 40),)):
    """A cache built from the folder `./data`, spelt relative, in tmp_path/work; returns tmp_path/work/cache."""
    work = tmp_path / "work"
    make_folder(work / "data", sizes)
    monkeypatch.chdir(work)
    run_cli("build", "data", "--out", "cache", "--epochs", "2", "--size", "32", "--workers", "1", "--quiet",
            "--shard-size", "8", *extra)
    return work / "cache"


def test_preview_from_another_folder_finds_the_source_and_a_moved_one_is_named(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch)
    recorded = json.loads((cache / "manifest.json").read_text())["source_spec"]
    assert recorded["spec"] == "data" and recorded["absolute"] == str(tmp_path / "work" / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_cli("preview", cache, "--out", "p.png", "--epochs", "2")
    assert "x 3 columns" in result.output  # the original beside the 2 epochs

    shutil.move(tmp_path / "work" / "data", tmp_path / "moved")
    result = run_cli("preview", cache, "--out", "p.png", "--epochs", "2")
    assert "x 2 columns" in result.output and "no 'original' column" in result.output
    assert "pass --source WHERE" in result.output
    result = run_cli("preview", cache, "--out", "p.png", "--epochs", "2", "--source", tmp_path / "moved")
    assert "x 3 columns" in result.output  # the advice followed
    assert_one_line_error(run_cli("preview", cache, "--source", tmp_path / "nowhere", expect=1), "does not exist")


def test_an_old_manifest_without_the_absolute_path_still_reads(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch)
    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    del m["source_spec"]["absolute"]
    path.write_text(json.dumps(m))
    result = run_cli("preview", cache, "--out", "p.png", "--epochs", "2")  # from the build's folder
    assert "x 3 columns" in result.output


def test_bench_from_another_folder_and_a_moved_source(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    data = json.loads(run_cli("bench", cache, *FAST, "--json").stdout)
    assert any(r["name"].startswith("cachegen LiveLoader") for r in data["rows"])
    shutil.move(tmp_path / "work" / "data", tmp_path / "moved")
    assert_one_line_error(run_cli("bench", cache, *FAST, expect=1), "is not at", "pass --source WHERE")
    data = json.loads(run_cli("bench", cache, *FAST, "--json", "--source", tmp_path / "moved").stdout)
    assert any(r["name"].startswith("online") for r in data["rows"])
    make_folder(tmp_path / "other", classes=("x", "y"))
    assert_one_line_error(run_cli("bench", cache, *FAST, "--source", tmp_path / "other", expect=1),
                          "has changed since the build")


def test_bench_of_a_folder_of_mixed_sizes_says_which_option_and_it_works(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch, sizes=((40, 40), (48, 36)))
    result = run_cli("bench", cache, *FAST, expect=1)
    assert_one_line_error(result, "cachegen bench --resize N", "--resize 32")
    data = json.loads(run_cli("bench", cache, *FAST, "--json", "--resize", "32").stdout)
    assert any(r["name"].startswith("cachegen LiveLoader") for r in data["rows"])


def test_bench_resize_is_refused_for_a_cache_with_its_own(tmp_path, monkeypatch):
    cache = _folder_cache(tmp_path, monkeypatch, "--resize", "36")
    assert_one_line_error(run_cli("bench", cache, *FAST, "--resize", "32", expect=1), "leave out --resize")


def _flip(path, at: int = 700) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-1024])


@pytest.mark.parametrize("damage", ["flipped shard", "truncated shard", "flipped index", "missing shard"])
def test_the_readers_advice_to_rerun_the_build_repairs_the_cache(build, damage):
    from readers import CachedLoader

    cache = build("--epochs", "2")
    before = shard_bytes(cache)
    shard = sorted(cache.glob("*/*.tar"))[1]
    {"flipped shard": lambda: _flip(shard), "truncated shard": lambda: _truncate(shard),
     "flipped index": lambda: _flip(shard.with_suffix(".idx"), at=-8),
     "missing shard": shard.unlink}[damage]()
    with pytest.raises(ReaderError, match="re-run the same `cachegen build`"):
        loader = CachedLoader(cache, batch_size=64, device="cpu", verify=True)
        for epoch in range(2):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
    result = run_cli("verify", cache, expect=1)
    assert "re-run the same `cachegen build` command" in result.output
    result = build("--epochs", "2")  # the advice, followed: the same command
    run_cli("verify", cache)
    assert shard_bytes(cache) == before


def test_a_rerun_says_it_resumes_and_names_what_it_writes_again(build, npz_source, tmp_path):
    cache = build("--epochs", "2")
    _flip(sorted(cache.glob("*/*.tar"))[0])
    result = run_cli("build", npz_source[0], "--out", cache, "--shard-size", "50", "--workers", "1", "--epochs", "2")
    total = len(list(cache.glob("*/*.tar")))
    assert f"resuming: {total - 1} of {total} shards already in" in result.output
    assert "1 shard(s) failed their check and are written again" in result.output
    result = run_cli("build", npz_source[0], "--out", cache, "--shard-size", "50", "--workers", "1", "--epochs", "2")
    assert f"resuming: {total} of {total} shards" in result.output and "nothing to write" in result.output


def test_a_cache_being_built_is_named_so_everywhere_with_its_builders_pid(slow_source, tmp_path):
    from readers import CachedLoader
    from tests.cachegen.test_overwrite import SLOW_ARGS, cachegen, finish, wait_for

    source, env = slow_source
    out, gate = tmp_path / "cache", tmp_path / "gate"
    gate.touch()  # holds the build at its first sample
    first = cachegen("build", source, "--out", out, "--workers", "1", *SLOW_ARGS, env={**env, "SLOW_AUG_GATE": str(gate)})
    try:
        lock = out / ".cachegen-lock"
        wait_for(first, lambda: lock.exists() and lock.read_text().strip() == str(first.pid))
        said = f"a cachegen build (pid {first.pid}) is writing it now"
        for command in (["info", out], ["verify", out], ["preview", out, "--out", tmp_path / "p.png"]):
            assert_one_line_error(run_cli(*command, expect=1), said, "wait for that build to end")
        with pytest.raises(ReaderError, match=re.escape(said)):
            CachedLoader(out, batch_size=8, device="cpu")
        assert f"is being built by a cachegen build (pid {first.pid}) now" in run_cli("doctor", out).output
        gate.unlink()
        rc, output = finish(first)
    finally:
        first.kill()
    assert rc == 0, output
    assert "holds no cachegen cache" not in run_cli("doctor", out).output
    run_cli("info", out)


def test_doctor_on_a_missing_path_exits_non_zero(tmp_path):
    assert_one_line_error(run_cli("doctor", tmp_path / "nope", expect=1), "does not exist", "cachegen doctor CACHE")


def test_split_test_is_refused_for_a_source_without_splits(npz_source, tmp_path):
    make_folder(tmp_path / "folder")
    for source in (npz_source[0], tmp_path / "folder"):
        result = run_cli("build", source, "--split", "test", "--out", tmp_path / "val", "--epochs", "1", expect=1)
        assert_one_line_error(result, "--split test picks a split of a torchvision dataset, the sample or a Hugging Face dataset",
                              "without --split")
        assert not (tmp_path / "val").exists()


def test_split_test_of_the_sample_is_its_test_images(tmp_path):
    run_cli("build", "--split", "test", "--transform", "val", "--out", tmp_path / "val", "--workers", "1", "--quiet")
    m = json.loads((tmp_path / "val" / "manifest.json").read_text())
    assert m["source"]["num_samples"] == 1000 and "(test)" in m["source"]["description"]


FACTORY = '''
from torchvision.transforms import v2


def make(epoch, epochs):
    return v2.RandomHorizontalFlip()
'''


def test_the_next_hint_after_a_live_build_with_a_factory_works_when_followed(npz_source, tmp_path):
    from readers import LiveLoader  # noqa: F401 - the hint's name, evaluated below

    (tmp_path / "aug.py").write_text(FACTORY)
    out = tmp_path / "live"
    result = run_cli("build", npz_source[0], "--mode", "live", "--transform", f"{tmp_path / 'aug.py'}:make",
                     "--out", out, "--epochs", "2", "--workers", "1")
    hint = result.output.strip().splitlines()[-1]
    assert hint.endswith(f"readers.LiveLoader('{out}', batch_size=256, trust_code=True)"), hint
    loader = eval(hint.split("read it with readers.")[1].replace("batch_size=256", "batch_size=256, workers=0"))
    images, labels = next(iter(loader))
    assert images.shape[0] == 240 and len(labels) == 240  # 240 samples: one batch


def test_info_on_a_cached_factory_cache_does_not_say_its_code_runs_on_reading(npz_source, tmp_path):
    (tmp_path / "aug.py").write_text(FACTORY)
    common = [npz_source[0], "--transform", f"{tmp_path / 'aug.py'}:make", "--epochs", "1", "--workers", "1", "--quiet"]
    run_cli("build", *common, "--out", tmp_path / "cached", "--mode", "cached")
    run_cli("build", *common, "--out", tmp_path / "live", "--mode", "live")
    cached = next(line for line in run_cli("info", tmp_path / "cached").output.splitlines() if line.startswith("factory"))
    assert "reading this cache runs none" in cached and "runs only with" not in cached
    live = next(line for line in run_cli("info", tmp_path / "live").output.splitlines() if line.startswith("factory"))
    assert "runs only with trust_code=True / --trust-code" in live


def test_the_command_summaries_are_whole():
    lines = run_cli("--help").output.split("Commands:")[1].strip().splitlines()
    assert len(lines) == 6 and not any(line.rstrip().endswith("...") for line in lines), lines


def test_a_build_larger_than_the_free_disk_is_refused_before_writing(tmp_path):
    import shutil as sh

    from cachegen.config import MAX_EPOCHS
    from tests.conftest import make_npz

    per_epoch = 24 * (512 * 512 * 3 + 1536)  # 24 images of 512x512x3, as npy in a tar
    epochs = 2 * sh.disk_usage(tmp_path).free // per_epoch + 1
    if epochs > MAX_EPOCHS:
        pytest.skip(f"this disk has more free space than {MAX_EPOCHS} epochs take")
    source = make_npz(tmp_path / "big.npz", n=24, size=512)[0]
    result = run_cli("build", source, "--out", tmp_path / "cache", "--epochs", epochs, "--mode", "cached",
                     "--workers", "1", expect=1)
    assert_one_line_error(result, "this build needs ~", "GB free", "--mode live")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_a_live_caches_advice_to_rerun_the_build_repairs_it(build, damage):
    from readers import open_loader

    cache = build("--epochs", "2", "--mode", "live")
    before = shard_bytes(cache)
    shard = sorted(cache.glob("*/*.tar"))[0]
    {"flipped": lambda: _flip(shard), "truncated": lambda: _truncate(shard), "missing": shard.unlink}[damage]()
    with pytest.raises(ReaderError, match="re-run the same `cachegen build`"):
        for _ in open_loader(cache, batch_size=64, device="cpu", workers=0, verify=True):
            pass
    build("--epochs", "2", "--mode", "live")  # the advice, followed
    run_cli("verify", cache)
    assert shard_bytes(cache) == before


def test_a_damaged_manifests_advice_to_overwrite_works(build):
    cache = build("--epochs", "2")
    before = shard_bytes(cache)
    (cache / "manifest.json").write_text("{not json")
    assert_one_line_error(run_cli("info", cache, expect=1), "rebuild the cache with `cachegen build --overwrite`")
    assert_one_line_error(build("--epochs", "2", expect=1), "--overwrite")  # a plain re-run says the same
    build("--epochs", "2", "--overwrite")
    run_cli("verify", cache)
    assert shard_bytes(cache) == before
