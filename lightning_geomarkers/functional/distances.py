"""Within-class mean pairwise distance: the average spread of each class's point cloud."""

from __future__ import annotations

from typing import Any

import torch

from lightning_geomarkers.functional.preprocessing import _scaled64, _unscale
from lightning_geomarkers.utilities.checks import check_features_labels

__all__ = ["within_class_distance"]


def within_class_distance(features: Any, labels: Any) -> torch.Tensor:
    r"""Mean over classes of the mean Euclidean distance between distinct points of the class.

    .. math:: D = \frac{1}{C} \sum_{c=1}^{C} \frac{2}{n_c (n_c - 1)} \sum_{i < j,\; y_i = y_j = c}
              \|x_i - x_j\|_2

    Every class weighs the same, whatever its size. Distances are computed directly from coordinate
    differences (``torch.pdist``, float64, on a copy rescaled by a power of two, so no overflow or
    cancellation from a Gram matrix). Cost ``O(n_c^2 N)`` per class: subsample large classes first (see
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
    xs, shift = _scaled64(x)
    per_class = [torch.pdist(xs[y == c]).mean() for c in torch.unique(y).tolist()]
    result = _unscale(torch.stack(per_class).mean(), shift)
    if not bool(torch.isfinite(result)):
        raise ValueError(
            "The within-class distance overflows float64: `features` values are too large. Rescale them."
        )
    return result
