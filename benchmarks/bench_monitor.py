"""Overhead of GeometryMonitor: the same short training run with and without it, in one process.

A CNN on the 8x8 digits (10 classes), sized (width 200, 400 penultimate features) so one training
epoch takes about 5 s on a 2-core CPU, trained for --epochs epochs with validation every epoch. Runs alternate (without, with, without,
with, ...) so drift affects both alike; the script prints the wall-time overhead ratio and the
monitor's own time per validation epoch (time spent inside its hooks, measured directly), at the
monitor's default settings.

Usage: python benchmarks/bench_monitor.py [--epochs 3] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import lightning.pytorch as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_geomarkers import GeometryMonitor


class DigitsCNN(L.LightningModule):
    def __init__(self, width: int = 200):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.body(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TimedMonitor(GeometryMonitor):
    """GeometryMonitor that accumulates the wall time spent in its validation hooks."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seconds: list[float] = []
        self._t = 0.0

    def _timed(self, name, *args, **kwargs):
        t0 = time.perf_counter()
        getattr(super(), name)(*args, **kwargs)
        self._t += time.perf_counter() - t0

    def on_validation_epoch_start(self, *a, **k):
        self._t = 0.0
        self._timed("on_validation_epoch_start", *a, **k)

    def on_validation_batch_start(self, *a, **k):
        self._timed("on_validation_batch_start", *a, **k)

    def on_validation_batch_end(self, *a, **k):
        self._timed("on_validation_batch_end", *a, **k)

    def on_validation_epoch_end(self, trainer, *a, **k):
        self._timed("on_validation_epoch_end", trainer, *a, **k)
        if not trainer.sanity_checking:
            self.seconds.append(self._t)


def data(seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    train, val = random_split(TensorDataset(x, y), [1437, 360], generator=torch.Generator().manual_seed(seed))
    return DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=128)


def run(monitor: bool, epochs: int, device: str) -> tuple[float, list[float]]:
    L.seed_everything(0, verbose=False)
    train, val = data()
    callbacks = [TimedMonitor()] if monitor else []
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(DigitsCNN(), train, val)
    wall = time.perf_counter() - t0
    return wall, (callbacks[0].seconds if monitor else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    run(False, 1, args.device)  # warm-up (imports, allocator)
    without, with_, monitor_s = [], [], []
    for _ in range(args.repeats):
        without.append(run(False, args.epochs, args.device)[0])
        wall, secs = run(True, args.epochs, args.device)
        with_.append(wall)
        monitor_s += secs
    base, mon = statistics.median(without), statistics.median(with_)
    per_epoch = base / args.epochs
    print(f"{'run':<28} {'wall (s)':>9} {'per epoch (s)':>14}")
    print(f"{'without monitor':<28} {base:>9.2f} {per_epoch:>14.2f}")
    print(f"{'with GeometryMonitor':<28} {mon:>9.2f} {mon / args.epochs:>14.2f}")
    print(f"overhead: {100 * (mon / base - 1):+.1f}% wall time (median of {args.repeats} runs each)")
    print(
        f"monitor time per validation epoch: median {statistics.median(monitor_s):.3f} s, "
        f"max {max(monitor_s):.3f} s over {len(monitor_s)} epochs (10-class head, default settings)"
    )


if __name__ == "__main__":
    main()
