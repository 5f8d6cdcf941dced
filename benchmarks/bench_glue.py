"""GLUE solver benchmark: the batched torch solver against the per-probe scipy NNLS reference.

Both run in this one process on the same manifolds, probes and dichotomies, timed the same way: one
warm-up, then the best of ``--repeats`` runs (the reference's warm-up is a two-probe call). Every row
prints the time of each, their ratio, the target it is held to (met / NOT met), and the largest
relative difference of the seven markers between the reference and that row's own result (NaN only
where both are NaN) with its KKT violation. Torch's thread count (1 and 2) is set per measurement; the
reference's scipy NNLS runs as scipy does (its BLAS threads are not limited). The load average is
printed with every row, because on a shared CPU the absolute times move and only side-by-side ratios
mean something. Case (b)'s time includes stacking the 45 pairs into one batch (the reference slices
them inside its time too).

  (a) joint analysis: P = 10, M = 50, N = 512, n_t = 200                           target 50x
  (b) pairs protocol of a 10-class model: 45 class pairs, M = 50, N = 512, n_t = 200  target 50x
  grid: Gaussian class clouds of intrinsic dimension D in {2, 5, 10, 20} and radius R in {0.5, 1, 2}
        around unit-norm centers, joint (P = 10) and 45 pairs, M = 50, N = 512         target 10x
  net:  penultimate features of a trained and of an untrained MLP on sklearn's digits    target 10x

Usage: python benchmarks/bench_glue.py [--repeats 3] [--grid-probes 60] [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
import warnings

import numpy as np
import torch
from machine import machine_line

from lightning_geomarkers.functional import GLUE_MARKERS, glue
from lightning_geomarkers.functional.glue import _glue_groups
from lightning_geomarkers.testing import geometry_clouds, reference_glue
from lightning_geomarkers.utilities.threads import limit_threads


def class_features(rng: np.random.Generator, n_classes: int, per_class: int, n_feat: int) -> np.ndarray:
    """Gaussian class clouds with anisotropic within-class spread (closer to real features than
    isotropic blobs): (n_classes, per_class, n_feat)."""
    centers = rng.standard_normal((n_classes, 1, n_feat))
    scales = np.exp(-np.arange(n_feat) / 40.0)
    out = np.empty((n_classes, per_class, n_feat))
    for c in range(n_classes):
        basis = np.linalg.qr(rng.standard_normal((n_feat, n_feat)))[0]
        out[c] = centers[c] + 0.6 * (rng.standard_normal((per_class, n_feat)) * scales) @ basis.T
    return out


def digits_features(trained: bool, seed: int = 0, per_class: int = 50, width: int = 512) -> np.ndarray:
    """(10, per_class, width) centred penultimate ReLU features of an MLP 64 -> width -> 10 on sklearn's
    digits, trained for 30 full-batch Adam epochs or left at its random initialisation."""
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor(x_np / 16.0, dtype=torch.float32)
    y = torch.tensor(y_np)
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU())
    head = torch.nn.Linear(width, 10)
    if trained:
        opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(body(x)), y).backward()
            opt.step()
    with torch.no_grad():
        feats = body(x).double()
    feats = feats - feats.mean(0)
    out = np.empty((10, per_class, width))
    for c in range(10):
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:per_class]]
        out[c] = feats[idx].numpy()
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def rel_diff(ours: dict, ref: dict, names=GLUE_MARKERS) -> float:
    """Largest relative difference over ``names`` (all seven markers); 0 where both are NaN (an
    alignment with no valid pair), infinite where only one is."""
    worst = 0.0
    for k in names:
        a, b = float(ours[k]), float(ref[k])
        if math.isnan(a) or math.isnan(b):
            worst = worst if (math.isnan(a) and math.isnan(b)) else math.inf
        elif a != b:
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return worst


def reference_time(ref_fn, warm_fn, repeats: int):
    """The reference timed as ours: a warm-up (``warm_fn``, a two-probe call), then the best of
    ``repeats`` runs."""
    with warnings.catch_warnings():  # two probes can leave an alignment without pairs (numpy's empty mean)
        warnings.simplefilter("ignore", RuntimeWarning)
        warm_fn()
    return best_time(ref_fn, repeats)


def joint_case(mans: np.ndarray, rng, n_t: int, repeats: int, device: str, threads: list[int]) -> dict:
    """Time ``glue`` at each thread count and the reference once, on the same probes."""
    n_man, _, n_feat = mans.shape
    t = rng.standard_normal((n_t, n_feat))
    y = rng.choice([-1.0, 1.0], size=(n_t, n_man))
    x_dev = torch.from_numpy(mans).to(device)
    t_dev, y_dev = torch.from_numpy(t).to(device), torch.from_numpy(y).to(device)
    ours_s, results = {}, {}
    for n_thr in threads:

        def run(n_thr=n_thr):
            return glue(x_dev, probes=t_dev, dichotomies=y_dev, num_threads=n_thr, warn=False)

        run()  # warm-up
        ours_s[n_thr], results[n_thr] = best_time(run, repeats)
    ref_s, ref = reference_time(
        lambda: reference_glue(list(mans), t, y), lambda: reference_glue(list(mans), t[:2], y[:2]), repeats
    )
    diff = {n: rel_diff({k: getattr(r, k) for k in GLUE_MARKERS}, ref) for n, r in results.items()}
    kkt = {n: float(r.kkt_violation) for n, r in results.items()}
    return {"ours_s": ours_s, "scipy_s": ref_s, "diff": diff, "kkt": kkt}


def pairs_inputs(mans: np.ndarray, rng, n_t: int, device: str):
    """Case (b)'s inputs: every class pair of ``mans`` stacked as (pairs, 2, M, N) with its mask, and
    per pair ``n_t`` probes and dichotomies drawn from ``rng`` (returned as numpy for the reference and
    on ``device`` for the engine)."""
    n_classes, _, n_feat = mans.shape
    pairs = list(itertools.combinations(range(n_classes), 2))
    probes = rng.standard_normal((len(pairs), n_t, n_feat))
    dich = rng.choice([-1.0, 1.0], size=(len(pairs), n_t, 2))
    points, mask = stack_pairs(mans, pairs, device)
    return (
        pairs,
        probes,
        dich,
        points,
        mask,
        torch.from_numpy(probes).to(device),
        torch.from_numpy(dich).to(device),
    )


def stack_pairs(mans: np.ndarray, pairs: list, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs' points stacked as (pairs, 2, M, N) on ``device``, and their (all-true) mask."""
    points = torch.from_numpy(np.stack([mans[list(p)] for p in pairs])).to(device)
    return points, torch.ones(points.shape[:3], dtype=torch.bool, device=device)


def pairs_engine(points: torch.Tensor, mask: torch.Tensor, probes: torch.Tensor, dich: torch.Tensor) -> dict:
    """The engine behind ``glue_pairs`` on all the pairs at once, with the given probes."""
    return _glue_groups(points, mask, dich, probes=probes, generators=(), eigen_cutoff=1e-9, max_iter=None)


def pairs_case(mans: np.ndarray, rng, n_t: int, repeats: int, device: str, threads: list[int]) -> dict:
    """All class pairs of ``mans`` batched through the engine behind ``glue_pairs``."""
    pairs, probes, dich, _, _, p_dev, d_dev = pairs_inputs(mans, rng, n_t, device)
    ours_s, outs = {}, {}
    for n_thr in threads:

        def run(n_thr=n_thr):
            with limit_threads(n_thr):
                points, mask = stack_pairs(mans, pairs, device)  # the batch layout is part of our work
                return pairs_engine(points, mask, p_dev, d_dev)

        run()
        ours_s[n_thr], outs[n_thr] = best_time(run, repeats)

    def ref_fn(n_probes=n_t):
        return [
            reference_glue(list(mans[list(p)]), probes[i, :n_probes], dich[i, :n_probes])
            for i, p in enumerate(pairs)
        ]

    ref_s, refs = reference_time(ref_fn, lambda: ref_fn(2), repeats)
    diff = {
        n: max(rel_diff({k: out[k][i] for k in GLUE_MARKERS}, refs[i]) for i in range(len(pairs)))
        for n, out in outs.items()
    }
    kkt = {n: float(out["kkt_violation"].max()) for n, out in outs.items()}
    return {"ours_s": ours_s, "scipy_s": ref_s, "diff": diff, "kkt": kkt}


def print_row(name: str, r: dict, target: float, rows: list) -> None:
    for n_thr, ours in r["ours_s"].items():
        ratio = r["scipy_s"] / ours
        verdict = "met" if ratio >= target else "NOT met"
        load = os.getloadavg()[0]
        print(
            f"{name:<36} {n_thr:>3} {load:>5.1f} {ours * 1e3:>9.1f} {r['scipy_s'] * 1e3:>9.0f} "
            f"{ratio:>7.1f}x {target:>4.0f}x {verdict:>8} {r['diff'][n_thr]:>9.1e} {r['kkt'][n_thr]:>8.1e}",
            flush=True,
        )
        rows.append((name, n_thr, ratio, target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid-probes", type=int, default=60, help="probes per grid/network case")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure")
    parser.add_argument("--quick", action="store_true", help="bench cases (a) and (b) only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threads = [int(v) for v in args.threads.split(",")]
    rng = np.random.default_rng(args.seed)
    print(machine_line(args.device))
    print(
        f"{'case':<36} {'thr':>3} {'load':>5} {'ours ms':>9} {'scipy ms':>9} {'ratio':>8} {'tgt':>5} "
        f"{'verdict':>8} {'max rel':>9} {'KKT':>8}"
    )
    rows: list = []
    print_row(
        "(a) joint P=10 M=50 N=512 n_t=200",
        joint_case(class_features(rng, 10, 50, 512), rng, 200, args.repeats, args.device, threads),
        50,
        rows,
    )
    print_row(
        "(b) 45 pairs M=50 N=512 n_t=200",
        pairs_case(class_features(rng, 10, 50, 512), rng, 200, args.repeats, args.device, threads),
        50,
        rows,
    )
    if not args.quick:
        n_t = args.grid_probes

        def joint_and_pairs(name: str, mans) -> None:
            """The joint and the 45-pairs row of one data set, both held to the 10x target."""
            for protocol, case in (("joint", joint_case), ("45 pairs", pairs_case)):
                result = case(mans, rng, n_t, args.repeats, args.device, threads)
                print_row(f"{name} {protocol} n_t={n_t}", result, 10, rows)

        for dim, radius in itertools.product((2, 5, 10, 20), (0.5, 1.0, 2.0)):
            joint_and_pairs(f"grid D={dim} R={radius}", geometry_clouds(rng, 10, 50, 512, dim, radius))
        for trained in (True, False):
            tag = "trained" if trained else "untrained"
            joint_and_pairs(f"digits MLP {tag}", digits_features(trained))
    missed = [r for r in rows if r[2] < r[3]]
    print(
        f"targets met: {len(rows) - len(missed)} of {len(rows)} rows; worst ratio/target: "
        f"{min(r[2] / r[3] for r in rows):.2f}"
    )
    for name, n_thr, ratio, target in missed:
        print(f"  NOT met: {name} at {n_thr} thread(s): {ratio:.1f}x < {target:.0f}x")


if __name__ == "__main__":
    main()
