"""Train with Hugging Face Accelerate, fed by a cachegen cache (a small CNN; a few seconds an epoch on a CPU).

    cachegen build --epochs 4 --out cache
    cachegen build --split test --transform val --stats-from cache --out cache-val
    python scripts/train_accelerate.py --cache cache --val cache-val --epochs 4 --save state
    accelerate launch --num_processes 2 --cpu scripts/train_accelerate.py --cache cache --val cache-val
    torchrun --nproc_per_node 2 scripts/train_accelerate.py --cache cache --val cache-val

The loaders need no `prepare`: they already deliver this rank's share on `accelerator.device`
(`prepare` hands them back unchanged). `register_for_checkpointing(loader)` puts the loader's
position in `save_state`/`load_state`, so --resume continues exactly where --save left off.
For Accelerate's `skip_first_batches(loader, n)` use `loader.skip_first_batches(n)`.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn

from readers import CachedLoader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="cache")
    p.add_argument("--val", default="cache-val", help="a cache built with --transform val (--stats-from CACHE)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--save", help="save_state into this folder after every epoch")
    p.add_argument("--resume", help="a folder written by --save: continue from there, exactly")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    # cpu=True without CUDA: otherwise Accelerate (1.x) under torchrun starts the process group but
    # treats each process as a lone one (no gradient averaging).
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    device = accelerator.device
    train = CachedLoader(args.cache, batch_size=args.batch_size, device=device, channels_last=cuda)
    val = CachedLoader(args.val, batch_size=256, shuffle=False, device=device, channels_last=cuda)
    channels, classes = train.manifest.shape[2], len(train.manifest.classes)
    width = 16
    model = nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2 * width, classes))
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(train)
    if args.resume:
        accelerator.load_state(args.resume)

    for epoch in range(train.epoch, args.epochs):  # after --resume, train.epoch is where it left off
        train.set_epoch(epoch)  # optional: a pass after a completed one reads the next epoch anyway
        model.train()
        for images, labels in train:
            with accelerator.autocast():
                loss = nn.functional.cross_entropy(model(images), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.save:
            accelerator.save_state(args.save)
        model.eval()
        correct = torch.zeros(2, device=device)
        with torch.no_grad(), accelerator.autocast():
            for images, labels in val:  # each rank scores its share; reduce adds them up
                correct += torch.tensor([(model(images).argmax(1) == labels).sum().item(), len(labels)], device=device)
        correct = accelerator.reduce(correct, reduction="sum")
        accelerator.print(f"epoch {epoch}  loss {loss.item():.3f}  val accuracy {100 * correct[0] / correct[1]:.2f} %")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
