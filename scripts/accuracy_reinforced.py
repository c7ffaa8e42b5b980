"""Does a reinforced cache pay? Train a teacher first (a wider net, trained longer on the same
cache), build the same cache again with `--teacher` (the same images, plus its top-K per sample),
then train the same student for E epochs on the plain cache (labels) and on the reinforced one
(--distill), several seeds each, on the built-in sample; print mean ± std.

    python scripts/accuracy_reinforced.py --epochs 10 --seeds 3 --train-size 1000   # ~30 min, 2 CPU cores

The student never runs the teacher: its cost per step is the plain run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cachegen.sources.sample import make_sample

HERE = Path(__file__).resolve().parent

# The teacher as `cachegen build --teacher` loads it: the trained small_resnet behind the
# normalisation it was trained with, taking the stored pixels / 255.
TEACHER_FACTORY = '''
import sys

import torch
from torch import nn

sys.path.insert(0, {scripts!r})
from train import small_resnet  # noqa: E402


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def make():
    model = small_resnet({classes}, channels={channels}, width={width})
    model.load_state_dict(torch.load({weights!r}, map_location="cpu", weights_only=True))
    return nn.Sequential(Normalize({mean}, {std}), model)
'''


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def cachegen(*args: str) -> None:
    sh(sys.executable, "-m", "cachegen", *args, "--quiet")


def train(cache: Path, val: Path, results: Path, tag: str, *args: str) -> None:
    sh(sys.executable, str(HERE / "train.py"), "--cache", str(cache), "--val", str(val), "--json", str(results),
       "--tag", tag, "--device", "cpu", *args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10, help="student epochs (and cached epochs)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--width", type=int, default=8, help="the student's")
    p.add_argument("--teacher-width", type=int, default=16)
    p.add_argument("--teacher-epochs", type=int, default=0, help="0: twice --epochs")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--label-weights", default="0", help="--distill runs, one per weight of the hard labels (0: pure KD)")
    p.add_argument("--temperatures", default="1", help="--distill runs: one per KD temperature (with each weight)")
    p.add_argument("--train-size", type=int, default=1000, help="train on the first K images of the sample")
    args = p.parse_args()
    E = args.epochs
    weights = [float(w) for w in args.label_weights.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    with tempfile.TemporaryDirectory(prefix="cachegen-kd-") as tmp:
        tmp = Path(tmp)
        results = tmp / "results.jsonl"
        source = tmp / "train.npz"
        images, labels, classes = make_sample()
        np.savez(source, images=images[:args.train_size], labels=labels[:args.train_size], classes=np.array(classes))
        plain, reinforced, val = tmp / "plain", tmp / "reinforced", tmp / "val"
        common = ("--epochs", str(E), "--transform", "cifar", "--workers", "2")
        cachegen("build", str(source), "--out", str(plain), *common)
        cachegen("build", "--split", "test", "--transform", "val", "--stats-from", str(plain), "--out", str(val))

        print("--- teacher", flush=True)
        weights_file = tmp / "teacher.pt"
        train(plain, val, results, "teacher", "--epochs", str(args.teacher_epochs or 2 * E), "--width",
              str(args.teacher_width), "--save", str(weights_file))
        manifest = json.loads((plain / "manifest.json").read_text())
        factory = tmp / "teacher.py"
        factory.write_text(TEACHER_FACTORY.format(scripts=str(HERE), classes=len(manifest["classes"]),
                                                  channels=manifest["output_shape"][2], width=args.teacher_width,
                                                  weights=str(weights_file), mean=manifest["mean"],
                                                  std=manifest["std"]))
        cachegen("build", str(source), "--out", str(reinforced), *common, "--teacher", f"{factory}:make",
                 "--teacher-topk", str(args.topk))

        runs = [("plain", plain, ())] + [
            (f"reinforced w={w:g} T={t:g}", reinforced, ("--distill", "--label-weight", str(w), "--temperature", str(t)))
            for w in weights for t in temperatures]
        for seed in range(args.seeds):
            for tag, cache, extra in runs:
                print(f"--- {tag} seed {seed}", flush=True)
                train(cache, val, results, tag, "--epochs", str(E), "--seed", str(seed), "--width", str(args.width),
                      *extra)
        rows = [json.loads(line) for line in results.read_text().splitlines()]
    teacher = next(r for r in rows if r["tag"] == "teacher")
    print(f"\nval accuracy after {E} student epochs, mean ± std over {args.seeds} seeds (built-in sample: "
          f"{args.train_size} train / 1000 test images; student small ResNet width {args.width}; teacher width "
          f"{args.teacher_width}, {teacher['epochs']} epochs: {teacher['accuracy'] * 100:.2f} %; top-{args.topk})")
    for tag, _, _ in runs:
        accs = [r["accuracy"] * 100 for r in rows if r["tag"] == tag]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        w, t = (part.partition("=")[2] for part in tag.split()[1:]) if tag != "plain" else ("", "")
        label = "plain cached (labels)" if tag == "plain" else \
            f"reinforced, --distill --label-weight {w} --temperature {t}"
        print(f"  {label:62s} {statistics.mean(accs):6.2f} ± {spread:4.2f} %   {[round(a, 1) for a in accs]}")


if __name__ == "__main__":
    main()
