"""Bad input, fuzzed with hypothesis: CLI arguments, source folders, .npz arrays, edited manifests.

Every run ends in success (a cache `verify` passes), a documented skip (`--on-error skip`, counted),
or a one-line error; never a traceback, a warning on the terminal or a hang. The default run tries
a few examples of each, derandomized; `pytest -m slow` tries many, afresh each time.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import struct
import sys
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from cachegen.cli import main
from tests.cachegen.conftest import assert_one_line_error, manifest, run_cli
from tests.conftest import make_npz

FAST = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def slow(examples: int):
    """The long variant: `examples` fresh examples (not derandomized), under `pytest -m slow`."""
    def mark(test):
        return pytest.mark.slow(settings(max_examples=examples, deadline=None, database=None,
                                         suppress_health_check=[HealthCheck.too_slow])(test))
    return mark


HANG_SECONDS = 120  # far more than any example needs: past it, a command is stuck


def _hung(signum, frame):
    raise TimeoutError(f"no answer in {HANG_SECONDS}s: a hang")


def invoke(*args) -> object:
    """`cachegen ARGS` in-process; any warning raised on the way fails the test (a user would see
    it), and so does a hang (SIGALRM interrupts it: CliRunner reports a TimeoutError)."""
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(HANG_SECONDS)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert not shown, f"warnings: {[str(w.message) for w in shown]}"
    return result


def assert_clean_ending(result) -> None:
    """Success, a one-line error (exit 1), or Click's usage error (exit 2: usage, hint, one Error line)."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 1:
        assert_one_line_error(result)
    elif result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert lines[0].startswith("Usage: ") and lines[-1].startswith("Error: "), result.output
        assert sum(line.startswith("Error: ") for line in lines) == 1, result.output
    else:
        assert result.exit_code == 0, result.output


def assert_verify_ending(result) -> None:
    """verify's failure: one line, or a BAD line per bad shard then one Error line counting them."""
    lines = result.output.strip().splitlines()
    if len(lines) == 1:
        assert_one_line_error(result)
    else:
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert all(line.startswith("BAD ") for line in lines[:-1]), result.output
        assert lines[-1] == (f"Error: {len(lines) - 1} of {lines[-1].split()[3]} shards are bad; re-run the same "
                             "`cachegen build` command: it checks every shard and writes the bad ones again"), result.output


def assert_verifies(out: Path) -> dict:
    result = invoke("verify", out)
    m = manifest(out)
    shards = sum(len(e["shards"]) for e in m["epoch_list"]) + len(m.get("source_shards", []))
    assert result.exit_code == 0 and result.output.strip() == f"ok: {shards} shards verified", result.output
    return m


def without_progress(result):
    """The result less what a build that is not --quiet shows before its one-line error: tqdm's
    progress bar ("cachegen build: ...") and notes ("cachegen: ...")."""
    lines = [line for line in result.output.splitlines() if not line.startswith("cachegen")]
    return SimpleNamespace(output="\n".join(lines), exit_code=result.exit_code, exception=result.exception)


@contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="cachegen-fuzz-") as tmp:
        yield Path(tmp)


# --- CLI arguments -------------------------------------------------------------------------------

FACTORIES = """
import torchvision.transforms as T

def flip(epoch, epochs):
    return T.Compose([T.Resize(8), T.CenterCrop(8), T.RandomHorizontalFlip()])

def broken(epoch, epochs):
    raise ValueError("a message\\nof two lines")

def wrong_size(epoch, epochs):
    return T.RandomResizedCrop(4 + epoch)

not_callable = 3
"""


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    """User transform modules for --transform: `fuzz_augs` (a good factory and bad ones) and
    `fuzz_broken`, which fails on import with a message of two lines."""
    folder = tmp_path_factory.mktemp("factories")
    (folder / "fuzz_augs.py").write_text(FACTORIES)
    (folder / "fuzz_broken.py").write_text('raise RuntimeError("cannot start:\\nno GPU here")\n')
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))
    for name in ("fuzz_augs", "fuzz_broken"):
        sys.modules.pop(name, None)


junk = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6)


OPTIONS = {  # option: (good values, bad values; junk text is bad for any)
    "--epochs": (st.integers(1, 3), [0, -1, 10_001, 10**30]),
    "--size": (st.integers(1, 24), [0, -5, 9460, 10**12]),
    "--resize": (st.integers(1, 16), [0, -1, 9460, 10**12]),
    "--seed": (st.integers(0, 2**70), [-1]),
    "--workers": (st.sampled_from([0, 1, 1, 2]), [-1, 10**9]),
    "--shard-size": (st.sampled_from(["8", "1000", "1KB", "64MB"]), ["0", "-3", "1.5", "3 apples", ""]),
    "--format": (st.sampled_from(["npy", "png", "jpg"]), ["gif"]),
    "--transform": (st.sampled_from(["auto", "cifar", "imagenet", "mnist", "val", "fuzz_augs:flip"]),
                    ["sharpen", "json:nope", "no_such_module_xyz:f", ":", "fuzz_augs:broken", "fuzz_augs:wrong_size",
                     "fuzz_augs:not_callable", "fuzz_broken:f"]),
    "--schedule": (st.sampled_from(["constant", "linear"]), ["cubic"]),
    "--split": (st.sampled_from(["train", "test"]), ["val"]),
    "--on-error": (st.sampled_from(["fail", "skip"]), ["ignore"]),
    "--mode": (st.sampled_from(["auto", "cached", "live"]), ["hybrid"]),
    "--max-cache-gb": (st.sampled_from(["64", "0.000001", "inf"]), ["0", "-1", "nan", "abc"]),
}


@st.composite
def build_commands(draw) -> tuple[str, list[list[str]]]:
    """An --out folder name (maybe not UTF-8) and one to three `build` commands into it: a source
    (mostly the tiny .npz), a few options of which none, one or two get a bad value or junk, maybe
    --overwrite, --quiet or an unknown flag."""
    commands = []
    for _ in range(draw(st.integers(1, 3))):
        args = [draw(st.sampled_from(["{npz}"] * 8 + ["{missing}", "{text}"]))]
        options = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=5, unique=True))
        bad = draw(st.sampled_from([0, 0, 1, 1, 2]))
        for i, option in enumerate(options):
            good, wrong = OPTIONS[option]
            args += [option, str(draw(st.one_of(st.sampled_from(wrong), junk) if i < bad else good))]
        args += draw(st.lists(st.sampled_from(["--overwrite", "--quiet"] * 4 + ["--bogus"]), max_size=2,
                              unique=True))
        commands.append(args)
    return draw(st.sampled_from(["cache", "cach\u00e9", "c\udcffache"])), commands


def check_build_commands(out_name: str, commands: list[list[str]]) -> None:
    with scratch() as tmp:
        paths = {"npz": make_npz(tmp / "tiny.npz", n=24, size=8, classes=3)[0], "missing": tmp / "missing",
                 "text": tmp / "notes.txt"}
        paths["text"].write_text("not a dataset")
        out = tmp / out_name
        for source, *args in commands:
            args = [source.format(**paths), *args]
            result = without_progress(invoke("build", *args, "--out", out))
            event(f"outcome: exit {result.exit_code}")
            assert_clean_ending(result)
            if result.exit_code == 0:
                assert_verifies(out)
            else:  # an earlier cache is still whole, or there is none
                verify = invoke("verify", out)
                if verify.exit_code:
                    assert_verify_ending(verify)


@FAST
@given(commands=build_commands())
def test_build_arguments_fuzzed(factories, commands):
    check_build_commands(*commands)


@slow(300)
@given(commands=build_commands())
def test_build_arguments_fuzzed_long(factories, commands):
    check_build_commands(*commands)


# --- source folders ------------------------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height: PIL checks the size before decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(8)
    return rgba.convert(mode)


# Files by kind (their names end the file's name): how to make one at a path, of a size, from a seed.
def _save(mode: str, fmt: str, **kw):
    def make(path: Path, size, seed):
        _image(mode, size, seed).save(path, fmt, **kw)
    return make


def _write(data: bytes):
    def make(path: Path, size, seed):
        path.write_bytes(data)
    return make


def _truncated(path: Path, size, seed):
    _image("RGB", size, seed).save(path, "PNG")
    path.write_bytes(path.read_bytes()[:40])


def _link(target: str):
    def make(path: Path, size, seed):
        os.symlink(target, path)
    return make


def _fifo(path: Path, size, seed):
    os.mkfifo(path)


GOOD = {
    "rgb.png": _save("RGB", "PNG"), "gray.png": _save("L", "PNG"), "rgba.png": _save("RGBA", "PNG"),
    "graya.png": _save("LA", "PNG"), "palette.png": _save("P", "PNG", transparency=0),
    "bits.png": _save("1", "PNG"), "deep16.png": _save("I;16", "PNG"), "deep16.tif": _save("I;16", "TIFF"),
    "cmyk.jpg": _save("CMYK", "JPEG"), "gray.jpg": _save("L", "JPEG"), "rgb.bmp": _save("RGB", "BMP"),
    "n\udcffot-utf8.png": _save("RGB", "PNG"),
}
BAD = {
    "empty.png": _write(b""), "text.jpg": _write(b"this is not a jpeg"), "cut.png": _truncated,
    "bomb.png": _write(_png_header(20_000, 20_000)), "nearbomb.png": _write(_png_header(10_000, 10_000)),
    "dangling.png": _link("nowhere.png"), "selfloop.png": _link("selfloop.png"), "fifo.png": _fifo,
    "e\udcfempty.jpg": _write(b""),
}
GRAY = {"gray.png", "graya.png", "bits.png", "deep16.png", "deep16.tif", "gray.jpg"}  # kept as 1 channel
IGNORED = {"notes.txt": _write(b"hello"), "data.npz": _write(b"PK"), "image.gif.bak": _save("RGB", "PNG")}


@st.composite
def source_folders(draw) -> dict:
    """Class folders of image files of every kind, good and bad, maybe a nested folder, an empty
    class or a symlink loop; and how to build them."""
    kinds = st.sampled_from(sorted(GOOD) + sorted(BAD) + sorted(IGNORED))
    classes = []
    for _ in range(draw(st.integers(1, 3))):
        entry = st.tuples(kinds, st.integers(1, 40), st.integers(1, 40), st.sampled_from(["", "", "sub/"]))
        classes.append(draw(st.lists(entry, min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=5)))
    return {"classes": classes, "loop": draw(st.sampled_from([False, False, False, True])),
            "class_name": draw(st.sampled_from(["plain", "caf\u00e9", "b\udcffad"])),
            "on_error": draw(st.sampled_from(["fail", "skip"])), "epochs": draw(st.integers(1, 2)),
            "transform": draw(st.sampled_from(["imagenet", "val"]))}


def _shown(name: str) -> str:
    """A file name as an error message shows it: stderr writes a byte that is not UTF-8 (held as a
    surrogate) as a backslash escape."""
    return name.encode("utf-8", "backslashreplace").decode()


def check_source_folder(case: dict) -> None:
    with scratch() as tmp:
        root, good, bad, empty_class, gray = tmp / "src", 0, [], False, set()
        for c, entries in enumerate(case["classes"]):
            folder = root / f"{case['class_name']}{c}"
            folder.mkdir(parents=True)
            images = 0
            for i, (kind, w, h, sub) in enumerate(entries):
                (folder / sub).mkdir(exist_ok=True)
                name = f"{i}-{kind}"
                for table, kinds in ((GOOD, "good"), (BAD, "bad"), (IGNORED, "ignored")):
                    if kind in table:
                        table[kind](folder / sub / name, (w, h), i)
                        good += kinds == "good"
                        images += kinds != "ignored"
                        if kinds == "good":
                            gray.add(kind in GRAY)
                        if kinds == "bad":
                            bad.append(name)
            empty_class |= images == 0
        if case["loop"]:
            os.symlink("..", root / f"{case['class_name']}0" / "up")
        out = tmp / "cache"
        said = invoke("build", root, "--out", out, "--workers", "1", "--size", "8", "--shard-size", "3",
                      "--epochs", case["epochs"], "--transform", case["transform"], "--on-error", case["on_error"])
        result = without_progress(said)
        if case["loop"]:
            event("outcome: symlink loop refused")
            assert_one_line_error(result, "symlink loop in the source", "remove the link")
        elif empty_class:
            event("outcome: a class without images refused")
            assert_one_line_error(result, "no images in")
        elif bad and case["on_error"] == "fail":
            event("outcome: an unreadable file named")
            assert_one_line_error(result, "cannot read", "--on-error skip")
            assert any(_shown(name) in result.output for name in bad), result.output
        elif good == 0:
            event("outcome: nothing readable")
            assert_one_line_error(result, "could be read")
        else:
            event(f"outcome: built, {'some' if bad else 'none'} skipped")
            assert result.exit_code == 0, result.output
            m = assert_verifies(out)
            assert len(m["skipped"]) == len(bad) and m["source"]["num_samples"] == good + len(bad)
            assert all(e["samples"] == good for e in m["epoch_list"])
            assert (f"cachegen: skipped {len(bad)} unreadable sample(s) (--on-error skip)" in said.output) == bool(bad)
            # grayscale only if all are (a mix is RGB, unless the probed images were all grayscale)
            channels = {frozenset({True}): [1], frozenset({False}): [3]}.get(frozenset(gray), [1, 3])
            assert m["image"]["shape"][:2] == [8, 8] and m["image"]["shape"][2] in channels
            json.dumps(m, ensure_ascii=False).encode("utf-8")  # every name in it is valid UTF-8
            assert_clean_ending(invoke("info", out))
        if result.exit_code:
            assert not (out / "manifest.json").exists()


@FAST
@given(source_folders())
def test_source_folders_fuzzed(case):
    check_source_folder(case)


@slow(1000)
@given(source_folders())
def test_source_folders_fuzzed_long(case):
    check_source_folder(case)


def test_sixteen_bit_images_keep_their_high_byte(tmp_path):
    from cachegen.sources import FolderSource

    (tmp_path / "a").mkdir()
    values = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a" / "deep.png")
    assert Image.open(tmp_path / "a" / "deep.png").mode == "I;16"
    pixels = np.asarray(FolderSource(tmp_path).load(0))
    assert pixels.shape == (2, 4) and np.array_equal(pixels, values >> 8)  # grayscale: one channel


# --- .npz sources --------------------------------------------------------------------------------

@st.composite
def npz_arrays(draw) -> dict:
    """A valid .npz source (images, labels, maybe class names), then maybe one thing made wrong."""
    n, h, w = draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    images = np.random.default_rng(n).integers(0, 256, (n, h, w) + ((channels,) if channels else ()), np.uint8)
    classes = draw(st.one_of(st.none(), st.lists(st.sampled_from(["cat", "dog", "ü", ""]), min_size=1, max_size=5)))
    labels = np.array(draw(st.lists(st.integers(0, len(classes or "abcd") - 1), min_size=n, max_size=n)))
    arrays = {"images": images, "labels": labels, **({"classes": np.array(classes)} if classes else {})}
    wrong = draw(st.sampled_from([None, None, None, "images dtype", "images ndim", "channels", "no samples",
                                  "zero side", "labels dtype", "labels length", "negative label", "label too big",
                                  "huge label", "uint64 label", "classes scalar", "classes empty", "no images",
                                  "no labels"]))
    if wrong == "images dtype":
        arrays["images"] = images.astype(draw(st.sampled_from(["float32", "int16", "bool"])))
    elif wrong == "images ndim":
        arrays["images"] = images.reshape((n, -1)) if draw(st.booleans()) else images.reshape((n, 1, 1, 1, -1))
    elif wrong == "channels":
        arrays["images"] = np.zeros((n, h, w, draw(st.sampled_from([0, 2, 5]))), np.uint8)
    elif wrong == "no samples":
        arrays["images"], arrays["labels"] = images[:0], labels[:0]
    elif wrong == "zero side":
        arrays["images"] = np.zeros((n, 0, w, 3), np.uint8)
    elif wrong == "labels dtype":
        arrays["labels"] = labels.astype(draw(st.sampled_from(["float64", "bool"])))
    elif wrong == "labels length":
        arrays["labels"] = np.append(labels, 0) if draw(st.booleans()) else labels[1:]
    elif wrong in ("negative label", "label too big", "huge label", "uint64 label"):
        bad = {"negative label": -1, "label too big": len(classes or ()) or 2**20, "huge label": 2**62,
               "uint64 label": 2**64 - 1}[wrong]
        arrays["labels"] = np.array([bad, *labels[1:].tolist()], dtype=np.uint64 if bad > 2**63 else np.int64)
    elif wrong == "classes scalar":
        arrays["classes"] = np.array("one name")
    elif wrong == "classes empty":
        arrays["classes"] = np.array([], dtype=str)
    elif wrong in ("no images", "no labels"):
        del arrays[wrong.split()[1]]
    return arrays


def _valid(arrays: dict) -> bool:
    """What a .npz source must hold (README: images (N,H,W[,C]) uint8, labels, optional classes)."""
    images, labels, classes = arrays.get("images"), arrays.get("labels"), arrays.get("classes")
    if images is None or labels is None or images.dtype != np.uint8 or images.ndim not in (3, 4):
        return False
    if (images.ndim == 4 and images.shape[3] not in (1, 3, 4)) or 0 in images.shape:
        return False
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        return False
    if classes is not None and classes.ndim == 0:
        return False
    limit = len(classes) if classes is not None else 2**20
    return bool(labels.min() >= 0 and labels.max() < limit)


def check_npz(arrays: dict) -> None:
    with scratch() as tmp:
        np.savez(tmp / "data.npz", **arrays)
        out = tmp / "cache"
        result = invoke("build", tmp / "data.npz", "--out", out, "--workers", "1", "--transform", "val",
                        "--size", "8", "--quiet")
        event(f"outcome: {'built' if _valid(arrays) else 'refused'}")
        if not _valid(arrays):
            assert_one_line_error(result, "data.npz")
            return
        assert result.exit_code == 0, result.output
        m = assert_verifies(out)
        labels = arrays["labels"].astype(np.int64)
        for shard in m["epoch_list"][0]["shards"]:
            assert shard["labels"] == labels[shard["indices"]].tolist()
        names = arrays.get("classes")
        assert m["classes"] == ([str(c) for c in names] if names is not None
                                else [str(i) for i in range(int(labels.max()) + 1)])
        channels = 1 if arrays["images"].ndim == 3 else arrays["images"].shape[3]
        assert m["image"]["shape"] == [8, 8, channels]


@FAST
@given(npz_arrays())
def test_npz_sources_fuzzed(arrays):
    check_npz(arrays)


@slow(1000)
@given(npz_arrays())
def test_npz_sources_fuzzed_long(arrays):
    check_npz(arrays)


# --- manifests, damaged or edited by hand --------------------------------------------------------

# What verify cannot check against anything (free text, names, the source's own fingerprint, a
# factory's per-epoch fingerprint, the library versions the build ran with) or does not read (extra
# keys): an edit there may pass.
UNCHECKED = {("created_by",), ("source", "kind"), ("source", "description"), ("source", "fingerprint"),
             ("source_spec",), ("transform", "resize"), ("classes",), ("epoch_fingerprints", "*"), ("versions",)}


def _paths(obj, path=()):
    """Every path into a JSON value, list positions as '*' (so each field is drawn as often)."""
    yield path
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, path + (key,))
    elif isinstance(obj, list) and obj:
        yield from _paths(obj[0], path + ("*",))


def _unchecked(path: tuple) -> bool:
    return any(path[:len(p)] == p for p in UNCHECKED)


def _differences(old, new, path=()) -> list[tuple]:
    """The paths (list positions as '*') where two JSON values differ; a key only `new` has is
    ('+',): nothing reads it."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = [path + ("+",) for key in new if key not in old]
        found += [path + (key,) for key in old if key not in new]
        return found + [d for key in old if key in new for d in _differences(old[key], new[key], path + (key,))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for a, b in zip(old, new) for d in _differences(a, b, path + ("*",))]
    same = type(old) is type(new) and (old == new or old != old and new != new)  # NaN is NaN here
    return [] if same else [path]


@pytest.fixture(scope="module")
def edited_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest")
    source = make_npz(tmp / "data.npz", n=60, size=8)[0]
    run_cli("build", source, "--out", tmp / "clean", "--epochs", "2", "--shard-size", "25", "--workers", "1",
            "--quiet")
    return tmp / "clean"


json_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(), st.text(max_size=4),
                        st.lists(st.integers(-1, 3), max_size=3), st.just({}), st.just({"a": 1}))


@st.composite
def manifest_edits(draw, original: dict) -> tuple[str, tuple, bytes]:
    """(how, the field's path or None, the new manifest bytes): a field replaced, nudged or
    deleted, a key added, or the file's bytes flipped or cut."""
    text = json.dumps(original, separators=(",", ":")).encode()
    how = draw(st.sampled_from(["replace", "nudge", "delete", "add", "flip", "cut"]))
    if how == "flip":
        at = draw(st.integers(0, len(text) - 1))
        return how, None, text[:at] + bytes([draw(st.integers(0, 255))]) + text[at + 1:]
    if how == "cut":
        return how, None, text[:draw(st.integers(0, len(text) - 1))]
    m = copy.deepcopy(original)
    path = draw(st.sampled_from(sorted(set(_paths(original)) - {()}, key=str)))
    concrete, parent = [], None
    node = m
    for key in path:
        assume(key == "*" or key in node)  # list items differ: only epoch 0's shards have pixel sums
        index = draw(st.integers(0, len(node) - 1)) if key == "*" else key
        parent, node = node, node[index]
        concrete.append(index)
    last = concrete[-1]
    if how == "replace":
        parent[last] = draw(json_values)
    elif how == "nudge":  # the smallest change of the same type
        value = parent[last]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            assume(False)
        parent[last] = value + draw(st.sampled_from([-1, 1])) if not isinstance(value, str) else value + "x"
    elif how == "delete":
        del parent[last]
    else:  # add a key nobody reads
        assume(isinstance(node, dict))
        node["extra"] = 1
    return how, path, json.dumps(m, separators=(",", ":"), allow_nan=True).encode()


def check_manifest_edit(clean: Path, edit) -> None:
    how, path, data = edit
    original = (clean / "manifest.json").read_bytes()
    assume(data != original)
    with scratch() as tmp:
        root = tmp / "cache"
        root.mkdir()
        for epoch in clean.glob("epoch-*"):
            os.symlink(epoch, root / epoch.name)  # verify reads the shards; only the manifest changes
        (root / "manifest.json").write_bytes(data)
        result = invoke("verify", root)
        event(f"outcome: {how}, verify exit {result.exit_code}")
        if result.exit_code:
            assert_verify_ending(result)
        assert_clean_ending(invoke("info", root))
        if result.exit_code == 0:
            # Right only where the edit left everything verify can check as it was.
            changed = _differences(json.loads(original), json.loads(data))
            assert all(_unchecked(p) or p[-1:] == ("+",) for p in changed), \
                f"verify passed a manifest after {how} at {path}: {changed}"
        else:
            last = result.output.strip().splitlines()[-1]
            assert str(root / "manifest.json") in last or "BAD " in result.output, result.output


@FAST
@given(st.data())
def test_manifest_edits_fuzzed(edited_cache, data):
    check_manifest_edit(edited_cache, data.draw(manifest_edits(manifest(edited_cache))))


@slow(1000)
@given(st.data())
def test_manifest_edits_fuzzed_long(edited_cache, data):
    check_manifest_edit(edited_cache, data.draw(manifest_edits(manifest(edited_cache))))
