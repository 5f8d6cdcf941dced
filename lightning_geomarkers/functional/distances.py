"""Within-class mean pairwise distance: the average spread of each class's point cloud."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_geomarkers.functional.preprocessing import (
    _abs_peak,
    _block_elements,
    _class_rows,
    _rows_per_block,
    _safe_shift,
    _times_pow2_,
    _unscale,
)
from lightning_geomarkers.utilities.checks import check_features_labels

__all__ = ["within_class_distance"]


def within_class_distance(features: Any, labels: Any) -> torch.Tensor:
    r"""Mean over classes of the mean Euclidean distance between distinct points of the class.

    .. math:: D = \frac{1}{C} \sum_{c=1}^{C} \frac{2}{n_c (n_c - 1)} \sum_{i < j,\; y_i = y_j = c}
              \|x_i - x_j\|_2

    Every class weighs the same, whatever its size. Distances are computed directly from coordinate
    differences (``torch.pdist``, or ``torch.cdist`` without its matrix-product shortcut on pairs of row
    blocks for large classes; float64, on rows rescaled by a power of two, so no overflow or cancellation
    from a Gram matrix). Cost ``O(n_c^2 N)`` per class, memory bounded by a few 16 MiB blocks per class:
    subsample large classes first (see
    :func:`~lightning_geomarkers.functional.preprocessing.per_class_subsample`).

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.
        labels: ``(S,)`` integer class labels; every class needs at least 2 samples.

    Returns:
        0-dim float64 tensor on the features' device, in the units of ``features``.

    Raises:
        ValueError: bad shapes, NaN/Inf, mismatched lengths, a class with fewer than 2 samples, or a
            distance beyond the float64 range.
        TypeError: wrong argument types.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 2.0]])
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> float(within_class_distance(x, y))  # (5 + 2) / 2
        3.5
    """
    x, y = check_features_labels(features, labels, min_per_class=2)
    return _within_class_distance(x, y)


def _within_class_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`within_class_distance` on already validated features and labels."""
    shift = _safe_shift(_abs_peak(x))
    per_class = [_mean_pairwise_distance(x, rows, shift) for rows in _class_rows(y, torch.unique(y))]
    result = _unscale(torch.stack(per_class).mean(), shift)
    if not bool(torch.isfinite(result)):
        raise ValueError(
            "The within-class distance overflows float64: `features` values are too large. Rescale them."
        )
    return result


def _mean_pairwise_distance(x: torch.Tensor, rows: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean distance over the ``n (n - 1) / 2`` pairs of ``x[rows] * 2**shift``, in bounded blocks."""
    n = rows.numel()
    n_feat = x.shape[1]
    if n * (n - 1) // 2 <= _block_elements() and n * n_feat <= _block_elements():
        return torch.pdist(_times_pow2_(x[rows].to(torch.float64, copy=True), shift)).mean()
    step = max(1, min(_rows_per_block(n_feat), math.isqrt(_block_elements())))
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, n, step):
        left = _times_pow2_(x[rows[i : i + step]].to(torch.float64, copy=True), shift)
        total += torch.pdist(left).sum()
        for j in range(i + step, n, step):
            right = _times_pow2_(x[rows[j : j + step]].to(torch.float64, copy=True), shift)
            total += torch.cdist(left, right, compute_mode="donot_use_mm_for_euclid_dist").sum()
    return total / (n * (n - 1) // 2)
