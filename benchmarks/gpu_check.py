"""One-shot GPU check: CUDA results equal the CPU results, and how long each takes.

On a machine with CUDA it runs, on the CPU and on the GPU with the same inputs and seeds:

  (a) joint GLUE, P = 10, M = 50, N = 512, n_t = 200 (``bench_glue.py``'s case (a))
  (b) the pairs engine on 45 class pairs, M = 50, N = 512, n_t = 200 (case (b))
  (c) the 1000-class monitor case: ``geometry_markers`` on 1000 classes x 50 points x 2048 features
      with the monitor's defaults (pairs protocol, n_pairs=100, n_t=100, points_per_class=50,
      max_classes=100, projection_dim=1000, generator=0)

and checks every marker agrees to 1e-6 relative (probes and dichotomies are drawn on the CPU in both
runs, so the inputs are identical). It prints the times (GPU after one warm-up run) and exits 1 if a
check fails. Without CUDA it prints "no CUDA device: nothing measured" and exits 0.

``--self-test`` runs the same script with the CPU in the place of the GPU (no GPU needed): every case
twice on the CPU, compared the same way. The test suite runs it, so the script is known to work before
a GPU's limited time is spent on it.

Usage: python benchmarks/gpu_check.py [--markers all|glue] [--skip-monitor] [--self-test]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from bench_glue import class_features, pairs_engine, pairs_inputs  # noqa: E402  (this folder is on sys.path when run as a script)

from lightning_geomarkers.functional import GLUE_MARKERS, geometry_markers, glue

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
    worst, worst_key = 0.0, ""
    for key, ref in cpu.items():
        got = gpu.get(key, math.nan)
        if math.isnan(ref) and math.isnan(got):
            continue
        err = abs(got - ref) / max(abs(ref), 1e-12)
        if not err <= worst:  # also catches NaN
            worst, worst_key = err, key
    ok = worst <= RTOL
    print(
        f"  {name}: largest relative difference {worst:.2e} ({worst_key or '-'}): {'OK' if ok else 'FAILED'}"
    )
    return ok


def case_joint(device: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    mans = class_features(rng, 10, 50, 512)
    t = torch.from_numpy(rng.standard_normal((200, 512)))
    y = torch.from_numpy(rng.choice([-1.0, 1.0], size=(200, 10)))
    x = torch.from_numpy(mans).to(device)
    res = glue(x, probes=t.to(device), dichotomies=y.to(device))
    return {k: float(getattr(res, k)) for k in GLUE_MARKERS}


def case_pairs(device: str) -> dict[str, float]:
    rng = np.random.default_rng(1)
    pairs, _, _, points, mask, probes, dich = pairs_inputs(class_features(rng, 10, 50, 512), rng, 200, device)
    out = pairs_engine(points, mask, probes, dich)
    return {f"{k}[{i}]": float(out[k][i]) for k in GLUE_MARKERS for i in range(len(pairs))}


def case_monitor(device: str, markers: str) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(1000).repeat_interleave(50)
    feats = torch.randn(1000, 2048, generator=gen)[labels] + torch.randn(50_000, 2048, generator=gen)
    feats = feats.relu()
    report = geometry_markers(
        feats.to(device),
        labels.to(device),
        markers=markers,
        glue_protocol="pairs",
        n_pairs=100,
        n_t=100,
        points_per_class=50,
        max_classes=100,
        projection_dim=1000,
        generator=0,
    )
    return {k: float(v) for k, v in report.values.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markers", default="all", help="markers of the monitor case: all or glue")
    parser.add_argument("--skip-monitor", action="store_true", help="only the two GLUE bench cases")
    parser.add_argument(
        "--self-test", action="store_true", help="the CPU in the place of the GPU: checks the script itself"
    )
    args = parser.parse_args()
    other = "cpu" if args.self_test else "cuda"
    if other == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    device_name = "CPU (self-test)" if args.self_test else torch.cuda.get_device_name(0)
    print(f"device: {device_name}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    cases = [
        ("(a) joint P=10 M=50 N=512 n_t=200", case_joint),
        ("(b) 45 pairs M=50 N=512 n_t=200", case_pairs),
    ]
    if not args.skip_monitor:
        cases.append(
            (
                f"(c) 1000 classes x 50 x 2048, monitor defaults, markers={args.markers}",
                lambda d: case_monitor(d, args.markers),
            )
        )
    ok = True
    for name, fn in cases:
        cpu_s, cpu = timed(lambda fn=fn: fn("cpu"), "cpu")
        fn(other)  # warm-up: CUDA context, kernels, allocator
        gpu_s, gpu = timed(lambda fn=fn: fn(other), other)
        label = "CPU again" if args.self_test else "CUDA"
        print(f"{name}: CPU {cpu_s * 1e3:.1f} ms, {label} {gpu_s * 1e3:.1f} ms ({cpu_s / gpu_s:.1f}x)")
        ok &= compare(name, cpu, gpu)
    label = "CPU self-test" if args.self_test else "CUDA"
    print(f"all {label} results equal the CPU results" if ok else f"MISMATCH between {label} and CPU results")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
