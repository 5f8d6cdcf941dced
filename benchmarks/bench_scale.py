"""GLUE scaling curves and the shared-CPU contention test.

Every case runs in a fresh subprocess, so its peak memory (``ru_maxrss`` of the child, minus the
resident size after imports and data set-up) is its own; time is the best of ``--repeats`` runs after a
warm-up. The per-probe scipy reference runs side by side (same inputs, timed the same way: a two-probe
warm-up, then the best of ``--repeats`` runs) where it takes a few seconds at most. Curves: joint GLUE in P, M, N and n_t around P=10, M=50, N=512, n_t=200; the pairs
protocol (``glue_pairs``, all pairs) in the number of classes. Then the contention test: the same cases
idle, and again while two busy-looping processes share the cores, as a ratio, at 1 and 2 threads, and
for the pairs also with two cores used through ``glue_pairs``' ``workers=2`` (one intra-op thread each),
and at 2 threads once more with ``OMP_WAIT_POLICY=PASSIVE`` in the child's environment (intra-op threads
that sleep instead of spinning while they wait: see docs/performance.md, "OpenMP wait policy"); those rows
also give the loaded time over the idle time with the default policy.

Usage: python benchmarks/bench_scale.py [--full] [--repeats 2] [--threads 1,2] [--skip-contention |
--contention-only]
(the default run took about 8 minutes on the shared 2-core machine at load 7-10, P=40 included, which
has since moved to ``--full`` with P=100 joint and 100 classes = 4,950 pairs; ``--skip-contention``
halves it.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

from machine import machine_line, openmp

CASE_ENV = "GLUE_BENCH_CASE"
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:  # current resident size (Linux)
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(spec: dict) -> dict:
    """Child process: build the data, time ours (and maybe the reference), report peak memory."""
    import numpy as np
    import torch

    from lightning_geomarkers.functional import glue, glue_pairs
    from lightning_geomarkers.testing import reference_glue

    torch.set_num_threads(spec["threads"])
    rng = np.random.default_rng(0)
    kind, n_t, n_feat, m = spec["kind"], spec["n_t"], spec["N"], spec["M"]
    if kind == "joint":
        p = spec["P"]
        centers = rng.standard_normal((p, 1, n_feat)) / np.sqrt(n_feat) * 3
        mans = centers + rng.standard_normal((p, m, n_feat)) / np.sqrt(n_feat)
        t = rng.standard_normal((n_t, n_feat))
        y = rng.choice([-1.0, 1.0], size=(n_t, p))
        x_t, t_t, y_t = (torch.from_numpy(a) for a in (mans, t, y))

        def ours():
            return glue(x_t, probes=t_t, dichotomies=y_t, num_threads=spec["threads"], warn=False)

        def ref(n_probes=None):
            return reference_glue(list(mans), t[:n_probes], y[:n_probes])
    else:
        c = spec["classes"]
        centers = rng.standard_normal((c, n_feat)) / np.sqrt(n_feat) * 3
        labels = np.repeat(np.arange(c), m)
        feats = centers[labels] + rng.standard_normal((c * m, n_feat)) / np.sqrt(n_feat)
        f_t, l_t = torch.from_numpy(feats), torch.from_numpy(labels)

        def ours():
            return glue_pairs(
                f_t,
                l_t,
                points_per_class=m,
                n_pairs=None,
                n_t=n_t,
                generator=0,
                num_threads=spec["threads"],
                workers=spec.get("workers", 1),
            )

        ref = None
    base_rss = _rss_mb()
    ours()
    best = float("inf")
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        ours()
        best = min(best, time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    out = {"ours_s": best, "peak_mb": peak - base_rss, "ref_s": None, "openmp": openmp()}
    if ref is not None and spec.get("with_ref"):  # timed as ours: a (two-probe) warm-up, then best of repeats
        with warnings.catch_warnings():  # two probes can leave an alignment without pairs (an empty mean)
            warnings.simplefilter("ignore", RuntimeWarning)
            ref(2)
        out["ref_s"] = float("inf")
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            ref()
            out["ref_s"] = min(out["ref_s"], time.perf_counter() - t0)
    return out


def in_subprocess(spec: dict) -> dict:
    """Run one case in a fresh child; ``spec["env"]`` (optional) is added to its environment (settings
    read when the child loads its libraries, such as OpenMP's wait policy)."""
    env = dict(os.environ, **spec.get("env", {}), **{CASE_ENV: json.dumps(spec)})
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(spec: dict) -> str:
    env = "".join(f" {k}={v}" for k, v in spec.get("env", {}).items())
    if spec["kind"] == "joint":
        return f"joint P={spec['P']} M={spec['M']} N={spec['N']} n_t={spec['n_t']}{env}"
    pairs = spec["classes"] * (spec["classes"] - 1) // 2
    workers = f" workers={spec['workers']}" if spec.get("workers", 1) > 1 else ""
    return f"pairs {spec['classes']} classes ({pairs} pairs) M={spec['M']} N={spec['N']} n_t={spec['n_t']}{workers}{env}"


def show(spec: dict, res: dict) -> None:
    load = os.getloadavg()[0]
    if "error" in res:
        print(f"{describe(spec):<52} {spec['threads']:>3} {load:>5.1f}  error: {res['error']}", flush=True)
        return
    ref = (
        f"{res['ref_s']:>8.2f} {res['ref_s'] / res['ours_s']:>7.1f}x"
        if res["ref_s"]
        else f"{'-':>8} {'-':>8}"
    )
    print(
        f"{describe(spec):<52} {spec['threads']:>3} {load:>5.1f} {res['ours_s']:>8.3f} {res['peak_mb']:>8.0f} {ref}",
        flush=True,
    )


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--skip-contention", action="store_true")
    parser.add_argument("--contention-only", action="store_true", help="skip the scaling curves")
    args = parser.parse_args()
    threads = [int(v) for v in args.threads.split(",")]

    print(machine_line())
    base = {"kind": "joint", "P": 10, "M": 50, "N": 512, "n_t": 200, "repeats": args.repeats, "threads": 1}
    curves = []
    for p in (5, 10, 20) + ((40, 100) if args.full else ()):
        curves.append(dict(base, P=p, with_ref=p <= 10))
    for m in (25, 100):
        curves.append(dict(base, M=m, with_ref=m <= 50))
    for n in (128, 2048):
        curves.append(dict(base, N=n, with_ref=True))
    for n_t in (50, 400):
        curves.append(dict(base, n_t=n_t, with_ref=n_t <= 200))
    pairs = {"kind": "pairs", "M": 50, "N": 512, "n_t": 100, "repeats": args.repeats, "threads": 1}
    for c in (10, 30) + ((100,) if args.full else ()):
        curves.append(dict(pairs, classes=c))
    if not args.contention_only:
        print(f"{'case':<52} {'thr':>3} {'load':>5} {'ours s':>8} {'peak MB':>8} {'scipy s':>8} {'ratio':>8}")
        for spec in curves:
            show(spec, in_subprocess(spec))

    if args.skip_contention:
        return
    print("\ncontention: the same case idle, then with two busy-looping processes on the cores")
    print(
        f"{'case':<72} {'thr':>3} {'idle s':>8} {'loaded s':>9} {'loaded/idle':>12} {'load':>5}  "
        "(rows with an environment setting: also loaded / idle with the default setting)"
    )
    cases = [dict(base, repeats=3), dict(pairs, classes=10, repeats=3)]
    variants = [dict(case, threads=n_thr) for case in cases for n_thr in threads]
    variants.append(dict(pairs, classes=10, repeats=3, threads=1, workers=2))  # two cores, no intra-op waits
    # Intra-op threads that sleep while they wait (read by OpenMP when the child loads torch).
    variants += [dict(case, threads=n_thr, env=PASSIVE) for case in cases for n_thr in threads if n_thr > 1]
    idle_default: dict[tuple, float] = {}
    for spec in variants:
        n_thr = spec["threads"]
        idle = in_subprocess(spec)
        hogs = busy_processes(2)
        try:
            time.sleep(1.0)
            loaded = in_subprocess(spec)
            load = os.getloadavg()[0]
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        if "error" in idle or "error" in loaded:
            print(f"{describe(spec):<72} {n_thr:>3} error: {idle.get('error') or loaded.get('error')}")
            continue
        key = (spec["kind"], n_thr, spec.get("workers", 1))
        ratio = loaded["ours_s"] / idle["ours_s"]
        extra = ""
        if "env" not in spec:
            idle_default[key] = idle["ours_s"]
        elif key in idle_default:  # judged on the worse of the two ratios
            ratio_default = loaded["ours_s"] / idle_default[key]
            extra = f", {ratio_default:.2f}x the default's idle time"
            ratio = max(ratio, ratio_default)
        verdict = "met" if ratio <= 2 else "NOT met"
        print(
            f"{describe(spec):<72} {n_thr:>3} {idle['ours_s']:>8.3f} {loaded['ours_s']:>9.3f} "
            f"{loaded['ours_s'] / idle['ours_s']:>11.2f}x {load:>5.1f}  (target <= 2x: {verdict}{extra})",
            flush=True,
        )


if __name__ == "__main__":
    if CASE_ENV in os.environ:
        print(json.dumps(run_case(json.loads(os.environ[CASE_ENV]))))
    else:
        main()
