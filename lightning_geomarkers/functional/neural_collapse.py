"""Neural collapse NC1 (Papyan, Han & Donoho, 2020): within-class variability relative to class separation."""

from __future__ import annotations

from typing import Any

import torch

from lightning_geomarkers.functional.preprocessing import _Blocks, _rows_per_block, _scaled64, _times_pow2
from lightning_geomarkers.utilities.checks import check_features_labels, check_rtol

__all__ = ["neural_collapse"]


def neural_collapse(features: Any, labels: Any, rtol: float = 1e-3) -> torch.Tensor:
    r"""NC1: within-class covariance measured in units of the between-class covariance.

    .. math::
        \mathrm{NC1} = \frac{1}{C} \operatorname{tr}\!\left(\Sigma_W \Sigma_B^{+}\right), \qquad
        \Sigma_W = \frac{1}{S} \sum_{i=1}^{S} (x_i - \mu_{y_i})(x_i - \mu_{y_i})^\top, \qquad
        \Sigma_B = \frac{1}{C} \sum_{c=1}^{C} (\mu_c - \mu_G)(\mu_c - \mu_G)^\top

    * :math:`\Sigma_W` is the **pooled** within-class covariance: the mean over all ``S`` samples, i.e. the
      class covariances weighted by class size (the plain average over classes when classes are balanced).
    * :math:`\mu_c` are the class means and :math:`\mu_G = \frac{1}{C}\sum_c \mu_c` is the mean of the class
      means (the global sample mean when classes are balanced).
    * :math:`\Sigma_B^{+}` is the pseudo-inverse keeping eigenvalues ``> rtol`` times the largest.

    Computed without any ``N x N`` matrix: with :math:`\mu_c - \mu_G = U s V^\top` (SVD of the ``C x N``
    centred class means), :math:`\mathrm{NC1} = \sum_{k\ \text{kept}} \|W v_k\|^2 / (S\, s_k^2)` where ``W``
    holds the within-class residuals as rows. Scale invariant. ``0`` means complete collapse (every sample
    on its class mean); higher NC1 = less collapse.

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.
        labels: ``(S,)`` integer class labels; at least 2 distinct classes (single-sample classes are
            allowed: they contribute no within-class spread).
        rtol: relative eigenvalue cut-off in ``(0, 1]`` for the pseudo-inverse of :math:`\Sigma_B`.

    Returns:
        0-dim float64 tensor on the features' device.

    Raises:
        ValueError: bad shapes, NaN/Inf, mismatched lengths, fewer than 2 classes, all class means equal
            (:math:`\Sigma_B = 0`, NC1 undefined), or an NC1 beyond the float64 range.
        TypeError: wrong argument types.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]])
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> # Sigma_W = 1 and Sigma_B = 4 along the first axis: NC1 = (1/2) * (1/4)
        >>> round(float(neural_collapse(x, y)), 6)
        0.125
    """
    x, y = check_features_labels(features, labels, min_classes=2)
    return _neural_collapse(x, y, check_rtol(rtol))


def _neural_collapse(x: torch.Tensor, y: torch.Tensor, rtol: float) -> torch.Tensor:
    """:func:`neural_collapse` on already validated features, labels and ``rtol``."""
    blocks = _Blocks(x, centered=False)  # power-of-two-scaled float64 rows, made block by block
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    n_classes = counts.numel()
    n_rows, n_feat = x.shape
    step = _rows_per_block(n_feat)
    sums = torch.zeros((n_classes, n_feat), dtype=torch.float64, device=x.device)
    for start in range(0, n_rows, step):
        sl = slice(start, start + step)
        sums.index_add_(0, inverse[sl], blocks.block(sl, reuse=True))
    means = sums / counts.to(torch.float64).unsqueeze(1)
    between, shift = _scaled64(means - means.mean(dim=0, keepdim=True))
    if float(between.abs().max()) == 0.0:
        raise ValueError(
            "All class means are equal, so the between-class covariance is zero and NC1 is undefined "
            "(no class separation at all). Check that the labels belong to these features."
        )
    _, sv, vh = torch.linalg.svd(between, full_matrices=False)
    keep = (sv / sv[0]) ** 2 > rtol
    directions = vh[keep].T  # (N, K)
    # ||W v_k||^2 accumulated over row blocks of the within-class residuals W.
    proj_sq = torch.zeros(directions.shape[1], dtype=torch.float64, device=x.device)
    class_means = torch.empty(0, dtype=torch.float64, device=x.device)  # reused for every block's rows
    for start in range(0, n_rows, step):
        sl = slice(start, start + step)
        class_means = torch.index_select(means, 0, inverse[sl], out=class_means.resize_(0))
        resid = blocks.block(sl, reuse=True).sub_(class_means)
        proj_sq += (resid @ directions).square().sum(dim=0)
    # ||W v_k|| / s_k, with s_k of the rescaled class means: undo the power-of-two shift before squaring.
    ratios = _times_pow2(proj_sq.sqrt() / sv[keep], shift)
    nc1 = (ratios**2).sum() / n_rows
    if not bool(torch.isfinite(nc1)):
        raise ValueError(
            "NC1 overflows float64: the class means are (numerically) equal relative to the within-class "
            "spread. Check that the labels belong to these features."
        )
    return nc1
