#!/usr/bin/env bash
# GPU check: one invocation, every step run whatever the others did, a summary (outcomes and every
# figure) at the end; about 7 minutes on an H100 or H200 (each step has a time limit, and all of them
# BUDGET=420 s, of which the CUDA tests keep TESTS_S=120 s for themselves).
#
#   PYTHON=python3 scripts/gpu_check.sh                 # from a checkout; the project need not be installed
#   ONLY="tests feed224" PYTHON=python3 scripts/gpu_check.sh    # a rerun of some steps (and what they need)
#
# On a machine with an NVIDIA GPU it prints, all measured in this run:
#   build    `cachegen build` images/s: per sample in worker processes vs --augment-on device
#            --device cuda (batched on the GPU), for CIFAR-shaped 32 px (cifar preset) and 256 px
#            sources cropped to 224 (imagenet preset); the 32 px device build with a ResNet-18 --teacher;
#   feed32   ResNet-18 at 32 px (batch 512) fed by CachedLoader, LiveLoader on the device, LiveLoader
#            per sample, an online DataLoader, each as a share of the synthetic-data rate (goal
#            >= 90 %) with its data wait (scripts/gpu_feed.py), after host -> device copy rates;
#   feed224  ResNet-50 at 224 px (batch 128), the same rows;
#   train    scripts/train.py, a few steps with each loader (cached, live, online);
#   jpg      a jpg cache decoded in CPU threads vs in batches with nvJPEG: img/s, and how close;
#   seg      scripts/bench_seg.py: cached vs online batches of images with masks;
#   tests    pytest -m cuda (every CUDA test), once.
# Without CUDA every step runs on the CPU at toy sizes, so the script is known to run; those numbers
# say nothing about a GPU. Missing packages are named in one line first (docs/gpu.md: carrying wheels),
# then /dev/shm is checked (DataLoader workers hand batches over in it).
#
# A new row: a shell function below (its figures on lines with "img/s" or "x the"), then one `step`
# line in the table at the end (a key, a name, a limit in seconds on a GPU, the command), and its
# key's needs in NEEDS where it reads what another step makes.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
began=$(date +%s)

# 0. Every import the steps need, checked in one line.
missing=$("$PYTHON" - <<'EOF' 2>&1
import importlib
names = ["torch", "torchvision", "numpy", "PIL", "click", "tqdm", "pytest", "kornia", "webdataset", "braceexpand",
         "cacheformat", "cacheaug", "readers", "cachegen.cli"]
gone = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - each missing one named
        gone.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
print("; ".join(gone))
EOF
) || missing="$PYTHON does not run: $missing"
if [ -n "$missing" ]; then
    echo "gpu_check: cannot start, missing: $missing (docs/gpu.md: scripts/gpu_wheels.sh, then carry .whl)"
    exit 2
fi

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    GPU=1 SAMPLES=50000 EPOCHS=2 BIG=4000 SIDE=256 CROP=224 WORKERS=0
    FEED32=(--batch-size 512 --steps 60 --warmup 5 --copies 200) FEED224=(--batch-size 128 --steps 40 --warmup 5)
    TRAIN="--max-steps 30 --batch-size 512"
else
    GPU=0 SAMPLES=1000 EPOCHS=1 BIG=48 SIDE=72 CROP=64 WORKERS=2
    FEED32=(--batch-size 32 --steps 3 --warmup 1 --copies 5 --workers 2)
    FEED224=(--batch-size 8 --steps 2 --warmup 1 --workers 2) TRAIN="--max-steps 3 --batch-size 32 --workers 2"
fi
echo "gpu_check: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available()
else "no GPU: the CPU at toy sizes, numbers say nothing about a GPU")'); $SAMPLES images at 32 px, $BIG at" \
     "$SIDE px; $(nproc) cores; work dir $WORK"

declare -a SUMMARY=() FIGURES=()
FAILED=0

# /dev/shm: DataLoader workers (per-sample live rows, online rows, train.py) pass batches through it;
# a container's default 64 MB ends them with a bus error at the first large batch.
shm_free=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
if [ -z "$shm_free" ] || [ "$shm_free" -lt "${SHM_MIN_MIB:-1024}" ]; then
    SUMMARY+=("WARNING       /dev/shm has ${shm_free:-no} MiB free: worker rows may die (docs/gpu.md: growing /dev/shm)")
    echo "gpu_check: /dev/shm has ${shm_free:-no} MiB free (under ${SHM_MIN_MIB:-1024}): steps with DataLoader" \
         "workers may die; as root: mount -o remount,size=8G /dev/shm"
else
    echo "gpu_check: /dev/shm has $shm_free MiB free"
fi

# Seconds for all the steps, so that a slow or hung step cannot take the others' time; on the CPU
# (toy sizes, but no GPU doing the work) every limit is SCALE times longer.
if [ "$GPU" = 1 ]; then BUDGET=${BUDGET:-420} SCALE=1; else BUDGET=${BUDGET:-2400} SCALE=8; fi
TESTS_S=$(( ${TESTS_S:-120} * SCALE ))  # kept for the tests (the last step) whatever the steps before took

# ONLY: the keys to run (all when empty), with the steps each needs (NEEDS) run first.
declare -A NEEDS=([build]="sources" [caches]="sources build" [feed32]="sources build caches"
                  [feed224]="sources build caches" [train]="sources build caches" [jpg]="sources")
declare -A WANTED=() KNOWN=()
for key in ${ONLY:-}; do
    WANTED[$key]=1
    for need in ${NEEDS[$key]:-}; do WANTED[$need]=1; done
done

step() {  # step KEY NAME LIMIT_S COMMAND...: run it, its output indented (and kept), its outcome for the summary
    local key=$1 name=$2 limit=$3 start rc left log
    shift 3
    KNOWN[$key]=1
    [ -z "${ONLY:-}" ] || [ -n "${WANTED[$key]:-}" ] || return 0
    left=$(( BUDGET - ($(date +%s) - began) ))
    if [ "$key" != tests ] && { [ -z "${ONLY:-}" ] || [ -n "${WANTED[tests]:-}" ]; }; then
        left=$(( left - TESTS_S ))  # the tests' time, kept
    fi
    if [ "$left" -lt 10 ]; then
        FAILED=$((FAILED + 1))
        SUMMARY+=("SKIPPED       $name (the ${BUDGET}s budget is spent)")
        return
    fi
    limit=$(( limit * SCALE ))
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name"
    start=$(date +%s)
    log="$WORK/step-$key.log"
    # bash -c: the steps below are shell functions (exported), which timeout cannot run by itself
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" 2>&1 | sed 's/^/  /' | tee "$log"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start ))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("ok       ${took}s  $name")
    else
        FAILED=$((FAILED + 1))
        local why="exit $rc"
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${limit}s"
        SUMMARY+=("FAILED   ${took}s  $name ($why)")
    fi
    local line
    while IFS= read -r line; do FIGURES+=("$key: ${line#  }"); done < <(grep -E "img/s|x the " "$log")
}

sources() {  # CIFAR-shaped random pixels (enough to time reading), and smooth 256 px ones (crops have edges)
    "$PYTHON" - "$WORK" "$SAMPLES" "$BIG" "$SIDE" <<'EOF'
import sys
import numpy as np
work, n, big, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
np.savez(f"{work}/small.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=rng.integers(0, 10, n))
blocks = rng.integers(0, 256, (big, side // 8, side // 8, 3), dtype=np.uint8)
np.savez(f"{work}/big.npz", images=blocks.repeat(8, 1).repeat(8, 2), labels=rng.integers(0, 100, big))
EOF
}

build_rates() {  # builds timed in this process (startup excluded), per sample vs batched on the device
    "$PYTHON" - "$WORK" "$EPOCHS" "$WORKERS" "$CROP" <<'EOF'
import sys
import time

import torch

from cachegen.build import build
from cachegen.config import BuildConfig

work, epochs, workers, crop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda":
    torch.zeros(1, device=device)  # CUDA's start-up, not the build's
for source, preset, size, name in (("small", "cifar", 32, "cache"), ("big", "imagenet", crop, "big-cache")):
    rates = {}
    for row, extra in (("per sample", {}), (f"--augment-on device --device {device}",
                                            {"augment_on": "device", "device": device})):
        out = f"{work}/{name}" + ("-device" if extra else "")
        config = BuildConfig(source=f"{work}/{source}.npz", out=out, epochs=epochs, transform=preset, size=size,
                             workers=workers, mode="cached", quiet=True, **extra)
        start = time.perf_counter()
        manifest = build(config)
        seconds = time.perf_counter() - start
        rates[row] = sum(e["samples"] for e in manifest["epoch_list"]) / seconds  # images written, every epoch
        print(f"{preset} {size} px, {config.workers} workers, {row:<32} {rates[row]:>10,.0f} img/s ({seconds:.1f} s)")
    per_sample, batched = rates.values()
    print(f"{preset} {size} px: the device build is {batched / per_sample:.2f}x the per-sample build")
    if preset == "cifar":
        small_device_rate = batched
# The 32 px device build reinforced: a ResNet-18 teacher (random weights: the cost is the same) run in
# batches on the device beside the augmentation, its top-10 stored per sample.
with open(f"{work}/teacher.py", "w") as f:
    f.write("import torch\nimport torchvision\n\n\ndef resnet18():\n    torch.manual_seed(0)\n"
            "    return torchvision.models.resnet18(num_classes=10)\n")
config = BuildConfig(source=f"{work}/small.npz", out=f"{work}/cache-teacher", epochs=epochs, transform="cifar",
                     size=32, workers=workers, mode="cached", quiet=True, augment_on="device", device=device,
                     teacher=f"{work}/teacher.py:resnet18")
start = time.perf_counter()
manifest = build(config)
seconds = time.perf_counter() - start
rate = sum(e["samples"] for e in manifest["epoch_list"]) / seconds
print(f"cifar 32 px, --augment-on device --device {device} --teacher (ResNet-18, top-10) {rate:>10,.0f} img/s "
      f"({seconds:.1f} s): {rate / small_device_rate:.2f}x the device build without a teacher")
EOF
}

live_caches() {  # live caches for the feed rows (device-augmented, per sample) and a val cache for train.py
    local args=(--epochs "$EPOCHS" --workers "$WORKERS" --quiet --mode live)
    "$PYTHON" -m cachegen build "$WORK/small.npz" --out "$WORK/live" --transform cifar --augment-on device "${args[@]}" &&
    "$PYTHON" -m cachegen build "$WORK/small.npz" --out "$WORK/live-cpu" --transform cifar --augment-on cpu "${args[@]}" &&
    "$PYTHON" -m cachegen build "$WORK/big.npz" --out "$WORK/big-live" --transform imagenet --size "$CROP" \
        --augment-on device "${args[@]}" &&
    "$PYTHON" -m cachegen build "$WORK/big.npz" --out "$WORK/big-live-cpu" --transform imagenet --size "$CROP" \
        --augment-on cpu "${args[@]}" &&
    "$PYTHON" -m cachegen build "$WORK/small.npz" --out "$WORK/val" --transform val --stats-from "$WORK/cache" \
        --workers "$WORKERS" --quiet && echo "built the live and val caches"
}

train_each() {  # scripts/train.py a few steps with each loader, on the default device
    local loader cache rc=0
    for loader in cached live online; do
        cache="$WORK/cache"; [ "$loader" = live ] && cache="$WORK/live-cpu"
        # each line named by its loader: the figures section shows the img/s lines alone
        "$PYTHON" scripts/train.py --cache "$cache" --val "$WORK/val" --loader "$loader" --epochs 1 $TRAIN 2>&1 \
            | sed "s/^/train.py --loader $loader: /"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    done
    return $rc
}

export PYTHON WORK SAMPLES EPOCHS BIG SIDE CROP WORKERS TRAIN
export -f sources build_rates live_caches train_each
# Segmentation: a cache of the sample with masks, then cached vs online batches of (images, masks) on
# this machine's device (scripts/bench_seg.py prints the ratio).
seg_check() {
    "$PYTHON" -m cachegen build --sample-masks --epochs 1 --out "$WORK/seg" --workers "$WORKERS" --quiet &&
    "$PYTHON" scripts/bench_seg.py --cache "$WORK/seg" --device "$([ "$GPU" = 1 ] && echo cuda || echo cpu)" \
        --batches 10 --repeats 2 --workers 2
}
export GPU
export -f seg_check

# The table: one row per step, in order (KEY NAME LIMIT_S COMMAND...).
step sources "sources" 30 sources
step build "build rates" 100 build_rates
step caches "live caches" 60 live_caches
step feed32 "feed 32 px: ResNet-18" 60 "$PYTHON" scripts/gpu_feed.py --model resnet18 --classes 10 "${FEED32[@]}" \
    --cached "$WORK/cache" --live-device "$WORK/live" --live-cpu "$WORK/live-cpu" --online "$WORK/cache"
step feed224 "feed $CROP px: ResNet-50" 75 "$PYTHON" scripts/gpu_feed.py --model resnet50 --classes 100 \
    "${FEED224[@]}" --cached "$WORK/big-cache" --live-device "$WORK/big-live" --live-cpu "$WORK/big-live-cpu" \
    --online "$WORK/big-cache"
step train "train.py, each loader" 60 train_each
# a jpg cache decoded in CPU threads against in batches on the GPU (nvJPEG): img/s of each and how
# close the two decodes are (scripts/gpu_decode.py; docs/gpu.md)
step jpg "jpg decode: cpu threads vs nvJPEG" 45 "$PYTHON" scripts/gpu_decode.py --source "$WORK/big.npz" \
    --out "$WORK/big-jpg" --workers "$WORKERS"
step seg "segmentation: cached vs online masks" 45 seg_check
step tests "pytest -m cuda" $(( TESTS_S / SCALE )) "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rfE --tb=short \
    --continue-on-collection-errors tests

for key in ${ONLY:-}; do
    [ -n "${KNOWN[$key]:-}" ] || { FAILED=$((FAILED + 1)); SUMMARY+=("UNKNOWN       ONLY key $key (keys: ${!KNOWN[*]})"); }
done
echo "== figures"
[ "${#FIGURES[@]}" -eq 0 ] || printf '  %s\n' "${FIGURES[@]}"
echo "== summary (GPU: $([ "$GPU" = 1 ] && echo yes || echo no), $(( $(date +%s) - began ))s)"
printf '  %s\n' "${SUMMARY[@]}"
[ "$FAILED" -eq 0 ]
