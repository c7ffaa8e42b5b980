"""Train with PyTorch Lightning, fed by a cachegen cache (a small CNN; a few seconds an epoch on a CPU).

    cachegen build --epochs 4 --out cache
    cachegen build --split test --transform val --stats-from cache --out cache-val
    python scripts/train_lightning.py --cache cache --val cache-val --epochs 4
    python scripts/train_lightning.py --cache cache --val cache-val --devices 2 --strategy ddp   # 2 processes

Lightning takes CachedLoader as it is: an iterable with len(); it calls `loader.sampler.set_epoch`
at every epoch, saves `loader.state_dict()` in its checkpoints and restores it (--resume CKPT
continues exactly, mid-epoch too). It injects no DistributedSampler (the loader is no DataLoader):
the loader splits the cache by rank itself when a pass starts.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn

from readers import CachedLoader, load_manifest


class Data(L.LightningDataModule):
    def __init__(self, cache: str, val: str, batch_size: int) -> None:
        super().__init__()
        self.cache, self.val, self.batch_size = cache, val, batch_size

    def _loader(self, cache: str, **options) -> CachedLoader:
        # Built when Lightning asks: its process group is up and this rank's device chosen.
        device = self.trainer.strategy.root_device
        return CachedLoader(cache, device=device, channels_last=device.type == "cuda", **options)

    def train_dataloader(self) -> CachedLoader:
        return self._loader(self.cache, batch_size=self.batch_size)

    def val_dataloader(self) -> CachedLoader:
        return self._loader(self.val, batch_size=256, shuffle=False)  # each rank scores its share


class Classifier(L.LightningModule):
    def __init__(self, classes: int, channels: int, lr: float, width: int = 16) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(2 * width, classes))

    def training_step(self, batch, index):
        images, labels = batch
        loss = nn.functional.cross_entropy(self.net(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, index):
        images, labels = batch
        accuracy = (self.net(images).argmax(1) == labels).float().mean()
        self.log("val_acc", accuracy, sync_dist=True, batch_size=len(labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="cache")
    p.add_argument("--val", default="cache-val", help="a cache built with --transform val (--stats-from CACHE)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="auto, or ddp for several processes")
    p.add_argument("--out", default="lightning_logs", help="checkpoints go here")
    p.add_argument("--resume", help="a checkpoint (.ckpt) to continue from, exactly")
    args = p.parse_args()

    manifest = load_manifest(args.cache)
    cuda = torch.cuda.is_available()
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=args.devices, strategy=args.strategy,
                        precision="bf16-mixed" if cuda else "32-true", max_epochs=args.epochs,
                        default_root_dir=args.out, logger=False, enable_progress_bar=False)
    model = Classifier(len(manifest.classes), manifest.shape[2], args.lr)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    trainer.fit(model, datamodule=Data(args.cache, args.val, args.batch_size), ckpt_path=args.resume)
    if trainer.is_global_zero:
        print(f"val accuracy {100 * trainer.callback_metrics['val_acc'].item():.2f} % after {args.epochs} epochs")


if __name__ == "__main__":
    main()
