"""One-shot GPU check: CUDA results equal the CPU results, and how long each takes.

On a machine with CUDA it runs, on the CPU and on the GPU with the same inputs and seeds:

  (a) joint GLUE, P = 10, M = 50, N = 512, n_t = 200 (``bench_glue.py``'s case (a))
  (b) the pairs engine on 45 class pairs, M = 50, N = 512, n_t = 200 (case (b))
  (c) the 1000-class monitor case: 1000 classes x 50 points x 2048 features offered to the monitor's
      bounded sample (100 classes x 50 kept), then ``GeometryMonitor().compute_markers`` on that sample:
      the monitor's defaults (pairs protocol, n_pairs=100, n_t=100, projection_dim=1000, seed 0, all
      default markers), i.e. what the monitor computes at the end of each validation epoch

and checks every marker agrees to 1e-6 relative, with the same markers on both sides (probes and
dichotomies are drawn on the CPU in both runs, so the inputs are identical). The inputs are built once,
before any timing; each side is timed as the best of ``--repeats`` runs after one warm-up run (the
device copy of the inputs included). It prints the machine line, the times, and exits 1 if a check
fails. Without CUDA it prints "no CUDA device: nothing measured" and exits 0.

``--self-test`` runs the same script with the CPU in the place of the GPU (no GPU needed): every case
twice on the CPU, compared the same way. The test suite runs it, so the script is known to work before
a GPU's limited time is spent on it.

Usage: python benchmarks/gpu_check.py [--markers all|glue] [--skip-monitor] [--self-test] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from bench_glue import class_features, pairs_engine, pairs_inputs  # noqa: E402  (this folder is on sys.path when run as a script)
from machine import machine_line

from lightning_geomarkers import GeometryMonitor
from lightning_geomarkers.functional import GLUE_MARKERS, glue
from lightning_geomarkers.metrics import PerClassSample

RTOL = 1e-6


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def compare(name: str, cpu: dict[str, float], gpu: dict[str, float]) -> bool:
    """Every value of ``cpu`` has one in ``gpu`` within ``RTOL`` (relative), with the same key set; NaN
    only where the CPU has NaN. Fails on a missing or extra key, a non-finite mismatch, or nothing to
    compare."""
    worst, worst_key, failed = 0.0, "", []
    if not cpu:
        failed.append("no values to compare")
    missing, extra = sorted(set(cpu) - set(gpu)), sorted(set(gpu) - set(cpu))
    if missing or extra:
        failed.append(f"keys missing {missing[:3]} / extra {extra[:3]}")
    for key, ref in cpu.items():
        if key not in gpu:
            continue
        got = gpu[key]
        if math.isnan(ref) or math.isnan(got) or math.isinf(ref) or math.isinf(got):
            if not (ref == got or (math.isnan(ref) and math.isnan(got))):
                failed.append(f"{key}: {got} against {ref}")
            continue
        err = abs(got - ref) / max(abs(ref), 1e-12)
        if err > worst:
            worst, worst_key = err, key
    if worst > RTOL:
        failed.append(f"{worst_key}: relative difference {worst:.2e} > {RTOL:g}")
    print(
        f"  {name}: {len(cpu)} values, largest relative difference {worst:.2e} ({worst_key or '-'}): "
        + ("OK" if not failed else "FAILED: " + "; ".join(failed))
    )
    return not failed


def inputs_joint() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    mans = class_features(rng, 10, 50, 512)
    t = torch.from_numpy(rng.standard_normal((200, 512)))
    y = torch.from_numpy(rng.choice([-1.0, 1.0], size=(200, 10)))
    return torch.from_numpy(mans), t, y


def case_joint(inputs, device: str) -> dict[str, float]:
    x, t, y = (v.to(device) for v in inputs)
    res = glue(x, probes=t, dichotomies=y, num_threads=None)  # the process's threads, as printed
    return {k: float(getattr(res, k)) for k in GLUE_MARKERS}


def inputs_pairs():
    rng = np.random.default_rng(1)
    pairs, _, _, points, mask, probes, dich = pairs_inputs(class_features(rng, 10, 50, 512), rng, 200, "cpu")
    return len(pairs), points, mask, probes, dich


def case_pairs(inputs, device: str) -> dict[str, float]:
    n_pairs, *tensors = inputs
    points, mask, probes, dich = (v.to(device) for v in tensors)
    out = pairs_engine(points, mask, probes, dich)
    return {f"{k}[{i}]": float(out[k][i]) for k in GLUE_MARKERS for i in range(n_pairs)}


def inputs_monitor() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1000-class monitor case as the monitor computes it: 50,000 rows of ReLU features (1000 classes
    x 50, N = 2048) offered to the monitor's bounded sample (``samples_per_class=50``,
    ``max_classes=100``, seed 0), which keeps 100 classes x 50 rows; the markers run on that sample."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(1000).repeat_interleave(50)
    feats = (torch.randn(1000, 2048, generator=gen)[labels] + torch.randn(50_000, 2048, generator=gen)).relu()
    sample = PerClassSample(samples_per_class=50, max_classes=100, seed=0)
    sample.update(feats, labels)
    kept, kept_labels, _ = sample.state()
    return kept, kept_labels


def case_monitor(inputs, device: str, markers: str) -> dict[str, float]:
    feats, labels = inputs
    monitor = GeometryMonitor(markers=markers)  # the monitor's defaults: pairs, n_pairs=100, n_t=100, ...
    report = monitor.compute_markers(feats, labels, device)
    return {k: float(v) for k, v in report.values.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markers", default="all", help="markers of the monitor case: all or glue")
    parser.add_argument("--skip-monitor", action="store_true", help="only the two GLUE bench cases")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (the best is printed)")
    parser.add_argument(
        "--self-test", action="store_true", help="the CPU in the place of the GPU: checks the script itself"
    )
    args = parser.parse_args()
    other = "cpu" if args.self_test else "cuda"
    if other == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    device_name = "CPU (self-test)" if args.self_test else torch.cuda.get_device_name(0)
    print(machine_line(other))
    print(
        f"device: {device_name}, torch {torch.__version__}, CPU threads {torch.get_num_threads()} (every case "
        "runs with the process's threads); inputs built before the timing and moved to the device inside it"
    )
    cases = [
        ("(a) joint P=10 M=50 N=512 n_t=200", inputs_joint, case_joint),
        ("(b) 45 pairs M=50 N=512 n_t=200", inputs_pairs, case_pairs),
    ]
    if not args.skip_monitor:
        cases.append(
            (
                f"(c) 1000 classes x 50 x 2048, monitor defaults, markers={args.markers}",
                inputs_monitor,
                lambda inputs, d: case_monitor(inputs, d, args.markers),
            )
        )
    ok = True
    for name, make, fn in cases:
        inputs = make()
        times: list[float] = []
        results: list[dict[str, float]] = []
        for device in ("cpu", other):  # the same device twice in the self-test: kept apart by position
            fn(inputs, device)  # warm-up on both sides: CUDA context and kernels, caches, allocator
            best = min(
                (
                    timed(lambda fn=fn, inputs=inputs, device=device: fn(inputs, device), device)
                    for _ in range(args.repeats)
                ),
                key=lambda r: r[0],
            )
            times.append(best[0])
            results.append(best[1])
        label = "CPU again" if args.self_test else "CUDA"
        cpu_s, gpu_s = times
        print(
            f"{name}: CPU {cpu_s * 1e3:.1f} ms, {label} {gpu_s * 1e3:.1f} ms ({cpu_s / gpu_s:.1f}x; best of "
            f"{args.repeats} after a warm-up, each side)"
        )
        ok &= compare(name, results[0], results[1])
    label = "CPU self-test" if args.self_test else "CUDA"
    print(f"all {label} results equal the CPU results" if ok else f"MISMATCH between {label} and CPU results")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
