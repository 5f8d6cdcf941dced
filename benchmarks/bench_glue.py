"""GLUE solver benchmark: the batched torch solver against a per-probe scipy NNLS implementation.

Both run in this one process on the same manifolds, probes and dichotomies; the script prints the
time of each, their ratio and the largest relative difference of the markers.

  (a) joint analysis: P = 10, M = 50, N = 512, n_t = 200
  (b) pairs protocol of a 10-class model: 45 class pairs, M = 50, N = 512, n_t = 200 each

Usage: python benchmarks/bench_glue.py [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import numpy as np
import torch

from lightning_geomarkers.functional import GLUE_MARKERS, glue, glue_pairs
from lightning_geomarkers.functional.glue import _glue_markers, _normalise
from lightning_geomarkers.testing import reference_glue

MAIN = ("capacity", "dimension", "radius", "utility")


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


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def rel_diff(ours: dict, ref: dict, names=MAIN) -> float:
    return max(abs(float(ours[k]) - ref[k]) / max(abs(ref[k]), 1e-12) for k in names)


def bench_joint(rng, repeats: int, device: str) -> dict:
    mans = class_features(rng, 10, 50, 512)
    t = rng.standard_normal((200, 512))
    y = rng.choice([-1.0, 1.0], size=(200, 10))
    x_dev = torch.from_numpy(mans).to(device)
    t_dev, y_dev = torch.from_numpy(t).to(device), torch.from_numpy(y).to(device)
    glue(x_dev, probes=t_dev, dichotomies=y_dev)  # warm-up
    ours_s, res = best_time(lambda: glue(x_dev, probes=t_dev, dichotomies=y_dev), repeats)
    ref_s, ref = best_time(lambda: reference_glue(list(mans), t, y), 1)
    ours = {k: float(getattr(res, k)) for k in GLUE_MARKERS}
    return {
        "case": "(a) joint P=10 M=50 N=512 n_t=200",
        "ours_s": ours_s,
        "scipy_s": ref_s,
        "diff": rel_diff(ours, ref),
        "diff_all": rel_diff(ours, ref, GLUE_MARKERS),
        "kkt": res.kkt_violation,
    }


def bench_pairs(rng, repeats: int, device: str) -> dict:
    n_classes, m, n_feat, n_t = 10, 50, 512, 200
    mans = class_features(rng, n_classes, m, n_feat)
    pairs = list(itertools.combinations(range(n_classes), 2))
    probes = rng.standard_normal((len(pairs), n_t, n_feat))
    dich = rng.choice([-1.0, 1.0], size=(len(pairs), n_t, 2))
    points = torch.from_numpy(np.stack([mans[list(p)] for p in pairs])).to(device)
    mask = torch.ones(points.shape[:3], dtype=torch.bool, device=device)
    p_dev, d_dev = torch.from_numpy(probes).to(device), torch.from_numpy(dich).to(device)

    def ours_fn():
        pts, _ = _normalise(points, mask)
        return _glue_markers(pts, mask, p_dev, d_dev, eigen_cutoff=1e-9, max_iter=None)

    ours_fn()
    ours_s, out = best_time(ours_fn, repeats)

    def ref_fn():
        return [reference_glue(list(mans[list(p)]), probes[i], dich[i]) for i, p in enumerate(pairs)]

    ref_s, refs = best_time(ref_fn, 1)
    diff = max(rel_diff({k: out[k][i] for k in MAIN}, refs[i]) for i in range(len(pairs)))
    diff_all = max(
        rel_diff({k: out[k][i] for k in GLUE_MARKERS}, refs[i], GLUE_MARKERS) for i in range(len(pairs))
    )
    # The user-facing path (draws its own subsamples/probes, so only its time is comparable).
    feats = torch.from_numpy(mans.reshape(-1, n_feat)).to(device)
    labels = torch.arange(n_classes, device=device).repeat_interleave(m)
    glue_pairs(feats, labels, points_per_class=m, n_pairs=None, n_t=n_t, generator=0)
    e2e_s, _ = best_time(
        lambda: glue_pairs(feats, labels, points_per_class=m, n_pairs=None, n_t=n_t, generator=0), repeats
    )
    return {
        "case": "(b) pairs 45 x (P=2 M=50 N=512 n_t=200)",
        "ours_s": ours_s,
        "scipy_s": ref_s,
        "diff": diff,
        "diff_all": diff_all,
        "kkt": float(out["kkt_violation"].max()),
        "e2e_s": e2e_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    rows = [bench_joint(rng, args.repeats, args.device), bench_pairs(rng, args.repeats, args.device)]
    print(
        f"{'case':<42} {'torch (s)':>10} {'scipy (s)':>10} {'speed-up':>9} {'max rel diff':>13} "
        f"{'(all 7)':>9} {'KKT':>9}"
    )
    for r in rows:
        print(
            f"{r['case']:<42} {r['ours_s']:>10.4f} {r['scipy_s']:>10.3f} {r['scipy_s'] / r['ours_s']:>8.1f}x "
            f"{r['diff']:>13.1e} {r['diff_all']:>9.1e} {r['kkt']:>9.1e}"
        )
    print(f"glue_pairs end to end (own subsample and probes, 45 pairs): {rows[1]['e2e_s']:.4f} s")


if __name__ == "__main__":
    main()
