"""The `cachegen` command line: parse options, call the library, report expected errors in one line."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
import threading
from pathlib import Path

import click

from cachegen import __version__
from cachegen.errors import CachegenError
from cacheformat import as_error
from cacheformat.manifest import ENCODINGS


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the same cleanup runs."""


def _terminate(signum, frame) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (kill, a batch system's stop, a container's) ends a command as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line_errors(fn):
    """Turn an expected error (CachegenError, a damaged cache's FormatError, a TransformError: all
    FormatErrors) and a Ctrl-C or SIGTERM into a one-line message and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_as_interrupt(), as_error(click.ClickException):
                return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            # Only a build leaves work behind to resume; info, verify, bench... just stopped.
            advice = "; re-run the same command to resume" if fn.__name__ == "build" else ""
            click.echo(f"\ncachegen: interrupted{advice}", err=True)
            raise SystemExit(128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)) from None
    return wrapper


TRUST_HELP = ("Import and run the code the cache's manifest names (a module:factory transform, from sys.path): "
              "only for a cache from someone you trust. A preset needs nothing.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cachegen")  # works from a checkout too
def main() -> None:
    """Expand an image dataset into N augmented epochs of WebDataset shards, and inspect them."""


@main.command(short_help="Write SOURCE as N augmented epochs of shards (or a live cache).")
@click.argument("source", required=False)
@click.option("--epochs", default=10, show_default=True, type=int, help="Augmented epochs to write.")
@click.option("--out", default="cache", show_default=True,
              help="Cache folder, or a URL (s3://bucket/prefix): built in --stage, then uploaded.")
@click.option("--stage", type=click.Path(path_type=Path), help="With --out URL: the local folder to build in "
              "before uploading [default: one in the system's temporary folder, named by the URL].")
@click.option("--transform", default="auto", show_default=True,
              help="Preset (cifar, imagenet, mnist, val, none: store as is; with masks seg, seg-val) or "
                   "module:factory called as factory(epoch, epochs). It returns a torchvision transform of one PIL "
                   "image (with masks: a v2 transform of the image and a tv_tensors.Mask), or, with "
                   "--augment-on device, any nn.Module/callable over float (B, C, H, W) batches in [0, 1] "
                   "(e.g. a Kornia AugmentationSequential).")
@click.option("--schedule", default="constant", show_default=True, type=click.Choice(["constant", "linear"]),
              help="Preset strength over epochs: constant, or linear from full to half.")
@click.option("--size", type=int, help="Output side length for presets [default: the source's: its "
                                        "images' side, or the first image's shorter side for a folder].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--workers", default=0, show_default=True, type=int, help="Worker processes; 0 = every core.")
@click.option("--format", "encoding", default="npy", show_default=True, type=click.Choice(ENCODINGS),
              help="Image encoding: raw uint8 npy (fastest to read), png (lossless), jpg (smallest). A live "
                   "cache stores its source in it, decoded as it is read.")
@click.option("--quality", type=int, help="JPEG quality of --format jpg [default: 95].")
@click.option("--shard-size", default="1000", show_default=True,
              help="Samples per shard (1000) or bytes of pixels per shard (64MB).")
@click.option("--split", default="train", show_default=True, metavar="NAME",
              help="train or test of a torchvision dataset or the sample; a Hugging Face dataset's split by name "
              "(validation, ...). A folder, .npz, list or shards have none: refused.")
@click.option("--source-factory", metavar="FILE.py:make", help="Build from your own map-style Dataset: make() "
              "returns it, its items (PIL image | uint8 tensor CHW | uint8 array HWC, int label), its `classes` "
              "named where it has them. Runs your code, at build time only.")
@click.option("--image-column", metavar="NAME", help="The image column of a list (.csv, .jsonl) or a Hugging Face "
              "dataset source [default: found by its name or feature].")
@click.option("--label-column", metavar="NAME", help="The label column of a list or a Hugging Face dataset source "
              "[default: found by its name or feature].")
@click.option("--on-error", default="fail", show_default=True, type=click.Choice(["fail", "skip"]),
              help="On an unreadable image: stop naming it, or skip it and report how many.")
@click.option("--mode", default="auto", show_default=True, type=click.Choice(["auto", "cached", "live"]),
              help="cached: write augmented epochs; live: write the source once, augment while reading; "
                   "auto: live when the cache would exceed --max-cache-gb.")
@click.option("--augment-on", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "device"]),
              help="cpu: augment per sample (PIL). device: augment in batches (Kornia) - a live cache's "
                   "reader moves uint8 batches to its device and augments them there; a cached build "
                   "augments each shard in batches (where --device says). auto: a live cache augments on the "
                   "device when the loader's is CUDA; a cached build per sample; a module:factory: cpu.")
@click.option("--device", help="Where a cached --augment-on device build augments: cuda[:N] (in this process, on "
                             "the GPU; the workers load, encode and write) or cpu (in this process) [default: cuda "
                             "when torch sees one, else in the workers, on their CPUs].")
@click.option("--teacher", metavar="FILE.py:factory", help="Reinforce the cache: store, per sample, the top-K softmax "
              "probabilities of the nn.Module factory() returns (logits of float (B, C, H, W) images in [0, 1], the "
              "stored pixels / 255), run once here in eval mode; read them with targets='teacher'. Runs your code.")
@click.option("--teacher-topk", default=10, show_default=True, type=int,
              help="Teacher probabilities stored per sample (the K largest; at most the classes).")
@click.option("--masks", type=click.Path(path_type=Path), metavar="DIR",
              help="Segmentation: a folder of PNG class-index masks, one per image of the SOURCE folder at the same "
                   "relative path and stem (no class folders needed); augmented with their images, stored beside them.")
@click.option("--mask-classes", metavar="K|NAMES", help="With --masks: the number of mask classes (21) or their "
              "names (background,road,car); a mask value outside them is an error (or skipped: --on-error skip).")
@click.option("--sample-masks", is_flag=True, help="The built-in sample with masks: 0 background, k+1 the shape of "
              "class k (a .npz source has masks where it holds a 'masks' array (N, H, W)).")
@click.option("--max-cache-gb", default=64.0, show_default=True, type=float,
              help="Largest cache --mode auto writes before it falls back to live.")
@click.option("--resize", type=int, help="Resize+center-crop every source image to NxN first (deterministic).")
@click.option("--channels", type=int, help="Convert every image to 1 (grayscale) or 3 (RGB) channels "
                                            "[default: the source's; a folder of grayscale images stays 1].")
@click.option("--stats-from", type=click.Path(path_type=Path), metavar="TRAIN_CACHE",
              help="Normalise with TRAIN_CACHE's mean/std: write them into this cache's manifest "
                   "(for a val/test cache; same channels required).")
@click.option("--overwrite", is_flag=True, help="Replace a different cache already in --out, once the new one "
                                                "is complete (it is built beside it).")
@click.option("--dask", metavar="ADDRESS", help="Write the shards on the workers of the Dask scheduler at ADDRESS "
                                               "(tcp://host:8786); --out must be a folder they all see.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_one_line_errors
def build(source, **options) -> None:
    """Write SOURCE (a folder, a .npz, cifar10:ROOT, .tar shards, a .csv/.jsonl list, a Hugging Face dataset, ...;
    default: the built-in sample; docs/building.md lists every kind) as augmented epochs."""
    from cachegen.config import BuildConfig
    from cachegen.remote import check_writable, is_url, stage_folder, upload

    url, stage = options["out"], options.pop("stage")
    url = url if is_url(url) else None
    temporary = url is not None and stage is None  # our own stage folder, removed once uploaded
    if url is not None:
        stage = stage or stage_folder(url)
    config = BuildConfig(source=source, **{**options, "out": stage if url else options["out"]})  # checked first
    if url is not None:
        check_writable(url)
        if temporary and not options["quiet"]:
            click.echo(f"cachegen: building in {click.format_filename(stage)}, then uploading to {url} (the local "
                       "copy is removed once uploaded; --stage DIR keeps one)")
    from cachegen.build import build as run_build  # imports torch: after the options are checked

    manifest = run_build(config)
    if url is not None:
        sent = upload(stage, url, overwrite=options["overwrite"])
        if not options["quiet"]:
            kept = "; removing that local copy" if temporary else ""
            click.echo(f"cachegen: uploaded {sent} file(s) to {url} (built in {click.format_filename(stage)}{kept})")
    if not options["quiet"]:
        _say_built(manifest, Path(stage if url else options["out"]).resolve(), url, options["out"])
    if temporary:
        shutil.rmtree(stage, ignore_errors=True)


def _say_built(manifest: dict, built: Path, url: str | None, out: str) -> None:
    """The build's last lines: what the cache holds, and how to look at it or read it."""
    from cachegen.inspect import describe

    where = url or str(built)
    image = "x".join(map(str, manifest["output_shape"]))
    size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
    loader = "CachedLoader" if manifest["mode"] == "cached" else "LiveLoader"
    local = ", local='/scratch/cache'" if url else ""
    if manifest["mode"] == "live" and ":" in manifest["transform"]["spec"]:  # its factory runs as it reads
        local += ", trust_code=True"
    click.echo(f"cachegen: {click.format_filename(where)}: {describe(manifest)}, {image} images, "
               f"{size / 1e6:.1f} MB")
    click.echo(f"next: `cachegen info {click.format_filename(str(out))}`, or read it with "
               f"readers.{loader}({where!r}, batch_size=256{local})")


@main.command(short_help="Summarise a cache from its manifest: what it holds.")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_one_line_errors
def info(cache: str, as_json: bool) -> None:
    """Summarise the cache in CACHE (a folder, or a URL: s3://bucket/prefix)."""
    from cachegen.inspect import summary
    from cachegen.remote import local_view

    with local_view(cache) as root:
        s = summary(root)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"cache      {click.format_filename(cache)}  ({s['mode']}, format {s['format_version']})")
    click.echo(f"source     {s['source']['description']}  ({s['source']['num_samples']} samples)")
    # The images line gives the sizes: a preset's `size` is its output side, a factory may ignore it.
    click.echo(f"transform  {s['transform']['spec']}  schedule={s['transform']['schedule']}"
               + (f"  augment_on={s['transform'].get('augment_on', 'cpu')}" if s["mode"] == "live" else ""))
    if ":" in s["transform"]["spec"]:
        digest = s["transform"].get("factory_sha256") or "not recorded (no source file)"
        runs = "runs only with trust_code=True / --trust-code" if s["mode"] == "live" else \
            "ran at build time; reading this cache runs none (bench --trust-code runs it for its online rows)"
        click.echo(f"factory    {s['transform']['spec']}  sha256 {digest}  (code: {runs})")
    click.echo(f"seed       {s['seed']}")
    click.echo(f"contents   {s['contents']}, {s['bytes'] / 1e6:.1f} MB")
    click.echo(f"images     {s['image']['encoding']} {'x'.join(map(str, s['image']['shape']))} uint8"
               + (f", {'x'.join(map(str, s['output_shape']))} after augmentation" if s["mode"] == "live" else ""))
    click.echo(f"classes    {len(s['classes'])}: {', '.join(s['classes'][:10])}{' ...' if len(s['classes']) > 10 else ''}")
    if "mask" in s:
        mask = s["mask"]
        click.echo(f"masks      {mask['member']} {mask['dtype']} {'x'.join(map(str, mask['shape']))}, "
                   f"{len(mask['classes'])} classes: {', '.join(mask['classes'][:10])}"
                   f"{' ...' if len(mask['classes']) > 10 else ''}")
    click.echo(f"mean/std   {[round(m, 4) for m in s['mean']]} / {[round(x, 4) for x in s['std']]}"
               + (f"  (from {s['stats_from']})" if s.get("stats_from") else ""))
    if s["skipped"]:
        click.echo(f"skipped    {s['skipped']} unreadable source samples")


@main.command(short_help="Recompute every checksum; exit 1 naming each bad shard.")
@click.argument("cache")
@_one_line_errors
def verify(cache: str) -> None:
    """Recompute every shard's checksum and sample count; exit 1 naming each bad shard. CACHE: a
    folder, or a URL (s3://bucket/prefix: every file is downloaded to a temporary folder first)."""
    from cachegen.inspect import verify as run_verify
    from cachegen.remote import local_view, named

    with local_view(cache, files=True) as root:
        checked, problems = run_verify(root)
        problems = [named(p, root, cache) for p in problems]
    for problem in problems:
        click.echo(f"BAD {problem}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} of {checked} shards are bad; re-run the same `cachegen build` "
                                   "command: it checks every shard and writes the bad ones again")
    click.echo(f"ok: {checked} shards verified")


@main.command(short_help="Versions, GPU, cores, memory, disk: for a bug report.")
@click.argument("cache", default="cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_one_line_errors
def doctor(cache: Path, as_json: bool) -> None:
    """What a bug report needs: versions, GPU, cores, memory and the disk at CACHE [default: ./cache],
    and how the cache's size compares with the page cache that keeps it fast."""
    from cachegen.doctor import format_report, report

    if not cache.exists():
        raise CachegenError(f"{click.format_filename(cache)} does not exist: give a cache's folder "
                            "(`cachegen doctor CACHE`), or `.` for this machine alone")

    r = report(cache)
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))


@main.command(short_help="Draw a PNG grid of samples through the epochs.")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", default="preview.png", show_default=True, type=click.Path(path_type=Path),
              help="PNG file to write.")
@click.option("--samples", default=6, show_default=True, type=click.IntRange(1, 64), help="Rows: samples shown.")
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(1, 64), help="Most epochs shown.")
@click.option("--source", metavar="WHERE", help="Where the cache's source is now, if it moved since the build "
                                             "[default: where the build recorded it].")
@click.option("--trust-code", is_flag=True, help=TRUST_HELP)
@_one_line_errors
def preview(cache: Path, out: Path, samples: int, epochs: int, trust_code: bool, source: str | None) -> None:
    """Draw a grid: rows are samples, columns the original then each epoch's augmentation."""
    from cachegen.preview import preview as run_preview

    rows, columns = run_preview(cache, out, samples=samples, epochs=epochs, trust_code=trust_code, source=source,
                                say=lambda msg: click.echo(msg, err=True))
    click.echo(f"wrote {click.format_filename(out)}: {rows} samples x {columns} columns")


@main.command(short_help="Measure the cache against live and online augmentation.")
@click.argument("cache", required=False, type=click.Path(path_type=Path))
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
              help="CPU workers for the rows that use them; 0 = every core.")
@click.option("--images", default=20000, show_default=True, type=click.IntRange(1),
              help="Time each row over at least this many images (passes repeat as needed).")
@click.option("--min-seconds", default=3.0, show_default=True, type=click.FloatRange(0),
              help="...and over at least this many seconds.")
@click.option("--warmup", default=1000, show_default=True, type=click.IntRange(0),
              help="Images each row reads first, untimed (imports, page cache, allocators, model).")
@click.option("--model", is_flag=True, help="Add a training step (small CNN on CPU, ResNet-18 on CUDA) "
                                            "and report the share of step time spent waiting for data.")
@click.option("--device", help="cpu or cuda [default: cuda if available].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw a bar chart to this PNG.")
@click.option("--source", metavar="WHERE", help="Where the cache's source is now, if it moved since the build "
                                             "[default: where the build recorded it].")
@click.option("--resize", type=click.IntRange(1), metavar="N",
              help="For a cache of a source of mixed sizes built without --resize: the side its live rows "
                   "resize the source to.")
@click.option("--trust-code", is_flag=True, help=TRUST_HELP)
@_one_line_errors
def bench(cache, batch_size, workers, images, min_seconds, warmup, model, device, as_json, plot, trust_code,
          source, resize) -> None:
    """Measure, side by side: the cache, live augmentation (per sample in workers, and batched on the device),
    online augmentation, stock webdataset, plain read().

    Without CACHE, a 2-epoch sample cache is built first. Every row is warmed up, then timed
    pass after pass until it has seen --images images and --min-seconds seconds. Columns:

    \b
    img/s      images delivered (with --model: trained on) per second of wall time
    MB/s       the same in MB of uint8 pixels (img/s x H x W x C / 1e6)
    x online   img/s over the online row's img/s, same run (1.00 = online)
    CPU %      CPU time of this process and its workers over wall time x 100:
               100 = one core busy; the most is cores x 100
    data wait  (--model) share of step time spent waiting for the next batch
    images, s  images and wall seconds timed in the row, after the warm-up

    The plain read() row is the ceiling (bytes only, no batches, no model); it is shown in a table
    of its own and named, not drawn, on the --plot chart (log scale, ratio on each bar).
    """
    from cachegen.bench import format_table, plot as draw, run_bench

    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    result = run_bench(cache, batch_size=batch_size, workers=workers or None, images=images, min_seconds=min_seconds,
                       warmup=warmup, model=model, device=device, trust_code=trust_code, progress=say,
                       source=source, resize=resize)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if plot:
        draw(result, plot)
        say(f"wrote {plot}")


if __name__ == "__main__":
    main()
