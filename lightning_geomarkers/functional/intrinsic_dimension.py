"""Local intrinsic dimension of a feature cloud from nearest-neighbour distances (MLE and TwoNN)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from lightning_geomarkers.errors import GeomarkersWarning, outside_stacklevel
from lightning_geomarkers.functional.preprocessing import (
    _block_elements,
    _Blocks,
    _pow2_shift,
    _rows_per_block,
    _times_pow2,
    _times_pow2_,
)
from lightning_geomarkers.utilities.checks import check_features, check_lid
from lightning_geomarkers.utilities.threads import ieee_float32_matmul

__all__ = ["local_intrinsic_dimension"]

# Extra neighbour candidates whose distances are recomputed exactly (guards against Gram round-off at ties).
_EXTRA_CANDIDATES = 8


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
    (exactly: rows are grouped by an integer hash of their float64 bit patterns and every group is checked
    for exact equality) and ``S`` above is the number of *distinct* points. Neighbours are selected from a
    Gram-matrix distance computed in blocks of the centred points, each block product serving both of its
    row blocks (the Gram matrix is symmetric), with a running top-k per point; their distances are then
    recomputed exactly from coordinate differences. The blocks are float64; large problems
    (``S^2 N >= 2^30``, with float32 matmuls in IEEE precision) choose candidates with float32 blocks and
    certify each point's choice against the float32 error bound, redoing in float64 the points where the
    bound cannot rule out a nearer neighbour, so the result is the float64 search's. Cost ``S^2 N / 2``
    multiply-adds; memory ``O(S k)`` plus a few 16 MiB blocks and at most 64 MiB of cached working
    blocks, whatever ``S`` (no ``S x S`` matrix, no full float64 copy of the features). The estimate is
    scale invariant; it is computed in float64.

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
    k, method = check_lid(k, method)
    return _local_intrinsic_dimension(x, k, method)


def _local_intrinsic_dimension(x: torch.Tensor, k: int, method: str) -> torch.Tensor:
    """:func:`local_intrinsic_dimension` on an already validated tensor and arguments."""
    n_neighbours = k if method == "mle" else 2

    distinct = _distinct_rows(x)
    n_distinct = distinct.numel()
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
    rows = distinct if n_distinct < x.shape[0] else None  # no gathers when every row is distinct
    dist = _neighbour_distances(_Blocks(x, centered=True, rows=rows), n_neighbours)
    if bool((dist[:, 0] == 0).any()):
        raise ValueError(
            "Some distinct points are closer than float64 can resolve relative to the data's scale, so "
            "their distance is 0 and the estimate undefined. Merge near-duplicate rows (e.g. round them) "
            "first."
        )
    n_close = _round_off_neighbours(x, rows, dist[:, 0], dist[:, 1])
    if n_close:
        warnings.warn(
            f"{n_close} of {n_distinct} distinct points have a nearest neighbour within the round-off of "
            f"{x.dtype} ({_ROUND_OFF_ULPS} x eps x the point's norm): near-duplicates, e.g. one input twice "
            "with last-bit differences. The estimate takes them for distinct points at tiny distances, which "
            "biases it low (TwoNN most: 4.6 -> 2.1 with 1% such points in a review). Merge them first, e.g. "
            "round the features.",
            GeomarkersWarning,
            stacklevel=outside_stacklevel(),
        )
    if method == "mle":
        mean_log = _log_ratio(dist[:, -1:], dist[:, :-1]).sum(dim=1) / (k - 1)
        n_flat = int((mean_log == 0).sum())
        if n_flat:
            raise ValueError(
                f"The MLE is infinite at {n_flat} point(s) whose {k} nearest neighbours are all "
                "equidistant (typical of lattice or heavily quantised features). Increase `k`, add tiny "
                "jitter, or use method='twonn'."
            )
        estimate = (1.0 / mean_log).mean()
    else:
        total_log = _log_ratio(dist[:, 1], dist[:, 0]).sum()
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


#: A nearest-neighbour distance below this many eps of the input dtype times the point's norm is at the
#: level of the input's own rounding: such neighbours are near-duplicates (warned).
_ROUND_OFF_ULPS = 4
#: ... and its second neighbour at least this many times farther (what biases TwoNN: r2 / r1 huge).
_NEAR_DUPLICATE_GAP = 100


def _round_off_neighbours(
    x: torch.Tensor, rows: torch.Tensor | None, nearest: torch.Tensor, second: torch.Tensor
) -> int:
    """How many points (the distinct ``rows`` of ``x``, all if None) have their nearest neighbour within
    ``_ROUND_OFF_ULPS`` eps of ``x``'s dtype times their own norm (norms in float64, in row blocks) and
    their second one at least ``_NEAR_DUPLICATE_GAP`` times farther: a near-duplicate, not a tight
    cluster (in bfloat16, 4 eps is 3% of the norm, the spacing of ordinary clustered features)."""
    # The gap test first (O(S), almost never passed by ordinary data): the norms, a pass over the features,
    # only for the points it leaves.
    gap = torch.nonzero(second >= _NEAR_DUPLICATE_GAP * nearest).squeeze(1)
    if not gap.numel():
        return 0
    points = gap if rows is None else rows.index_select(0, gap)
    norms = torch.empty(gap.numel(), dtype=torch.float64, device=nearest.device)
    step = _rows_per_block(x.shape[1])
    for start in range(0, gap.numel(), step):
        idx = slice(start, start + step)
        norms[idx] = torch.linalg.vector_norm(x.index_select(0, points[idx]).to(torch.float64), dim=1)
    tol = _ROUND_OFF_ULPS * torch.finfo(x.dtype).eps
    return int((nearest.index_select(0, gap) <= tol * norms).sum())


def _log_ratio(far: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """``log(far / near)``, as ``log(far) - log(near)`` where the ratio overflows (e.g. a denormal
    distance next to a distance of 1), so it stays finite."""
    ratio = far / near
    return torch.where(torch.isfinite(ratio), torch.log(ratio), torch.log(far) - torch.log(near))


def _row_hash_multipliers(n_cols: int) -> torch.Tensor:
    """``(n_cols, 2)`` fixed odd int64 multipliers of the two row hashes (seeded, so runs agree)."""
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(
        -(2**62), 2**62, (n_cols, 2), generator=gen, dtype=torch.int64, device="cpu"
    ).bitwise_or_(1)


def _distinct_rows(x: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the first occurrence of every distinct row of ``x`` (exact, in blocks).

    Rows are keyed by two wrap-around int64 hashes of their float64 bit patterns (``-0.0`` normalised to
    ``0.0``), then every row is compared exactly with the first row of its key group; a hash collision
    between different rows (never seen, but possible) falls back to ``torch.unique`` on those rows.
    Memory: ``O(S)`` plus one block, instead of the sort of a full copy.
    """
    n_rows, n_cols = x.shape
    mult = _row_hash_multipliers(n_cols).to(x.device)
    keys = torch.empty((n_rows, 2), dtype=torch.int64, device=x.device)
    step = _rows_per_block(2 * n_cols)
    for start in range(0, n_rows, step):
        bits = x[start : start + step].to(torch.float64, copy=True).contiguous().add_(0.0).view(torch.int64)
        keys[start : start + step, 0] = (bits * mult[:, 0]).sum(dim=1)
        keys[start : start + step, 1] = (bits * mult[:, 1]).sum(dim=1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    n_groups = int(group.max()) + 1
    order = torch.arange(n_rows, device=x.device)
    first = torch.full((n_groups,), n_rows, dtype=torch.int64, device=x.device)
    first = first.scatter_reduce_(0, group, order, reduce="amin")
    lead = first[group]
    mismatch = torch.zeros(n_rows, dtype=torch.bool, device=x.device)
    for start in range(0, n_rows, step):
        sl = slice(start, start + step)
        mismatch[sl] = (x[sl] != x[lead[sl]]).any(dim=1)
    if bool(mismatch.any()):  # a hash collision: resolve the groups involved exactly
        bad_groups = torch.unique(group[mismatch])
        involved = torch.isin(group, bad_groups)
        rows = order[involved]
        _, sub = torch.unique(x[rows].to(torch.float64), dim=0, return_inverse=True)
        resolved = torch.full((int(sub.max()) + 1,), n_rows, dtype=torch.int64, device=x.device)
        resolved = resolved.scatter_reduce_(0, sub, rows, reduce="amin")
        keep = first[~torch.isin(torch.arange(n_groups, device=x.device), bad_groups)]
        first = torch.cat([keep, resolved])
    return first.sort().values


def _merge_topk(
    best_val: torch.Tensor, best_idx: torch.Tensor, rows: slice, block: torch.Tensor, col_offset: int
) -> None:
    """Fold one block of candidate values ``(rows, cols)`` into the running k smallest of those rows.

    Only values below a row's current k-th smallest can enter its list, so the block's top-k is taken
    with ``k`` cut to the most such values any row has, and a block with none is skipped: once the
    lists are good (after a few blocks) most blocks add little, and ``topk`` with a small ``k`` is
    several times cheaper (LID at ``S = 15000, N = 512``: 12% less time in all).
    """
    k = best_val.shape[1]
    current = best_val[rows]
    if bool(torch.isinf(current[:, -1]).any()):  # a list not full yet (its first block): no cut
        entering = min(k, block.shape[1])
    else:
        entering = int((block < current[:, -1:]).sum(dim=1).max())
        if entering == 0:
            return
    vals, idx = torch.topk(block, min(k, entering), dim=1, largest=False, sorted=False)
    vals = torch.cat([current, vals], dim=1)
    idx = torch.cat([best_idx[rows], idx + col_offset], dim=1)
    vals, pick = torch.topk(vals, k, dim=1, largest=False)
    best_val[rows] = vals
    best_idx[rows] = idx.gather(1, pick)


def _neighbour_distances(blocks: _Blocks, k: int) -> torch.Tensor:
    """Sorted exact Euclidean distances ``(S, k)`` from each row to its ``k`` nearest other rows.

    Candidates (``k`` plus a few spares) are chosen from squared distances via the Gram matrix of the
    centred points, one pair of row blocks at a time (each product serves both blocks); their distances
    are then recomputed from differences of the (uncentred, power-of-two-scaled) points, so Gram round-off
    can only affect which of nearly tied neighbours are chosen, never the distances.

    Large problems (``S^2 N >= 2**30``, float32 matmuls in IEEE precision) choose candidates with a
    float32 Gram (twice the matmul rate) and float32 proxies ``sq_j - 2 g_ij``, then *certify* every row:
    the float32 Gram entry is within ``1.01 (N + 2) u |w_i| |w_j|`` of the exact one (``u = 2**-24``) and
    the float32 proxy adds at most ``2.01 u (sq_j + |w_i| |w_j|)``, so with ``c = 1.01 (N + 3) u`` the
    proxy is within ``e_ij = 2 c |w_i| |w_j| + 2.01 u sq_j`` (plus float64 slack) of the exact one, and no
    non-candidate can be nearer than the k-th exact distance when the largest candidate value minus
    ``2 c |w_i| max_j |w_j| + 2.01 u max_j sq_j`` still exceeds it. Rows that fail (near ties far from
    the centre) are redone with a float64 Gram, so the result is the float64 path's. The per-candidate
    bound ``e_ij`` also limits the exact recomputation to candidates whose lower bound does not exceed
    the k-th smallest upper bound: the others cannot be among the k nearest (typically 20 of 28
    candidates remain at ``k = 20``).
    """
    n_points = blocks.n_rows
    n_candidates = min(n_points - 1, k + _EXTRA_CANDIDATES)
    sq_norms = _squared_norms(blocks)
    low = (
        n_points * n_points * blocks.n_cols >= _FLOAT32_MIN_WORK
        and n_candidates < n_points - 1
        and ieee_float32_matmul(sq_norms.device)
    )
    best_val, best_idx = _candidates(blocks, n_candidates, sq_norms, torch.float32 if low else torch.float64)
    rows = torch.arange(n_points, device=sq_norms.device)
    if not low:
        return _exact_distances(blocks, rows, best_idx).sort(dim=1).values[:, :k]
    # Gram entries within 1.01 (N + 2) u |w_i| |w_j|; the float32 proxy sq_j - 2 g adds the rounding of
    # sq_j and of the difference: 2.01 u sq_j + 2.01 u |w_i| |w_j| more (u = 2**-24).
    unit = 1.01 * (blocks.n_cols + 3) * 2.0**-24
    norms = sq_norms.sqrt()
    # Float64 round-off of the squared norms and of the proxies (far below the float32 term).
    slack = (blocks.n_cols + 8) * torch.finfo(torch.float64).eps * (sq_norms + sq_norms.max())
    # Only candidates that can still be among the k nearest are recomputed exactly: candidate j of row i
    # has a true proxy within err_ij of best_val; the k-th smallest upper bound is an upper bound of the
    # true k-th smallest proxy, so a candidate whose lower bound lies above it cannot be among the k.
    err = 2 * unit * norms[:, None] * norms[best_idx] + 2.01 * 2.0**-24 * sq_norms[best_idx] + slack[:, None]
    bound = (best_val + err).kthvalue(k, dim=1, keepdim=True).values
    dists = _exact_distances(blocks, rows, best_idx, keep=best_val - err <= bound)
    margin = 2 * unit * norms * norms.max() + 2.01 * 2.0**-24 * sq_norms.max() + slack
    # The k-th exact squared distance, in the centred blocks' units (they carry 2**shift2 more).
    kth = dists.sort(dim=1).values[:, k - 1].square() * 4.0**blocks.shift2
    doubtful = torch.nonzero(best_val[:, -1] + sq_norms - margin <= kth * (1 + 1e-9)).squeeze(1)
    if doubtful.numel():
        _, redo_idx = _candidates_of(blocks, doubtful, n_candidates, sq_norms)
        dists[doubtful] = _exact_distances(blocks, doubtful, redo_idx)
    return dists.sort(dim=1).values[:, :k]


# Problems with at least this many multiply-adds (S^2 N) pick neighbour candidates with a float32 Gram.
_FLOAT32_MIN_WORK = 2**30


def _squared_norms(blocks: _Blocks) -> torch.Tensor:
    """``(S,)`` squared norms of the centred working rows."""
    n_points, n_feat = blocks.n_rows, blocks.n_cols
    out = torch.empty(n_points, dtype=torch.float64, device=blocks.x.device)
    step = _rows_per_block(n_feat)
    for start in range(0, n_points, step):
        out[start : start + step] = blocks.block(slice(start, start + step), reuse=True).square().sum(dim=1)
    return out


def _candidates(
    blocks: _Blocks, n_candidates: int, sq_norms: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running ``n_candidates`` smallest ``||w_j||^2 - 2 <w_i, w_j>`` per row (ascending) and their
    indices, from a Gram in ``dtype`` computed over pairs of row blocks (``i <= j``, each product used for
    both blocks).

    The working blocks (centred in float64, then cast to ``dtype``) are made once per *panel*: as many
    consecutive blocks as fit in ``_CACHE_BYTES`` are kept, every pair inside the panel is
    multiplied, then each later block is made once and multiplied with every block of the panel. When all
    blocks fit (e.g. ``S = 5000`` points of ``N = 2048`` in float32: 41 MB) each block is made exactly
    once; otherwise blocks after the panel are remade once per panel. Memory: the cache plus a few
    blocks, whatever ``S``.

    Below float64, the blocks are first rescaled by a power of two that brings the largest row norm into
    ``[0.5, 1)``, so float32 neither overflows nor (beyond subnormal round-off, far below the float64
    slack of the certificate) underflows whatever the data's scale; the returned values are float64 in
    the units of ``sq_norms``.
    """
    n_points, n_feat = blocks.n_rows, blocks.n_cols
    device = sq_norms.device
    step = max(1, min(_rows_per_block(n_feat), math.isqrt(_block_elements())))
    starts = list(range(0, n_points, step))
    block_bytes = step * n_feat * torch.empty((), dtype=dtype).element_size()
    per_panel = max(1, _CACHE_BYTES // block_bytes)
    best_val = torch.full((n_points, n_candidates), math.inf, dtype=dtype, device=device)
    best_idx = torch.zeros((n_points, n_candidates), dtype=torch.int64, device=device)
    shift = 0 if dtype == torch.float64 else _pow2_shift(math.sqrt(float(sq_norms.max())))
    sq_work = _times_pow2(sq_norms, 2 * shift).to(dtype)  # proxies in the Gram's dtype: less traffic

    def working(start: int) -> tuple[slice, torch.Tensor]:
        rows = slice(start, min(start + step, n_points))
        return rows, _times_pow2_(blocks.block(rows), shift).to(dtype)

    def multiply(left: tuple[slice, torch.Tensor], right: tuple[slice, torch.Tensor]) -> None:
        (rows_i, block_i), (rows_j, block_j) = left, right
        gram = block_i @ block_j.T
        # ||w_j||^2 - 2 <w_i, w_j>: the squared distance up to the row constant ||w_i||^2 (same order).
        proxy = torch.add(sq_work[None, rows_j], gram, alpha=-2.0)
        if rows_i == rows_j:
            proxy.fill_diagonal_(math.inf)  # exclude the point itself
            _merge_topk(best_val, best_idx, rows_i, proxy, rows_j.start)
            return
        _merge_topk(best_val, best_idx, rows_i, proxy, rows_j.start)
        proxy = torch.add(sq_work[None, rows_i], gram.T, alpha=-2.0)
        _merge_topk(best_val, best_idx, rows_j, proxy, rows_i.start)

    for first in range(0, len(starts), per_panel):
        panel = [working(start) for start in starts[first : first + per_panel]]
        for block in panel:  # each block with itself first: near neighbours early make later merges cheap
            multiply(block, block)
        for a, left in enumerate(panel):
            for right in panel[a + 1 :]:
                multiply(left, right)
        for start in starts[first + per_panel :]:
            right = working(start)
            for left in panel:
                multiply(left, right)
        del panel
    return _times_pow2(best_val.to(torch.float64), -2 * shift), best_idx


# Bytes of working blocks :func:`_candidates` keeps for reuse (64 MiB; the rest is recomputed).
_CACHE_BYTES = 2**26


def _candidates_of(
    blocks: _Blocks, rows: torch.Tensor, n_candidates: int, sq_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_candidates` in float64 for the given rows only (against every point)."""
    n_points, n_feat = blocks.n_rows, blocks.n_cols
    step = max(1, min(_rows_per_block(n_feat), math.isqrt(_block_elements())))
    best_val = torch.full((rows.numel(), n_candidates), math.inf, dtype=torch.float64, device=rows.device)
    best_idx = torch.zeros((rows.numel(), n_candidates), dtype=torch.int64, device=rows.device)
    for r0 in range(0, rows.numel(), step):
        sel = slice(r0, r0 + step)
        left = blocks.block(rows[sel])
        for start in range(0, n_points, step):
            cols = slice(start, min(start + step, n_points))
            proxy = torch.addmm(sq_norms[None, cols], left, blocks.block(cols).T, alpha=-2.0)
            own = rows[sel] - start
            inside = (own >= 0) & (own < proxy.shape[1])
            proxy[torch.nonzero(inside).squeeze(1), own[inside]] = math.inf  # exclude the point itself
            _merge_topk(best_val, best_idx, sel, proxy, start)
    return best_val, best_idx


def _exact_distances(
    blocks: _Blocks, rows: torch.Tensor, neighbours: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``(len(rows), kc)`` Euclidean distances from each row to its listed neighbours, from differences
    of the uncentred (power-of-two-scaled) points; ``inf`` where ``keep`` (same shape) is False.

    Each unordered pair is computed once (``i`` listing ``j`` and ``j`` listing ``i`` share it: the norm
    of a negated difference is the same number), in chunks of about :data:`_DIFF_CHUNK_ELEMENTS` float64
    values, small enough to stay in the CPU caches between the gather, the subtraction and the norm.
    """
    n_rows, n_candidates = neighbours.shape
    device = neighbours.device
    dists = torch.full((n_rows, n_candidates), math.inf, dtype=torch.float64, device=device)
    firsts = rows[:, None].expand(n_rows, n_candidates)
    seconds = neighbours
    if keep is not None:
        firsts, seconds = firsts[keep], seconds[keep]
    low, high = torch.minimum(firsts, seconds).reshape(-1), torch.maximum(firsts, seconds).reshape(-1)
    pairs, inverse = torch.unique(low * blocks.n_rows + high, return_inverse=True)
    low, high = pairs // blocks.n_rows, pairs % blocks.n_rows
    out = torch.empty(pairs.numel(), dtype=torch.float64, device=device)
    step = max(1, _DIFF_CHUNK_ELEMENTS // max(1, blocks.n_cols))
    for start in range(0, pairs.numel(), step):
        sl = slice(start, start + step)
        out[sl] = torch.linalg.vector_norm(blocks.raw_difference(low[sl], high[sl]), dim=1)
    if keep is None:
        dists.view(-1).copy_(out[inverse])
    else:
        dists[keep] = out[inverse]
    return dists


# Float64 values per chunk of exact differences: 2 MiB, the fastest measured at N = 2048 (1 and 2 threads,
# 1 MiB of L2 per core); 8 MiB chunks, which leave the caches between gather, subtraction and norm, took
# twice as long.
_DIFF_CHUNK_ELEMENTS = 2**18
