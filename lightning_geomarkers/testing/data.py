"""Synthetic data shared by the tests and the benchmarks."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["geometry_clouds"]


def geometry_clouds(
    rng: np.random.Generator, n_classes: int, per_class: int, n_feat: int, dim: int, radius: float
) -> np.ndarray:
    """``(n_classes, per_class, n_feat)`` Gaussian clouds of intrinsic dimension ``dim`` and radius
    ``radius`` around unit-norm centers (the benchmark's geometry grid).

    Each class: a center ``c`` drawn uniformly on the unit sphere, an orthonormal basis ``B`` of a random
    ``dim``-dimensional subspace, and points ``c + radius z B / sqrt(dim)`` with ``z ~ N(0, I_dim)``.

    Example:
        >>> import numpy as np
        >>> geometry_clouds(np.random.default_rng(0), 3, 5, 16, 2, 1.0).shape
        (3, 5, 16)
    """
    out = np.empty((n_classes, per_class, n_feat))
    for c in range(n_classes):
        center = rng.standard_normal(n_feat)
        center /= np.linalg.norm(center)
        basis = np.linalg.qr(rng.standard_normal((n_feat, dim)))[0].T
        out[c] = center + radius * rng.standard_normal((per_class, dim)) @ basis / math.sqrt(dim)
    return out
