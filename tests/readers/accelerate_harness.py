"""Run by test_frameworks.py under torchrun (2 CPU processes): a real accelerate.Accelerator with a
CachedLoader that passes through `prepare`, registered for checkpointing, epochs advancing
without set_epoch. Each rank writes what it trained on, batch by batch, to OUT/rank<r>.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator

from loader_checks import digest, harness_arguments
from readers import CachedLoader


def main() -> None:
    args = harness_arguments("a folder written by save_state")

    accelerator = Accelerator(cpu=True)
    loader = CachedLoader(args.cache, batch_size=args.batch_size, device=accelerator.device, normalize=False, seed=11)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(loader.manifest.shape), 7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
    assert prepared is loader  # not a DataLoader: prepare hands it back as it is
    accelerator.register_for_checkpointing(loader)
    if args.resume:
        accelerator.load_state(args.resume)
    seen, steps = [], 0
    for _ in range(loader.epoch, args.epochs):  # no set_epoch: each completed pass moves to the next epoch
        for images, labels in loader:
            hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
            seen.append({"epoch": loader.epoch, "samples": [digest(img.tobytes(), int(y)) for img, y in zip(hwc, labels)]})
            loss = torch.nn.functional.cross_entropy(model(images.float() / 255), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            if steps == args.stop_at_step:
                accelerator.save_state(str(Path(args.out) / "state"))
                break
        if steps == args.stop_at_step:
            break
    Path(args.out, f"rank{accelerator.process_index}.json").write_text(json.dumps(
        {"rank": loader.rank, "world_size": loader.world_size, "batches": seen}))
    accelerator.wait_for_everyone()  # no rank tears the process group down while another still uses it
    accelerator.end_training()


if __name__ == "__main__":
    main()
