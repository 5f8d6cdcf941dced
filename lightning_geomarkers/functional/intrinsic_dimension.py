"""Local intrinsic dimension of a feature cloud from nearest-neighbour distances (MLE and TwoNN)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_geomarkers.functional.preprocessing import _scaled64
from lightning_geomarkers.utilities.checks import check_features, check_positive_int

__all__ = ["local_intrinsic_dimension"]

_METHODS = ("mle", "twonn")
# Extra neighbour candidates whose distances are recomputed exactly (guards against Gram round-off at ties).
_EXTRA_CANDIDATES = 8
# Elements per temporary block (distance rows, neighbour differences): 2**22 float64 = 32 MiB.
_BLOCK_ELEMENTS = 2**22


def local_intrinsic_dimension(features: Any, k: int = 20, method: str = "mle") -> torch.Tensor:
    r"""Intrinsic dimension of the point cloud estimated from nearest-neighbour distances.

    ``method="mle"`` (Levina & Bickel, 2004): for each point :math:`z` with Euclidean distances
    :math:`T_1(z) \le \dots \le T_K(z)` to its ``K = k`` nearest neighbours (itself excluded),

    .. math:: \hat m_K(z) = \left[ \frac{1}{K-1} \sum_{j=1}^{K-1} \log \frac{T_K(z)}{T_j(z)} \right]^{-1},
              \qquad \hat m_K = \frac{1}{S} \sum_{z} \hat m_K(z)

    (the average of the per-point estimates, as in Levina & Bickel; not MacKay & Ghahramani's inverse of
    the averaged inverses). A small ``k`` (20-50) makes it *local*. On a locally uniform manifold each
    per-point estimate has mean :math:`d (K-1)/(K-2)`, so small ``K`` biases the result upwards (about 6%
    at ``K = 20``); compare values only at a fixed ``k``.

    ``method="twonn"`` (Facco, d'Errico, Rodriguez & Laio, 2017), maximum-likelihood variant: with
    :math:`\mu_i = r_2(i) / r_1(i)` the ratio of the second to the first neighbour distance, which is
    Pareto distributed with exponent ``d`` on a locally uniform ``d``-dimensional manifold,

    .. math:: \hat d = \frac{S}{\sum_{i=1}^{S} \log \mu_i}

    using every point (no discarded tail, no linear fit of the empirical CDF). ``k`` is not used (it is
    still validated).

    Duplicate rows have zero distances, which make the logarithms undefined: rows are de-duplicated first
    (``torch.unique(dim=0)``) and ``S`` above is the number of *distinct* points. Neighbours are selected
    from a Gram-matrix distance in blocks (memory ``O(S)`` per row block) and their distances recomputed
    exactly from coordinate differences. The estimate is scale invariant; it is computed in float64.

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.
        k: number of neighbours ``K >= 2`` for the MLE; needs at least ``k + 1`` distinct points.
        method: ``"mle"`` (Levina-Bickel) or ``"twonn"`` (needs at least 3 distinct points).

    Returns:
        0-dim float64 tensor on the features' device.

    Raises:
        ValueError: bad shape, NaN/Inf, ``k < 2``, too few distinct points for ``k``, an unknown
            ``method``, points closer than float64 can resolve, or an infinite estimate (every point's
            neighbours equidistant, as on a regular lattice).
        TypeError: wrong argument types.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> plane = torch.rand(2000, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g,
        ...     dtype=torch.float64)
        >>> 1.8 < float(local_intrinsic_dimension(plane, k=20)) < 2.3
        True
        >>> 1.8 < float(local_intrinsic_dimension(plane, method="twonn")) < 2.3
        True
    """
    x = check_features(features)
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
    method = method.lower()
    k = check_positive_int(k, "k", minimum=2)
    n_neighbours = k if method == "mle" else 2

    xs, _ = _scaled64(x)
    points = torch.unique(xs, dim=0)
    n_distinct = points.shape[0]
    if n_distinct < n_neighbours + 1:
        n_dup = x.shape[0] - n_distinct
        what = f"the MLE with k={k}" if method == "mle" else "TwoNN"
        if method == "mle" and n_distinct >= 3:
            hint = f"Use a smaller k (at most {n_distinct - 1}) or pass more distinct samples."
        else:
            hint = "Pass more distinct samples."
        raise ValueError(
            f"`features` has only {n_distinct} distinct point(s) ({n_dup} duplicate row(s) removed); "
            f"{what} needs at least {n_neighbours + 1}. {hint}"
        )
    dist = _neighbour_distances(points, n_neighbours)
    if bool((dist[:, 0] == 0).any()):
        raise ValueError(
            "Some distinct points are closer than float64 can resolve relative to the data's scale, so "
            "their distance is 0 and the estimate undefined. Merge near-duplicate rows (e.g. round them) "
            "first."
        )
    if method == "mle":
        mean_log = torch.log(dist[:, -1:] / dist[:, :-1]).sum(dim=1) / (k - 1)
        n_flat = int((mean_log == 0).sum())
        if n_flat:
            raise ValueError(
                f"The MLE is infinite at {n_flat} point(s) whose {k} nearest neighbours are all "
                "equidistant (typical of lattice or heavily quantised features). Increase `k`, add tiny "
                "jitter, or use method='twonn'."
            )
        estimate = (1.0 / mean_log).mean()
    else:
        total_log = torch.log(dist[:, 1] / dist[:, 0]).sum()
        if float(total_log) == 0.0:
            raise ValueError(
                "TwoNN is infinite: every point's first and second neighbours are equidistant (typical of "
                "lattice or heavily quantised features). Use method='mle' with a larger `k`."
            )
        estimate = n_distinct / total_log
    if not bool(torch.isfinite(estimate)):
        raise ValueError(
            "The intrinsic-dimension estimate overflowed float64 (neighbour distances nearly equal). "
            "Increase `k` or use the other `method`."
        )
    return estimate


def _neighbour_distances(points: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted exact Euclidean distances ``(S, k)`` from each row to its ``k`` nearest other rows.

    Candidates (``k`` plus a few spares) are chosen from squared distances via the Gram matrix of the
    centred points, one block of rows at a time; their distances are then recomputed from differences,
    so Gram round-off can only affect which of nearly tied neighbours are chosen, never the distances.
    """
    n_points = points.shape[0]
    n_candidates = min(n_points - 1, k + _EXTRA_CANDIDATES)
    centred = points - points.mean(dim=0, keepdim=True)
    sq_norms = (centred**2).sum(dim=1)
    rows_per_block = max(1, _BLOCK_ELEMENTS // n_points)
    candidates = []
    for start in range(0, n_points, rows_per_block):
        stop = min(start + rows_per_block, n_points)
        # ||x_j||^2 - 2 <x_i, x_j>: the squared distance up to the row constant ||x_i||^2 (same order).
        block = torch.addmm(sq_norms[None, :], centred[start:stop], centred.T, alpha=-2.0)
        rows = torch.arange(stop - start, device=points.device)
        block[rows, rows + start] = float("inf")  # exclude the point itself
        candidates.append(torch.topk(block, n_candidates, dim=1, largest=False).indices)
    neighbours = torch.cat(candidates)

    rows_per_block = max(1, _BLOCK_ELEMENTS // (n_candidates * points.shape[1]))
    dists = []
    for start in range(0, n_points, rows_per_block):
        stop = min(start + rows_per_block, n_points)
        diff = points[neighbours[start:stop]] - points[start:stop, None, :]
        dists.append(torch.linalg.vector_norm(diff, dim=2))
    return torch.cat(dists).sort(dim=1).values[:, :k]
