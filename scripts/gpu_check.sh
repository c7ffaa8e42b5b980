#!/usr/bin/env bash
# GPU check for readers/: one invocation, under 5 minutes end to end.
#
#   scripts/gpu_check.sh            # on a machine with an NVIDIA GPU (or on the CPU, at toy sizes)
#
# Measures, in one run, on the same data:
#   1. host -> device images/s for a batch of 512: uint8 pinned, uint8 pageable, float32 pinned;
#   2. ResNet-18 (batch 512, channels_last, bf16 autocast) training images/s fed by
#      a. synthetic data already on the GPU (the model's own limit),
#      b. CachedLoader over a cache built here with `cachegen build`,
#      c. a torchvision DataLoader augmenting online (the cifar preset) with 12 workers;
#      d. LiveLoader augmenting on the device (batched Kornia, `--augment-on device`), no workers;
#   3. scripts/train.py for a few steps with each loader (cached, live, online): --device cuda,
#      NCCL-free single process, bf16 autocast, channels_last, batches delivered on the GPU;
#   4. ResNet-50 at 224 px (batch 128) fed by a device-augmented live cache of 256 px images
#      (imagenet preset) against synthetic data: the share of the synthetic step rate it reaches;
#   5. the `cuda` tests (device copies, the device-augmented live path on CUDA, the GPU build);
#   and, first, the build itself: per sample in the workers vs --augment-on device --device cuda.
# Without CUDA it runs everything on the CPU at small sizes (batch 32, 2 workers, a few steps),
# so the script is known to work; those numbers mean nothing about a GPU.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    SAMPLES=50000 EPOCHS=2 WORKERS=0
else
    SAMPLES=2000 EPOCHS=1 WORKERS=2
fi
echo "gpu_check: $SAMPLES CIFAR-shaped samples, work dir $WORK"

# A CIFAR-shaped source: random pixels are enough to time reading and training.
"$PYTHON" - "$WORK/source.npz" "$SAMPLES" <<'EOF'
import sys
import numpy as np
rng = np.random.default_rng(0)
n = int(sys.argv[2])
np.savez(sys.argv[1], images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=rng.integers(0, 10, n))
EOF

began=$(date +%s)
start=$(date +%s.%N)
"$PYTHON" -m cachegen build "$WORK/source.npz" --out "$WORK/cache" --epochs "$EPOCHS" --transform cifar \
    --format npy --workers "$WORKERS" --quiet
per_sample=$("$PYTHON" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start")
# The same build augmented in batches on the device (this process on the GPU; the workers load and write).
DEV=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
start=$(date +%s.%N)
"$PYTHON" -m cachegen build "$WORK/source.npz" --out "$WORK/cache-device" --epochs "$EPOCHS" --transform cifar \
    --format npy --workers "$WORKERS" --augment-on device --device "$DEV" --quiet
batched=$("$PYTHON" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start")
echo "gpu_check: cache built per sample in ${per_sample}s; --augment-on device --device $DEV in ${batched}s" \
     "($("$PYTHON" -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$per_sample" "$batched")x)"
# The same device build reinforced: a ResNet-18 teacher (random weights: the cost is the same) run
# in batches on the device beside the augmentation, its top-10 stored per sample.
cat > "$WORK/teacher.py" <<'EOF'
import torch
import torchvision


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)
EOF
start=$(date +%s.%N)
"$PYTHON" -m cachegen build "$WORK/source.npz" --out "$WORK/cache-teacher" --epochs "$EPOCHS" --transform cifar \
    --format npy --workers "$WORKERS" --augment-on device --device "$DEV" --teacher "$WORK/teacher.py:resnet18" --quiet
reinforced=$("$PYTHON" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start")
echo "gpu_check: --augment-on device --device $DEV --teacher (ResNet-18, top-10) in ${reinforced}s," \
     "$("$PYTHON" -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$reinforced" "$batched")x" \
     "the build without a teacher"

"$PYTHON" -m cachegen build "$WORK/source.npz" --out "$WORK/live-device" --epochs "$EPOCHS" --transform cifar \
    --mode live --augment-on device --workers "$WORKERS" --quiet

"$PYTHON" - "$WORK/cache" "$WORK/source.npz" "$WORK/live-device" <<'EOF'
import sys
import time

import numpy as np
import torch
import torchvision
from torchvision import transforms as T

from readers import CachedLoader, LiveLoader

cache, source = sys.argv[1], sys.argv[2]
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
batch = 512 if cuda else 32
steps = 60 if cuda else 3
workers = 12 if cuda else 2
print(f"device {torch.cuda.get_device_name() if cuda else 'cpu (toy sizes: numbers mean nothing)'}, "
      f"batch {batch}, torch {torch.__version__}")


def sync():
    if cuda:
        torch.cuda.synchronize()


def rate(name, images, seconds):
    print(f"  {name:<62} {images / seconds:>12,.0f} img/s")
    return images / seconds


# 1. Host -> device copies.
print("host -> device, batch of 512 CIFAR images")
copies = 200 if cuda else 5
for name, dtype, pin in (("uint8 pinned", torch.uint8, True), ("uint8 pageable", torch.uint8, False),
                         ("float32 pinned", torch.float32, True)):
    host = torch.zeros((512, 32, 32, 3), dtype=dtype, pin_memory=pin and cuda)
    host.to(device, non_blocking=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(copies):
        host.to(device, non_blocking=True)
    sync()
    rate(name, copies * 512, time.perf_counter() - t0)

# 2. ResNet-18 training fed three ways.
model = torchvision.models.resnet18(num_classes=10).to(device, memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()


def step(x, y):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train(batches, n):
    """Images/s over n steps, after 3 warm-up steps."""
    it = iter(batches)
    for _ in range(3):
        step(*next(it))
    sync()
    t0, seen = time.perf_counter(), 0
    for _ in range(n):
        x, y = next(it)
        step(x, y)
        seen += len(x)
    sync()
    return seen, time.perf_counter() - t0


def forever(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


print(f"ResNet-18 training, batch {batch}")
x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,), device=device)
synthetic = rate("synthetic data already on the device", *train(iter(lambda: (x, y), None), steps))

loader = CachedLoader(cache, batch_size=batch, device=device, channels_last=True, drop_last=True)
cached = rate("CachedLoader (uint8 pinned, side stream, normalise on device)", *train(forever(loader), steps))

data = np.load(source)
mean, std = loader.manifest.mean, loader.manifest.std
augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2),
                     T.ToTensor(), T.Normalize(mean, std)])


class Online(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return augment(Image.fromarray(self.images[i])), int(self.labels[i])


dl = torch.utils.data.DataLoader(Online(data["images"], data["labels"]), batch_size=batch, shuffle=True,
                                 num_workers=workers, pin_memory=cuda, drop_last=True, persistent_workers=True,
                                 prefetch_factor=4, multiprocessing_context="fork")


def to_device(batches):
    for xb, yb in batches:
        yield (xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
               yb.to(device, non_blocking=True))


online = rate(f"DataLoader, online augmentation, {workers} workers", *train(to_device(forever(dl)), steps))
live = LiveLoader(sys.argv[3], batch_size=batch, device=device, channels_last=True, drop_last=True)
assert live.augment_on == "device", live.augment_on
batched = rate("LiveLoader, batched augmentation on the device, no workers", *train(forever(live), steps))
print(f"CachedLoader reaches {cached / synthetic:.0%} of the synthetic-data rate; "
      f"device-augmented live {batched / synthetic:.0%} (goal >= 90 %); online augmentation {online / synthetic:.0%}")
EOF

# 4. ResNet-50 at 224 px fed by a device-augmented live cache (256 px source, imagenet preset).
if [ "$SAMPLES" -gt 10000 ]; then BIG=2000 SIDE=256 CROP=224; else BIG=64 SIDE=72 CROP=64; fi
"$PYTHON" - "$WORK/big.npz" "$BIG" "$SIDE" <<'EOF'
import sys
import numpy as np
rng = np.random.default_rng(1)
n, side = int(sys.argv[2]), int(sys.argv[3])
# smooth random content (8x8 blocks of noise): crops and resizes have edges to move
small = rng.integers(0, 256, (n, side // 8, side // 8, 3), dtype=np.uint8)
np.savez(sys.argv[1], images=small.repeat(8, 1).repeat(8, 2), labels=rng.integers(0, 100, n))
EOF
"$PYTHON" -m cachegen build "$WORK/big.npz" --out "$WORK/live-big" --epochs 2 --transform imagenet --size "$CROP" \
    --mode live --augment-on device --workers "$WORKERS" --quiet
"$PYTHON" - "$WORK/live-big" "$CROP" <<'EOF'
import sys
import time

import torch
import torchvision

from readers import LiveLoader

cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
batch, steps, crop = (128, 40, int(sys.argv[2])) if cuda else (8, 2, int(sys.argv[2]))
model = torchvision.models.resnet50(num_classes=100).to(device, memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def step(x, y):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run(batches):
    it = iter(batches)
    for _ in range(3):
        step(*next(it))
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    if cuda:
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def forever(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 100, (batch,), device=device)
synthetic = run(iter(lambda: (x, y), None))
live = LiveLoader(sys.argv[1], batch_size=batch, device=device, channels_last=True, drop_last=True)
fed = run(forever(live))
print(f"ResNet-50 at {crop} px, batch {batch}: synthetic {synthetic:,.0f} img/s, device-augmented live "
      f"({live.augment_on}) {fed:,.0f} img/s: {fed / synthetic:.0%} of synthetic (goal >= 90 %)")
EOF

# 5. The CUDA tests (skipped without a GPU).
"$PYTHON" -m pytest -q -p no:cacheprovider tests/readers/test_live_device.py tests/readers/test_reader_device.py \
    tests/cachegen/test_device_build.py \
    -k cuda | tail -3
# 3. scripts/train.py, a few steps with each loader, on the default device (cuda when there is one).
"$PYTHON" -m cachegen build "$WORK/source.npz" --out "$WORK/live" --epochs "$EPOCHS" --transform cifar \
    --mode live --workers "$WORKERS" --quiet
"$PYTHON" -m cachegen build "$WORK/source.npz" --out "$WORK/val" --transform val --stats-from "$WORK/cache" \
    --workers "$WORKERS" --quiet
if [ "$SAMPLES" -gt 10000 ]; then STEPS=30 BATCH=512; else STEPS=3 BATCH=32; fi
for loader in cached live online; do
    cache="$WORK/cache"; [ "$loader" = live ] && cache="$WORK/live"
    echo "gpu_check: scripts/train.py --loader $loader, $STEPS steps"
    "$PYTHON" scripts/train.py --cache "$cache" --val "$WORK/val" --loader "$loader" --epochs 1 \
        --max-steps "$STEPS" --batch-size "$BATCH" --workers 2 | sed 's/^/  /'
done

echo "gpu_check: done in $(( $(date +%s) - began ))s"
