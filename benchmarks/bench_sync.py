"""The DDP gather of a ``PerClassSample``: this package's sync against torchmetrics' plain one.

Each of ``--world`` processes (gloo on this machine, one thread each) fills a ``PerClassSample`` with its
shard (rows ``rank::world``) of ``--classes`` classes of ``samples_per_class x world`` ReLU-like rows of
``--width`` float32 features, so every rank holds a full store of ``classes x samples_per_class`` rows, as
the monitor's default sample of a 1000-class head does (100 x 50 x 2048: 39 MB). Then, alternately
(``--repeats`` times each, on clones of the same sample), it runs:

* ``sync()`` of this package: labels and keys gathered first, then only the selected rows' features;
* torchmetrics' ``Metric._sync_dist`` (every rank's whole store gathered with ``cat``), followed by the
  same bottom-k re-selection: what this package did before.

Per variant it prints, on rank 0 and as the largest over the ranks, the time and the extra resident
memory during the sync (the resident size sampled every millisecond by a thread, minus the size before
the sync), the feature rows each rank received, and whether both variants give the single-process
sample (checked on rank 0 against a sample fed every rank's rows).

Usage: python benchmarks/bench_sync.py [--world 4] [--classes 100] [--per-class 50] [--width 2048]
[--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import machine_line
from torchmetrics import Metric

from lightning_geomarkers.metrics import PerClassSample


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    """Largest resident size seen by a thread polling every millisecond while the block runs."""

    def __enter__(self) -> _PeakRss:
        self.before = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def shard(
    rank: int, world: int, classes: int, per_class: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows of the data set (the same data set on every rank, drawn from one seed)."""
    gen = torch.Generator().manual_seed(0)
    n = classes * per_class * world
    labels = torch.arange(classes).repeat_interleave(per_class * world)
    rows = torch.arange(rank, n, world)
    out = torch.empty(rows.numel(), width)
    for i, part in enumerate(rows.split(4096)):  # the same rows on every rank, whatever it holds
        g = torch.Generator().manual_seed(int(gen.initial_seed()) + i * world + rank)
        out[i * 4096 : i * 4096 + part.numel()] = torch.randn(part.numel(), width, generator=g).relu_()
    return out, labels[rows]


def _plain_sync(sample: PerClassSample) -> None:
    """torchmetrics' own gather of every state, then this package's re-selection (the earlier method)."""
    Metric._sync_dist(sample)  # type: ignore[arg-type]
    sample.features = [sample.features.reshape(-1, sample.features.shape[-1])]  # type: ignore[union-attr]
    sample.labels, sample.keys = [sample.labels.reshape(-1)], [sample.keys.reshape(-1)]  # type: ignore[union-attr]
    sample.seen_classes, sample.seen_counts = [sample.seen_classes], [sample.seen_counts]  # type: ignore[list-item]
    seen_c, seen_n = sample._seen()
    sample.seen_classes, sample.seen_counts = [seen_c], [seen_n]
    sample._compact(force=True)


def worker(rank: int, world: int, args: argparse.Namespace, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = shard(rank, world, args.classes, args.per_class, args.width)
    base = PerClassSample(args.per_class, max_classes=args.classes, seed=0)
    base.update(x, y)
    del x, y
    results = {}
    for _ in range(args.repeats):
        for name in ("this package", "torchmetrics cat"):
            sample = base.clone()
            dist.barrier()
            with _PeakRss() as mem:
                t0 = time.perf_counter()
                if name == "this package":
                    sample.sync(should_sync=True, distributed_available=lambda: True)
                else:
                    _plain_sync(sample)
                    sample._is_synced = True
                dt = time.perf_counter() - t0
            feats, labels, keys = sample.state()
            digest = (tuple(feats.shape), float(feats.double().sum()), labels.tolist(), keys.tolist())
            best = results.get(name)
            row = (dt, mem.peak - mem.before, digest)
            results[name] = row if best is None or dt < best[0] else (dt, max(best[1], row[1]), digest)
            del sample, feats
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {k: v[:2] for k, v in results.items()})
    if rank == 0:
        full = PerClassSample(args.per_class, max_classes=args.classes, seed=0)
        for r in range(world):
            xr, yr = shard(r, world, args.classes, args.per_class, args.width)
            full.update(xr, yr)
            del xr, yr
        f, lab, k = full.state()
        ref = (tuple(f.shape), float(f.double().sum()), lab.tolist(), k.tolist())
        for name, (dt, extra, digest) in results.items():
            times = [g[name][0] for g in gathered]
            extras = [g[name][1] for g in gathered]
            out[name] = (dt, max(times), extra, max(extras), digest == ref)
        out["store_mb"] = f.numel() * f.element_size() / 2**20
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(machine_line())
    print(
        f"world {args.world} (gloo, 1 thread each), store {args.classes} classes x {args.per_class} x "
        f"{args.width} float32 per rank, best of {args.repeats}"
    )
    with mp.Manager() as manager:
        out = manager.dict()
        port = 29500 + os.getpid() % 1000
        mp.spawn(worker, args=(args.world, args, port, out), nprocs=args.world, join=True)
        res = dict(out)
    print(f"store: {res.pop('store_mb'):.1f} MB")
    print(
        f"{'variant':<18} {'rank-0 s':>9} {'max s':>8} {'rank-0 +MB':>11} {'max +MB':>8}  equals one process"
    )
    for name, (dt, dt_max, extra, extra_max, equal) in res.items():
        print(f"{name:<18} {dt:9.3f} {dt_max:8.3f} {extra:11.1f} {extra_max:8.1f}  {equal}")
    a, b = res["this package"], res["torchmetrics cat"]
    print(
        f"ratio (torchmetrics cat / this package): time {b[1] / a[1]:.2f}x, extra memory {b[3] / max(a[3], 1e-9):.2f}x"
    )


if __name__ == "__main__":
    main()
