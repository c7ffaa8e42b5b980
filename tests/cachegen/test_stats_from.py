"""`cachegen build --stats-from TRAIN_CACHE`: a val cache normalised with its train cache's mean/std."""

from __future__ import annotations

from readers import CachedLoader
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli
from tests.conftest import make_npz

COMMON = ("--workers", "1", "--quiet", "--shard-size", "50")


def test_val_cache_takes_the_train_caches_statistics(tmp_path):
    train_src = make_npz(tmp_path / "train.npz", n=120, seed=1)[0]
    val_src = make_npz(tmp_path / "val.npz", n=60, seed=2)[0]
    run_cli("build", train_src, "--out", tmp_path / "train", "--epochs", "2", *COMMON)
    run_cli("build", val_src, "--out", tmp_path / "own", "--transform", "val", *COMMON)
    run_cli("build", val_src, "--out", tmp_path / "val", "--transform", "val", "--stats-from", tmp_path / "train",
            *COMMON)
    train, own, val = manifest(tmp_path / "train"), manifest(tmp_path / "own"), manifest(tmp_path / "val")
    assert own["mean"] != train["mean"]  # the val images' own statistics differ
    assert (val["mean"], val["std"]) == (train["mean"], train["std"])
    assert val["stats_from"] == str(tmp_path / "train")
    assert "ok: 2 shards verified" in run_cli("verify", tmp_path / "val").output
    loader = CachedLoader(tmp_path / "val", batch_size=8, device="cpu")
    assert list(loader.mean) == train["mean"] and list(loader.std) == train["std"]


def test_stats_from_refuses_what_is_not_a_cache_or_other_channels(tmp_path):
    rgb = make_npz(tmp_path / "rgb.npz", n=40)[0]
    gray = make_npz(tmp_path / "gray.npz", n=40, channels=0)[0]
    run_cli("build", gray, "--out", tmp_path / "gray", *COMMON)
    (tmp_path / "empty").mkdir()
    for train, fragments in ((tmp_path / "empty", ("--stats-from", "is not a cache: no manifest.json")),
                             (tmp_path / "missing", ("--stats-from", "is not a cache")),
                             (tmp_path / "gray", ("1-channel images, this cache's have 3",))):
        result = run_cli("build", rgb, "--out", tmp_path / "val", "--stats-from", train, *COMMON, expect=1)
        assert_one_line_error(result, *fragments)
        assert not (tmp_path / "val" / "manifest.json").exists()
