"""Simulated manifold capacity: the slow, direct ground truth for GLUE's capacity (``docs/markers.md`` section 4.8).

alpha_sim = P / N_crit, where N_crit is the smallest random-projection dimension n at which a random
dichotomy of the projected manifolds is linearly separable by a homogeneous hyperplane with probability
>= 0.5. Separability of one projected dichotomy is a linear-programming feasibility problem
(find w with y_mu <w, x> >= 1 for every point), solved with ``scipy.optimize.linprog`` (HiGHS).

Trials use common random numbers: trial i draws one Gaussian (N, N) matrix and one dichotomy, and
dimension n uses the first n columns. Adding a column can only keep a separable problem separable, so
each trial has a critical dimension n_i found exactly by bisection, and P(separable at n) is the
empirical CDF of the n_i: N_crit is its lower median.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog

from lightning_geomarkers.utilities.checks import as_manifolds, check_positive_int
from lightning_geomarkers.utilities.seeds import as_generator, split_seeds

__all__ = ["SimulatedCapacity", "simulated_capacity"]

#: Smallest margin (unit-norm rows, |w_i| <= 1) counted as separable rather than round-off.
_MARGIN_TOL = 1e-9


@dataclass
class SimulatedCapacity:
    """Result of :func:`simulated_capacity`.

    Attributes:
        capacity: P / n_crit.
        n_crit: smallest dimension with separation probability >= 0.5.
        n_crit_interpolated: where the empirical probability crosses 0.5, linearly interpolated.
        critical_dims: (n_trials,) each trial's critical dimension (N + 1 where never separable).
        probability: separation probability at n = 1..N, shape (N,).
    """

    capacity: float
    n_crit: int
    n_crit_interpolated: float
    critical_dims: np.ndarray
    probability: np.ndarray


def _separable(signed_points: np.ndarray) -> bool:
    """Is there a w with <w, g> > 0 for every row g? (strict homogeneous linear separability)

    Posed as the always-feasible, bounded LP  max m  s.t.  <w, g_i> >= m,  -1 <= w <= 1,  m <= 1  on
    unit-norm rows, so the solver never faces an infeasible or borderline problem: separable iff m* > 0.
    """
    n_rows, dim = signed_points.shape
    # Unit-norm rows without overflow or underflow: each row is first divided by its largest |entry|
    # (np.linalg.norm of rows at 1e160 overflowed to inf, and at 1e-170 the squares underflowed).
    peak = np.abs(signed_points).max(axis=1, keepdims=True)
    rows = signed_points / np.where(peak > 0, peak, 1.0)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(min=1e-300)
    res = linprog(
        c=np.r_[np.zeros(dim), -1.0],
        A_ub=np.c_[-rows, np.ones(n_rows)],
        b_ub=np.zeros(n_rows),
        bounds=[(-1.0, 1.0)] * dim + [(None, 1.0)],
        method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"linprog failed while testing separability: {res.message}")
    return bool(-res.fun > _MARGIN_TOL)


def simulated_capacity(
    manifolds: torch.Tensor | Sequence[torch.Tensor],
    *,
    n_trials: int = 100,
    generator: torch.Generator | int | None = None,
) -> SimulatedCapacity:
    """Capacity of P manifolds by random projections and LP separability tests (slow ground truth).

    Args:
        manifolds: (P, M, N) tensor or a sequence of P (M_mu, N) tensors, as for :func:`glue`.
        n_trials: Monte-Carlo trials (each: one projection and one random dichotomy); cost is about
            n_trials * log2(N) small LPs.
        generator: CPU generator or int seed.

    Returns:
        :class:`SimulatedCapacity`.

    Raises:
        ValueError: if the manifolds are not separable with probability >= 0.5 even at n = N.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.functional import simulated_capacity
        >>> pts = torch.randn(20, 1, 60, generator=torch.Generator().manual_seed(0))
        >>> res = simulated_capacity(pts, n_trials=40, generator=0)  # isolated points: Cover's alpha = 2
        >>> 1.5 < res.capacity < 2.6
        True
    """
    n_trials = check_positive_int(n_trials, "n_trials")
    points, mask = as_manifolds(manifolds)
    n_man, _, n_feat = points.shape
    parts = [points[i][mask[i]].double().cpu().numpy() for i in range(n_man)]
    sizes = [p.shape[0] for p in parts]
    stacked = np.concatenate(parts, axis=0)
    gen = as_generator(generator)
    (seed,) = split_seeds(gen, 1)
    rng = np.random.default_rng(seed)

    crit = np.empty(n_trials, dtype=np.int64)
    for i in range(n_trials):
        proj = stacked @ rng.standard_normal((n_feat, n_feat))
        signs = np.repeat(rng.choice([-1.0, 1.0], size=n_man), sizes)
        signed = signs[:, None] * proj
        if not _separable(signed):
            crit[i] = n_feat + 1
            continue
        lo, hi = 0, n_feat  # invariant: not separable at lo (n = 0 never is), separable at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _separable(signed[:, :mid]):
                hi = mid
            else:
                lo = mid
        crit[i] = hi
    dims = np.arange(1, n_feat + 1)
    prob = (crit[None, :] <= dims[:, None]).mean(axis=1)
    reach = np.flatnonzero(prob >= 0.5)
    if reach.size == 0:
        raise ValueError(
            f"The manifolds are separable with probability {prob[-1]:.2f} < 0.5 even at the full dimension "
            f"N = {n_feat}: capacity is below P / N. Use fewer points per manifold or fewer manifolds."
        )
    n_crit = int(dims[reach[0]])
    p_hi = prob[reach[0]]
    p_lo = prob[reach[0] - 1] if reach[0] > 0 else 0.0
    n_interp = (n_crit - 1) + (0.5 - p_lo) / (p_hi - p_lo) if p_hi > p_lo else float(n_crit)
    return SimulatedCapacity(
        capacity=n_man / n_crit,
        n_crit=n_crit,
        n_crit_interpolated=float(n_interp),
        critical_dims=crit,
        probability=prob,
    )
