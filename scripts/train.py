"""Train a small ResNet-style CNN from a cache, with the cache, live augmentation, or online
augmentation feeding it; logs img/s and data-wait % per epoch and the accuracy on a val cache.

    cachegen build --epochs 16 --out cache
    cachegen build --split test --transform val --stats-from cache --out cache-val
    python scripts/train.py --cache cache --val cache-val --loader cached --epochs 16
    torchrun --nproc_per_node 2 scripts/train.py --cache cache --val cache-val   # DDP: NCCL on GPUs, gloo on CPUs
    python scripts/train.py --cache cache --val cache-val --mixup 0.2 --cutmix 1.0   # one of the two per batch
    cachegen build --epochs 16 --teacher teacher.py:make --out reinforced      # a reinforced cache (docs/reinforced.md)
    python scripts/train.py --cache reinforced --val cache-val --distill       # knowledge distillation, no teacher run

--mixup/--cutmix mix every batch on the device through the loader's batch_transform (torchvision's
v2.MixUp / v2.CutMix; both given: v2.RandomChoice of them, as torchvision's reference recipe),
trained with soft-target cross-entropy; the online loader applies the same transform unseeded.
--distill trains on a reinforced cache's teacher targets (mixed as the images are, with --mixup).

--device defaults to cuda when there is one (each torchrun process takes cuda:LOCAL_RANK, a plain
run the current GPU); on CUDA
the model trains in channels_last with bf16 autocast, and every loader (cached, live, online)
delivers its batches on that device. On the built-in sample (5000 images, 32x32) an epoch takes
a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from cacheformat import FormatError
from cachegen.online import online_dataset, online_loader
from readers import CachedLoader, ReaderError, load_manifest, open_loader
from readers.device import resolve_device
from readers.trust import OPT_IN as READER_OPT_IN
from readers.split import default_workers, local_world_size


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def small_resnet(classes: int, channels: int = 3, width: int = 16) -> nn.Module:
    """~0.2M parameters: a stem and three residual stages (32x32 -> 8x8)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


class OnlineLoader:
    """What users do today: torchvision Dataset + DataLoader workers, normalised like the cache."""

    def __init__(self, cache: str, *, batch_size: int, workers: int, seed: int, rank: int, world_size: int,
                 mean, std, device: torch.device, channels_last: bool = False, batch_transform=None,
                 trust_code: bool = False) -> None:
        self.dataset = online_dataset(cache, trust_code=trust_code)
        self.sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=world_size, rank=rank,
                                                           shuffle=True, seed=seed)
        self.loader = online_loader(self.dataset, batch_size=batch_size, workers=workers, device=device,
                                    sampler=self.sampler)  # persistent workers, pinned on CUDA
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, -1, 1, 1)
        self.bias = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
        self.batch_transform = batch_transform  # drawn from the global generators, as a plain training loop would

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).to(torch.float32, memory_format=self.memory_format)
            x, y = x * self.scale + self.bias, y.to(self.device, non_blocking=True)
            yield self.batch_transform(x, y) if self.batch_transform is not None else (x, y)


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels)


def distillation_loss(label_weight: float, temperature: float = 1.0):
    """Knowledge distillation on stored teacher targets (Dataset Reinforcement): the soft
    cross-entropy of the student's log-probabilities against the teacher's probabilities (its
    stored top-K, renormalised to sum to 1), mixed with the hard labels' cross-entropy.

    `temperature` T softens both sides as Hinton et al.'s KD does, times T^2: the teacher's
    softmax(z / T) is p^(1/T) renormalised, exact on the stored classes (all of them when K is the
    class count), so the stored T = 1 probabilities serve any T."""
    def loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        target = teacher if temperature == 1 else teacher.pow(1 / temperature)
        target = target / target.sum(1, keepdim=True).clamp_min(1e-12)
        log_probs = torch.log_softmax(logits.float() / temperature, dim=1)
        soft = -(target * log_probs).sum(1).mean() * temperature ** 2
        return soft if label_weight == 0 else (1 - label_weight) * soft + label_weight * ce(logits, labels)
    return loss


def evaluate(model: nn.Module, loader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    model.train()
    return correct / max(total, 1)


def mixing(mixup: float, cutmix: float, classes: int):
    """The batch transform --mixup/--cutmix ask for (torchvision v2), or None."""
    from torchvision.transforms import v2

    for name, alpha in (("--mixup", mixup), ("--cutmix", cutmix)):
        if alpha < 0:
            sys.exit(f"train.py: error: {name} {alpha:g}: give an alpha > 0, or 0 for off")
    chosen = ([v2.MixUp(alpha=mixup, num_classes=classes)] if mixup else []) + \
             ([v2.CutMix(alpha=cutmix, num_classes=classes)] if cutmix else [])
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, steps: int):
    """OneCycleLR, warming up over 20% of the steps, each phase at least one step long: with fewer
    than 8 steps (a `--max-steps 5` smoke run) 20% is under one step, and OneCycleLR divides by
    zero. A single step keeps the optimizer's rate."""
    if steps < 2:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=max(0.2, 1.5 / steps))


# How this script's user lets a cache's code run (the readers' own advice names their keyword).
OPT_IN = "pass --trust-code if you trust whoever made this cache"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _names(classes, shown: int = 4) -> str:
    return ", ".join(classes[:shown]) + (", ..." if len(classes) > shown else "")


def main() -> None:
    summary, _, details = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=" ".join(summary.split()), epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="cache")
    p.add_argument("--val", default="cache-val", help="a cache built with --transform val")
    p.add_argument("--loader", choices=["cached", "live", "online"], default="cached")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=default_workers(0.75),
                   help="CPU workers of the live and online loaders (default: 75%% of this process's share of "
                        "the cores, which LOCAL_WORLD_SIZE processes split)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when available; cuda:LOCAL_RANK under torchrun) or cpu")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: train every epoch)")
    p.add_argument("--distill", action="store_true",
                   help="train on the teacher targets a reinforced cache stores (cachegen build --teacher): "
                        "soft cross-entropy, mixed with the labels' by --label-weight")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="with --distill: loss = (1 - w) * soft CE(teacher) + w * CE(labels)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="with --distill: soften the teacher's and the student's distributions by T (KD), loss x T^2")
    p.add_argument("--save", help="save the trained model's state_dict here (e.g. to use it as a teacher)")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="MixUp every batch with weights from Beta(ALPHA, ALPHA) (0: off; recipes use 0.2-0.8)")
    p.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="CutMix every batch, Beta(ALPHA, ALPHA) (0: off; recipes use 1.0); with --mixup: one of "
                        "the two per batch")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads on the CPU (0: the cores / processes); 1 on a machine shared with other work")
    p.add_argument("--json", help="append one JSON line with the result to this file")
    p.add_argument("--tag", default="", help="a label stored with the JSON result")
    p.add_argument("--trust-code", action="store_true", help="run the code the cache names (a module:factory "
                   "transform): only for a cache you trust")
    args = p.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        sys.exit(f"train.py: error: --device {args.device!r} is not a torch device (use cuda or cpu)")
    if device.index is not None and local_world_size() > 1:
        sys.exit(f"train.py: error: --device {args.device} would put all {local_world_size()} processes of this "
                 "machine on one GPU: pass --device cuda (each process takes cuda:LOCAL_RANK)")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"train.py: error: --device {args.device} but CUDA is not available here (use --device cpu)")
    if device.type not in ("cuda", "cpu"):
        sys.exit(f"train.py: error: --device {args.device}: use cuda or cpu")
    try:
        device = resolve_device(device)  # cuda: GPU LOCAL_RANK under torchrun, else the current one (0)
    except ValueError as e:
        sys.exit(f"train.py: error: --device {args.device}: {e}")
    if not args.temperature > 0 or not 0 <= args.label_weight <= 1:
        sys.exit(f"train.py: error: --temperature {args.temperature:g} must be positive and --label-weight "
                 f"{args.label_weight:g} within [0, 1]")

    distributed = "WORLD_SIZE" in os.environ
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)
    if not cuda:
        torch.set_num_threads(args.threads or default_workers())  # this process's share of the machine's cores

    # drop_last=False, as the online DataLoader: every loader takes the same number of steps per epoch.
    common = dict(batch_size=args.batch_size, seed=args.seed, device=device, drop_last=False, channels_last=cuda)
    try:
        manifest = load_manifest(args.cache)
        mix = mixing(args.mixup, args.cutmix, len(manifest.classes))
        if mix is not None:
            common["batch_transform"] = mix
        if args.loader == "live" and manifest.mode != "live":
            raise ReaderError(f"--loader live needs a live cache, and {args.cache} is a {manifest.mode!r} one: "
                              "use --loader cached, or build it with --mode live")
        if args.distill and args.loader != "cached":
            raise ReaderError("--distill reads the teacher targets of a cached (reinforced) cache: use --loader cached")
        if args.loader == "cached":
            train = CachedLoader(args.cache, **common, targets="teacher" if args.distill else "labels")
        elif args.loader == "live":
            train = open_loader(args.cache, workers=args.workers, trust_code=args.trust_code, **common)
            if rank == 0:  # auto picks per cache and device: say which
                print(f"live cache {args.cache}: augmenting on the "
                      f"{'device in batches' if train.augment_on == 'device' else 'CPU per sample'} ({train.device})")
        else:
            train = OnlineLoader(args.cache, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                                 rank=rank, world_size=world, mean=manifest.mean, std=manifest.std, device=device,
                                 channels_last=cuda, batch_transform=mix, trust_code=args.trust_code)
        val = CachedLoader(args.val, batch_size=256, shuffle=False, device=device, channels_last=cuda, rank=0,
                           world_size=1)
        classes = len(manifest.classes)  # the training cache's: the val cache must be of the same classes
        if val.manifest.classes != manifest.classes:
            raise ReaderError(f"--val {args.val} holds other classes ({len(val.manifest.classes)}: "
                              f"{_names(val.manifest.classes)}) than --cache {args.cache} ({classes}: "
                              f"{_names(manifest.classes)}): build the val cache from the same dataset's test images")
    except FormatError as e:  # ReaderError, and the online loader's CachegenError and TransformError
        sys.exit(f"train.py: error: {str(e).replace(READER_OPT_IN, OPT_IN)}")
    if args.distill and rank == 0:
        t = manifest.teacher
        print(f"distilling: soft targets from the teacher's stored top-{t.topk} of {t.classes} classes "
              f"(label weight {args.label_weight:g}, temperature {args.temperature:g})")
    if mix is not None and rank == 0:
        names = [f"{name}(alpha={alpha:g})" for name, alpha in (("MixUp", args.mixup), ("CutMix", args.cutmix)) if alpha]
        print(f"mixing every batch: {'RandomChoice of ' if len(names) > 1 else ''}{', '.join(names)}")

    model = small_resnet(classes, channels=manifest.output_shape[2], width=args.width)
    model = model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    steps = args.epochs * len(train)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = one_cycle(opt, args.lr, steps)
    loss_fn = distillation_loss(args.label_weight, args.temperature) if args.distill else ce  # ce: labels or soft targets (--mixup)

    step = 0
    for epoch in range(args.epochs):
        if step == steps:
            break
        train.set_epoch(epoch)
        waited = 0.0  # seconds blocked in next(): the host waiting for the loader
        seen = 0
        t0 = time.perf_counter()
        batches = iter(train)
        while True:
            w0 = time.perf_counter()
            try:
                images, labels, *teacher = next(batches)  # teacher: (B, classes) with --distill
            except StopIteration:
                break
            w1 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_fn(model(images), labels, *teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            waited += w1 - w0
            seen += len(labels)
            if step == steps:
                break
        if cuda:  # once, where the figure is taken: a wait every step would stall the queue the loader feeds
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        if rank == 0:
            print(f"epoch {epoch:3d}  loss {loss.item():.3f}  {seen * world / wall:7.0f} img/s  "
                  f"data wait {100 * waited / wall:4.1f} %", flush=True)
    accuracy = evaluate(model.module if distributed else model, val, device)
    if args.save and rank == 0:
        torch.save((model.module if distributed else model).state_dict(), args.save)
    if rank == 0:
        print(f"val accuracy {accuracy * 100:.2f} %  ({args.loader}, {_count(args.epochs, 'epoch')}, "
              f"{_count(step, 'step')}, seed {args.seed}, {device})")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"tag": args.tag, "loader": args.loader, "epochs": args.epochs, "seed": args.seed,
                                    "distill": args.distill, "label_weight": args.label_weight,
                                    "temperature": args.temperature, "width": args.width,
                                    "cache": args.cache, "mixup": args.mixup, "cutmix": args.cutmix,
                                    "accuracy": accuracy}) + "\n")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
