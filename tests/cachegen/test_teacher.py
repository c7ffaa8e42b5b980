"""Reinforced caches (`cachegen build --teacher`): what is stored is the teacher's top-K on the
images a reader gets back, the same bytes for any worker count, a plain WebDataset member, and a
bad teacher is a one-line error naming its factory."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from readers import CachedLoader, ReaderError, open_loader
from tests.cachegen.conftest import assert_one_line_error, run_cli, shard_bytes
from tests.conftest import make_npz

TEACHERS = '''
import os

import torch
from torch import nn


def make(classes=4):
    torch.manual_seed(int(os.environ.get("TEACHER_SEED", "0")))  # the same weights in every process that loads it
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, classes))


def seven():
    return make(7)


def not_a_module():
    return lambda x: x


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("teacher blew up")


def broken():
    return Broken()


def wrong_checkpoint():  # a checkpoint of another model: torch's error lists every key it missed
    model = make()
    model.load_state_dict({f"backbone.layer{i}.weight": torch.zeros(1) for i in range(300)})
    return model
'''


@pytest.fixture
def teachers(tmp_path):
    """`{name}` -> the --teacher spec of that factory in a file of TEACHERS."""
    path = tmp_path / "teachers.py"
    path.write_text(TEACHERS)
    return lambda name: f"{path}:{name}"


def rerun(spec: str, images: torch.Tensor) -> torch.Tensor:
    """The teacher's softmax on uint8 (B, C, H, W) images, loaded here as a user would."""
    module_path, _, name = spec.rpartition(":")
    sys.path.insert(0, str(module_path.rpartition("/")[0]))
    try:
        import teachers
        model = getattr(teachers, name)().eval()
    finally:
        sys.path.pop(0)
        sys.modules.pop("teachers", None)
    with torch.no_grad():
        return model(images.float() / 255).softmax(1)


@pytest.mark.parametrize("encoding", ["npy", "jpg"])
def test_stored_targets_are_the_teachers_top_k_on_the_images_read_back(build, teachers, encoding):
    cache = build("--epochs", "2", "--transform", "cifar", "--format", encoding, "--teacher", teachers("make"),
                  "--teacher-topk", "3")
    block = json.loads((cache / "manifest.json").read_text())["teacher"]
    assert (block["topk"], block["classes"], block["spec"], block["device"]) == (3, 4, teachers("make"), "cpu")
    assert len(block["factory_sha256"]) == 64
    assert f"reinforced: teacher {teachers('make')} top-3" in run_cli("info", cache).output
    for epoch in (0, 1):
        loader = CachedLoader(cache, batch_size=64, device="cpu", normalize=False, targets="teacher")
        loader.set_epoch(epoch)
        seen = 0
        for images, labels, teacher in loader:
            probs = rerun(teachers("make"), images)
            top = probs.topk(3, dim=1)
            expected = torch.zeros_like(probs).scatter_(1, top.indices, top.values.half().float())
            assert teacher.dtype == torch.float32 and teacher.shape == (len(labels), 4)
            # float16 precision: the stored values are the re-run ones rounded (ulp 2^-11 near 1).
            torch.testing.assert_close(teacher, expected, atol=1e-3, rtol=0)
            assert ((teacher > 0).sum(1) == 3).all()  # top-K only, zeros elsewhere
            seen += len(labels)
        assert seen == 240


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_same_bytes_for_one_and_two_workers(npz_source, teachers, tmp_path, augment_on):
    args = ["--epochs", "2", "--shard-size", "50", "--transform", "cifar", "--augment-on", augment_on,
            "--teacher", teachers("make"), "--quiet"]
    run_cli("build", npz_source[0], "--out", tmp_path / "one", "--workers", "1", *args)
    run_cli("build", npz_source[0], "--out", tmp_path / "two", "--workers", "2", *args)
    one, two = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert one == two and len(one) == 2 * 2 * 5
    plain = tmp_path / "plain"
    run_cli("build", npz_source[0], "--out", plain, "--workers", "1", *args[:-3], "--quiet")
    # The images are the plain cache's, sample for sample: the teacher only adds a member.
    for epoch in (0, 1):
        a = CachedLoader(plain, batch_size=50, device="cpu", normalize=False, shuffle=False)
        b = CachedLoader(tmp_path / "one", batch_size=50, device="cpu", normalize=False, shuffle=False,
                         targets="teacher")
        a.set_epoch(epoch), b.set_epoch(epoch)
        for (x, y), (u, v, _) in zip(a, b, strict=True):
            assert torch.equal(x, u) and torch.equal(y, v)


def test_webdataset_reads_the_teacher_member(build, teachers):
    wds = pytest.importorskip("webdataset")
    cache = build("--epochs", "1", "--transform", "cifar", "--teacher", teachers("make"))
    loader = CachedLoader(cache, batch_size=50, device="cpu", normalize=False, shuffle=False, targets="teacher")
    from_loader = torch.cat([t for _, _, t in loader])
    shards = sorted(str(p) for p in (cache / "epoch-0000").glob("*.tar"))
    rows = []
    for sample in wds.WebDataset(shards, shardshuffle=False).decode():
        records = sample["teacher.npy"]  # a standard .npy: np.load through webdataset's decoder
        assert records.dtype.names == ("class", "prob") and records.shape == (4,)
        assert (np.diff(records["prob"].astype(np.float32)) <= 0).all()  # highest first
        row = np.zeros(4, np.float32)
        row[records["class"]] = records["prob"]
        rows.append(row)
        assert sample["npy"].shape == (32, 32, 3) and int(sample["cls"]) in range(4)
    assert torch.equal(torch.from_numpy(np.stack(rows)), from_loader)


@pytest.mark.parametrize(("factory", "fragments"), [
    ("seven", ["gave [2, 7]", "not (batch, 4) logits", "4 classes"]),
    ("not_a_module", ["returned function, not a torch.nn.Module"]),
    ("broken", ["failed", "RuntimeError: teacher blew up"]),
    ("missing", ["has no callable 'missing'"]),
])
def test_a_bad_teacher_is_one_line_naming_its_factory(build, teachers, factory, fragments):
    result = build("--epochs", "1", "--teacher", teachers(factory), expect=1)
    assert_one_line_error(result, teachers(factory), *fragments)


def test_a_teacher_with_a_wrong_checkpoint_is_a_short_line(build, teachers):
    result = build("--epochs", "1", "--teacher", teachers("wrong_checkpoint"), expect=1)
    assert_one_line_error(result, "RuntimeError: Error(s) in loading state_dict", "does the checkpoint match")
    assert len(result.output) < 800, len(result.output)


def test_a_module_that_is_not_there_and_a_live_cache_are_one_line(build, teachers):
    assert_one_line_error(build("--teacher", "no_such_module_here:make", expect=1),
                          "cannot import module 'no_such_module_here' for --teacher")
    assert_one_line_error(build("--teacher", "nocolon", expect=1), "bad --teacher 'nocolon'")
    assert_one_line_error(build("--mode", "live", "--teacher", teachers("make"), expect=1),
                          "teacher would run at read time", "--mode cached")
    assert_one_line_error(build("--mode", "auto", "--max-cache-gb", "0.0001", "--teacher", teachers("make"),
                                expect=1), "--mode auto chose a live cache", "--teacher")
    assert_one_line_error(build("--teacher-topk", "0", "--teacher", teachers("make"), expect=1),
                          "--teacher-topk must be at least 1")


def test_resume_and_growth_keep_the_teacher_and_another_teacher_is_refused(build, teachers, tmp_path, monkeypatch):
    args = ("--transform", "cifar", "--teacher", teachers("make"))
    cache = build("--epochs", "1", *args)
    before = shard_bytes(cache)
    # An interrupted build: the manifest not written yet and one index lost (the shard is indexed again).
    (cache / "epoch-0000" / "shard-000001.idx").unlink()
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").unlink()
    (cache / ".cachegen-build.json").write_text(json.dumps({k: v for k, v in manifest.items()
                                                             if k not in ("epochs", "epoch_list")}))
    build("--epochs", "2", *args)
    after = shard_bytes(cache)
    assert {k: after[k] for k in before} == before and len(after) == 2 * 2 * 5
    fresh = build("--epochs", "2", *args, out=tmp_path / "fresh")
    assert shard_bytes(fresh) == after
    result = build("--epochs", "2", "--transform", "cifar", "--teacher", teachers("make"), "--teacher-topk", "2",
                   expect=1)
    assert_one_line_error(result, "holds a different cache", "teacher")
    assert_one_line_error(build("--epochs", "2", "--transform", "cifar", expect=1), "holds a different cache", "teacher")
    monkeypatch.setenv("TEACHER_SEED", "1")  # retrained: the same factory file, other weights
    assert_one_line_error(build("--epochs", "2", *args, expect=1), "holds a different cache", "weights_sha256")


def test_a_teacher_file_named_from_another_folder_is_the_same_cache(build, teachers, tmp_path, monkeypatch):
    """The manifest names a teacher's file by its absolute path: a relative name from the cache's
    folder and the absolute one from elsewhere grow the same cache."""
    monkeypatch.chdir(tmp_path)
    cache = build("--epochs", "1", "--transform", "cifar", "--teacher", "./teachers.py:make")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    build("--epochs", "2", "--transform", "cifar", "--teacher", teachers("make"))
    m = json.loads((cache / "manifest.json").read_text())
    assert m["epochs"] == 2 and m["teacher"]["spec"] == teachers("make")


def test_a_cache_recorded_with_a_relative_teacher_file_grows_from_its_folder(build, teachers, tmp_path, monkeypatch):
    """A manifest written before teacher files were recorded by absolute path names `./teachers.py:make`:
    the same command, from the same folder, still grows that cache."""
    monkeypatch.chdir(tmp_path)
    cache = build("--epochs", "1", "--transform", "cifar", "--teacher", "./teachers.py:make")
    for name in ("manifest.json", ".cachegen-build.json"):
        if (cache / name).exists():
            m = json.loads((cache / name).read_text())
            m["teacher"]["spec"] = "./teachers.py:make"  # as the build recorded it then
            (cache / name).write_text(json.dumps(m))
    build("--epochs", "2", "--transform", "cifar", "--teacher", "./teachers.py:make")
    assert json.loads((cache / "manifest.json").read_text())["epochs"] == 2


def test_a_factory_giving_other_weights_in_another_process_is_refused(teachers):
    """A spawned or Dask worker loads the teacher afresh: with other weights (an unseeded random
    initialisation) it refuses to write targets that would differ between processes."""
    from cachegen.teacher import probe_teacher

    probed = probe_teacher(teachers("make"), 10, 4, (32, 32, 3), "npy")
    code = ("import sys; from cachegen.teacher import load_teacher; from cachegen.errors import CachegenError\n"
            "try:\n    load_teacher(sys.argv[1], weights=sys.argv[2])\n"
            "except CachegenError as e:\n    sys.exit(str(e))")
    for seed, refused in (("0", False), ("1", True)):
        done = subprocess.run([sys.executable, "-c", code, teachers("make"), probed.weights], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "TEACHER_SEED": seed,
                                                          "PYTHONPATH": str(Path(__file__).parents[2])})
        assert (done.returncode != 0) == refused, done.stderr
        assert ("returned other weights in this process" in done.stderr) == refused


def test_readers_refuse_teacher_targets_a_cache_does_not_have(build, teachers, tmp_path):
    plain = build("--epochs", "1")
    with pytest.raises(ReaderError, match="has no teacher targets.*cachegen build --teacher"):
        CachedLoader(plain, batch_size=8, device="cpu", targets="teacher")
    with pytest.raises(ValueError, match="targets must be one of"):
        CachedLoader(plain, batch_size=8, device="cpu", targets="soft")
    live = build("--epochs", "1", "--mode", "live", out=tmp_path / "live")
    with pytest.raises(ReaderError, match="live cache: it has no teacher targets"):
        open_loader(live, batch_size=8, device="cpu", targets="teacher")


def _damage(cache, edit) -> None:
    """Rewrite sample 0's teacher member of epoch 0's first shard in place with edit(records)."""
    from cacheformat.teacher import header, member_starts
    index = np.load(cache / "epoch-0000" / "shard-000000.idx")
    start = int(member_starts(index[:1, 0], index[:1, 1])[0])
    path = cache / "epoch-0000" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    size = len(header(4)) + 4 * 6
    records = np.load(io.BytesIO(bytes(data[start:start + size])))
    edit(records)
    data[start:start + size] = header(4) + records.tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda r: r.__setitem__("class", 9), "teacher classes run .* outside the 4 classes"),
    (lambda r: r.__setitem__("prob", np.float16(np.nan)), "teacher probabilities outside"),
])
def test_damaged_teacher_numbers_are_a_reader_error(build, teachers, tmp_path, edit, match):
    cache = build("--epochs", "1", "--teacher", teachers("make"))
    copy = shutil.copytree(cache, tmp_path / "copy")
    _damage(copy, edit)
    loader = CachedLoader(copy, batch_size=50, device="cpu", shuffle=False, targets="teacher")
    with pytest.raises(ReaderError, match=match):
        list(loader)
    labels_only = CachedLoader(copy, batch_size=50, device="cpu", shuffle=False)
    assert sum(len(y) for _, y in labels_only) == 240  # the images and labels are untouched
    assert run_cli("verify", cache).output.startswith("ok: 5 shards")
    result = run_cli("verify", copy, expect=1)  # checksums first: the shard's sha256 no longer matches
    assert "shard-000000.tar: sha256 mismatch" in result.output and "1 of 5 shards are bad" in result.output
    _rehash(copy, "epoch-0000/shard-000000.tar")  # damage whose checksum was rewritten: the numbers themselves
    result = run_cli("verify", copy, expect=1)
    assert "shard-000000.tar: sample e0000_" in result.output and ": teacher " in result.output
    assert "1 of 5 shards are bad" in result.output


def _rehash(cache, relpath: str) -> None:
    """Record the shard's current sha256 in the manifest, as if whoever damaged it covered the tracks."""
    import hashlib

    manifest = json.loads((cache / "manifest.json").read_text())
    digest = hashlib.sha256((cache / relpath).read_bytes()).hexdigest()
    for entry in manifest["epoch_list"]:
        for shard in entry["shards"]:
            if shard["path"] == relpath:
                shard["sha256"] = digest
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_teacher_run_in_this_process_gives_the_bytes_the_workers_give(npz_source, teachers, tmp_path, workers,
                                                                         gpu_hidden):
    """--device cpu: this process augments each shard and runs the teacher on it (as it does on a
    GPU with --device cuda); the same bytes as the workers' own, whatever the worker count."""
    args = [npz_source[0], "--epochs", "2", "--shard-size", "50", "--transform", "cifar", "--augment-on", "device",
            "--teacher", teachers("make"), "--quiet"]
    run_cli("build", *args, "--out", tmp_path / "workers", "--workers", "2")
    run_cli("build", *args, "--out", tmp_path / "here", "--workers", workers, "--device", "cpu")
    assert shard_bytes(tmp_path / "here") == shard_bytes(tmp_path / "workers")


def test_stored_targets_ignore_the_callers_autocast_and_precision(npz_source, teachers, tmp_path):
    """A build run from a training script (this process runs the teacher with --device): its bf16
    autocast and reduced-precision float32 kernels must not reach the teacher's targets."""
    args = [npz_source[0], "--epochs", "1", "--shard-size", "50", "--transform", "cifar", "--augment-on", "device",
            "--device", "cpu", "--workers", "1", "--teacher", teachers("make"), "--quiet"]
    run_cli("build", *args, "--out", tmp_path / "plain")
    knob = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    saved = getattr(knob, "fp32_precision", None)
    try:
        if saved is not None:
            knob.fp32_precision = "bf16"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run_cli("build", *args, "--out", tmp_path / "under")
            assert torch.is_autocast_enabled("cpu")
    finally:
        if saved is not None:
            knob.fp32_precision = saved
    assert shard_bytes(tmp_path / "under") == shard_bytes(tmp_path / "plain")


@pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)
@pytest.mark.parametrize("encoding", ["npy", "jpg"])  # jpg: the teacher sees the rows decoded again on the host
def test_a_teacher_on_cuda_stores_its_top_k_deterministically(npz_source, teachers, tmp_path, encoding):
    args = [npz_source[0], "--epochs", "2", "--shard-size", "50", "--transform", "cifar", "--augment-on", "device",
            "--device", "cuda", "--teacher", teachers("make"), "--format", encoding, "--quiet"]
    run_cli("build", *args, "--out", tmp_path / "one", "--workers", "1")
    run_cli("build", *args, "--out", tmp_path / "two", "--workers", "2")
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["teacher"]["device"] == "cuda"
    loader = CachedLoader(tmp_path / "one", batch_size=64, device="cuda", normalize=False, targets="teacher")
    for images, _, teacher in loader:
        assert teacher.device.type == "cuda"
        probs = rerun(teachers("make"), images.cpu())
        torch.testing.assert_close(teacher.cpu(), torch.zeros_like(probs).scatter_(1, probs.topk(4).indices,
                                   probs.topk(4).values), atol=2e-3, rtol=0)


@pytest.mark.cuda
def test_the_teacher_queues_a_shard_on_the_gpu_without_waiting(teachers):
    """The GPU build's teacher: a shard's batches queued with no synchronising call (torch raises on
    one in sync debug mode), its members read after the one wait, as the host path gives them."""
    from cachegen.teacher import probe_teacher, queue_members, teacher_members

    device = torch.device("cuda", torch.cuda.current_device())
    teacher = probe_teacher(teachers("make"), 3, 4, (32, 32, 3), "npy", device)
    rows = np.random.default_rng(5).integers(0, 256, (150, 32, 32, 3), dtype=np.uint8)  # 3 teacher batches
    images = torch.from_numpy(rows).to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        members = queue_members(teacher, images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert members() == teacher_members(teacher, rows, device)


def test_a_dask_build_with_a_teacher_is_byte_identical_to_a_local_build(dask_cluster, teachers, tmp_path):
    """The cluster's worker processes load the teacher themselves (checked against the weights the
    client probed) and write the same targets as the local workers."""
    from tests.cachegen.test_dask import dask_build, local_build, tree

    source = make_npz(tmp_path / "data.npz", n=120, size=16)[0]
    common = [str(source), "--epochs", "2", "--shard-size", "25", "--transform", "cifar", "--teacher", teachers("make")]
    local_build([*common, "--out", str(tmp_path / "local")])
    run = dask_build([*common, "--out", str(tmp_path / "dask")], dask_cluster.address)
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out
    assert tree(tmp_path / "dask") == tree(tmp_path / "local")
