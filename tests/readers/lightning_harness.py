"""Run by test_frameworks.py: a real lightning.Trainer (CPU, `strategy="ddp"` over gloo) fed by a
CachedLoader built in the LightningModule's __init__, before Lightning starts the process group.
Each rank writes what it trained on, batch by batch, to OUT/rank<r>.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from loader_checks import digest, harness_arguments
from readers import CachedLoader


class Module(L.LightningModule):
    def __init__(self, cache: str, batch_size: int, out: str) -> None:
        super().__init__()
        # No rank or world size given, no process group yet: both are resolved when a pass starts.
        self.loader = CachedLoader(cache, batch_size=batch_size, device="cpu", normalize=False, seed=11)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(self.loader.manifest.shape), 7))
        self.out, self.seen = Path(out), []

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, index):
        images, labels = batch
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.seen.append({"epoch": self.current_epoch, "index": index,
                          "samples": [digest(img.tobytes(), int(y)) for img, y in zip(hwc, labels)]})
        return torch.nn.functional.cross_entropy(self.net(images.float() / 255), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self) -> None:
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(
            {"rank": self.loader.rank, "world_size": self.loader.world_size, "batches": self.seen}))


def main() -> None:
    args = harness_arguments("a checkpoint to continue from")
    callbacks = []
    if args.stop_at_step > 0:
        callbacks.append(ModelCheckpoint(dirpath=args.out, filename="{step}", every_n_train_steps=args.stop_at_step,
                                         save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=args.epochs,
                        max_steps=args.stop_at_step, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks), num_sanity_val_steps=0)
    trainer.fit(Module(args.cache, args.batch_size, args.out), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
