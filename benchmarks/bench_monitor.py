"""Overhead of GeometryMonitor at its default settings, on a small and on an ImageNet-sized head.

``--case digits`` (default): a CNN on the 8x8 digits (10 classes), sized (width 200, 400 penultimate
features) so one training epoch takes about 5 s on a 2-core CPU, trained for --epochs epochs with
validation every epoch. Runs alternate (without, then with the monitor at each ``--workers`` setting,
repeated) so drift affects all alike; the script prints the wall-time overhead ratio and the monitor's
own time per validation epoch (time spent inside its hooks, measured directly) per setting.

``--case large``: a 1000-class head on 2048-wide penultimate features (a synthetic module: 32-d inputs,
Linear(32, 2048) + ReLU, Linear(2048, 1000)), 50 validation samples per class (50,000 rows).
``trainer.validate`` runs once without and then with the monitor, each setting (torch threads 1 and 2,
for the process and as the monitor's ``num_threads``, times the monitor's ``workers``) in a fresh
subprocess; it prints the monitor's time per validation epoch, its extra peak memory (the process's
maxrss after the run with the monitor minus after the run without, which already reached the
validation loop's own peak) and each marker's own time (``MarkerReport.seconds``; they overlap when
``workers > 1``).

``--case functional``: ``geometry_markers`` itself, all default markers, on 1000 classes x 50 points x
2048 features (float32, ReLU of Gaussian class clouds), 1 thread, in a fresh subprocess: total time,
seconds per marker and the process's peak memory (maxrss, input included; the input is built in place
so that building it does not set the peak). Target: under 2 GB.

Every line states the thread count and the 1-minute load average (``os.getloadavg()``).

``--workers 1 2`` (default) measures the monitor's ``workers`` settings side by side (digits: in the
alternation; large: one subprocess each). ``--busy 2`` runs the large case with two busy-looping processes
on the cores.

Usage: python benchmarks/bench_monitor.py [--case digits|large|functional] [--epochs 3] [--repeats 2]
       [--threads 1 2] [--workers 1 2] [--busy 0] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import lightning.pytorch as L
import torch
from machine import machine_line
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import lightning_geomarkers.callbacks.monitor as monitor_module
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


def run(monitor: bool, epochs: int, device: str, workers: int = 2) -> tuple[float, list[float]]:
    L.seed_everything(0, verbose=False)
    train, val = data()
    callbacks = [TimedMonitor(workers=workers)] if monitor else []
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


class LargeHead(L.LightningModule):
    """A 1000-class head on 2048-wide ReLU features: what the monitor sees on an ImageNet model."""

    def __init__(self, n_in: int = 32, width: int = 2048, n_classes: int = 1000):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, width), nn.ReLU())
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.fc(self.body(x))

    def validation_step(self, batch, batch_idx):
        self(batch[0])


def large_data(n_classes: int = 1000, per_class: int = 50, n_in: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = 2.0 * torch.randn(n_classes, n_in, generator=g)[y] + torch.randn(y.numel(), n_in, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=500)


def large_worker(threads: int, workers: int, device: str) -> dict:
    """One setting in this (fresh) process: validate without, then with the monitor (``threads`` torch
    threads in the process and for the monitor, ``workers`` concurrent markers)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    seconds: list[dict[str, float]] = []
    original = monitor_module.geometry_markers

    def recording(*args, **kwargs):
        report = original(*args, **kwargs)
        seconds.append(dict(getattr(report, "seconds", {})))  # older versions: no timings
        return report

    monitor_module.geometry_markers = recording
    L.seed_everything(0, verbose=False)
    model, loader = LargeHead(), large_data()
    kwargs = dict(
        accelerator=device, devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    L.Trainer(**kwargs).validate(model, loader, verbose=False)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monitor = TimedMonitor(num_threads=threads, workers=workers)
    L.Trainer(callbacks=[monitor], **kwargs).validate(model, loader, verbose=False)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "threads": threads,
        "workers": workers,
        "monitor_s": monitor.seconds[0] if monitor.seconds else float("nan"),
        "extra_peak_mb": (peak_kb - base_kb) / 1024,
        "marker_s": seconds[0] if seconds else {},
        "load": os.getloadavg()[0],
    }


def busy_processes(n: int) -> list[subprocess.Popen]:
    """``n`` busy-looping processes (a CPU shared with DataLoader workers or other jobs)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main_large(args: argparse.Namespace) -> None:
    print("1000-class head, N=2048, 50 validation samples per class, monitor at default settings")
    if args.busy:
        print(f"with {args.busy} busy-looping processes on the cores")
    rows = {}
    for threads in args.threads:
        for workers in args.workers:
            hogs = busy_processes(args.busy)
            try:
                time.sleep(1.0 if args.busy else 0.0)
                load = os.getloadavg()[0]
                cmd = [sys.executable, __file__, "--case", "large", "--worker", str(threads)]
                cmd += ["--workers", str(workers), "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows[threads, workers] = res
            print(
                f"threads {threads}, workers {workers}: monitor {res['monitor_s']:.2f} s per validation epoch, "
                f"extra peak memory {res['extra_peak_mb']:.0f} MB (load {load:.2f} before, "
                f"{res['load']:.2f} after)"
            )
            shares = ", ".join(
                f"{k} {v:.2f} s" for k, v in sorted(res["marker_s"].items(), key=lambda kv: -kv[1])
            )
            print(
                f"  inside geometry_markers (each part's own time; they overlap with workers > 1): {shares}"
            )
    for threads in args.threads:
        if (threads, 1) in rows and (threads, 2) in rows:
            ratio = rows[threads, 1]["monitor_s"] / rows[threads, 2]["monitor_s"]
            print(f"threads {threads}: workers 1 / workers 2 time ratio {ratio:.2f}")
    print("targets: under 3 s per validation epoch and under 300 MB extra peak memory")


def functional_worker() -> dict:
    """``geometry_markers`` on 1000 x 50 x 2048 in this (fresh) process, 1 thread."""
    torch.set_num_threads(1)
    from lightning_geomarkers.functional import geometry_markers

    g = torch.Generator().manual_seed(0)
    y = torch.arange(1000).repeat_interleave(50)
    centers = torch.randn(1000, 2048, generator=g)
    x = torch.randn(50000, 2048, generator=g)
    for start in range(0, 50000, 1000):  # in place: building the input must not set the peak
        x[start : start + 1000] += centers[y[start : start + 1000]]
    x.relu_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    report = geometry_markers(x, y, markers="all", generator=0)
    return {
        "seconds": time.perf_counter() - t0,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "before_mb": before,
        "marker_s": report.seconds,
        "computed": len(report.values),
        "load": os.getloadavg()[0],
    }


def main_functional() -> None:
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--case", "functional", "--worker", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"geometry_markers, 1000 classes x 50 x 2048, all markers ({res['computed']} computed), 1 thread: "
        f"{res['seconds']:.1f} s, peak memory {res['peak_mb']:.0f} MB (process, input included; "
        f"{res['before_mb']:.0f} MB before the call), load {load:.2f} before, {res['load']:.2f} after"
    )
    total = sum(res["marker_s"].values())
    print(
        "  "
        + ", ".join(
            f"{k} {v:.1f} s ({100 * v / total:.0f}%)"
            for k, v in sorted(res["marker_s"].items(), key=lambda kv: -kv[1])
        )
    )
    print("target: under 2 GB peak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("digits", "large", "functional"), default="digits")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread settings (--case large)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="monitor `workers` settings (--case large, digits)",
    )
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes alongside (--case large)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker:
        if args.case == "functional":
            result = functional_worker()
        else:
            result = large_worker(args.worker, args.workers[0], args.device)
        print(json.dumps(result))
        return
    print(f"{machine_line(args.device)}; threads {torch.get_num_threads()}")
    if args.case == "large":
        main_large(args)
        return
    if args.case == "functional":
        main_functional()
        return
    run(False, 1, args.device)  # warm-up (imports, allocator)
    without: list[float] = []
    with_: dict[int, list[float]] = {w: [] for w in args.workers}
    monitor_s: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):  # alternating, so drift affects every setting alike
        without.append(run(False, args.epochs, args.device)[0])
        for workers in args.workers:
            wall, secs = run(True, args.epochs, args.device, workers)
            with_[workers].append(wall)
            monitor_s[workers] += secs
    base = statistics.median(without)
    print(f"{'run':<28} {'wall (s)':>9} {'per epoch (s)':>14}")
    print(f"{'without monitor':<28} {base:>9.2f} {base / args.epochs:>14.2f}")
    for workers in args.workers:
        mon = statistics.median(with_[workers])
        print(f"{f'GeometryMonitor, workers {workers}':<28} {mon:>9.2f} {mon / args.epochs:>14.2f}")
    for workers in args.workers:
        mon = statistics.median(with_[workers])
        print(
            f"workers {workers}: overhead {100 * (mon / base - 1):+.1f}% wall time (median of {args.repeats} "
            f"runs); monitor time per validation epoch: median {statistics.median(monitor_s[workers]):.3f} s, "
            f"max {max(monitor_s[workers]):.3f} s over {len(monitor_s[workers])} epochs (10-class head; "
            f"training at {torch.get_num_threads()} torch threads, the monitor at its default num_threads=1 "
            f"per worker; load {os.getloadavg()[0]:.2f})"
        )


if __name__ == "__main__":
    main()
