"""Spectral dimension markers of a feature cloud: participation ratio, numerical and effective rank.

All three look at the spectrum of the ``(S, N)`` feature matrix (rows are samples) after centring on the
global mean (except RankMe, :func:`effective_rank` with ``centered=False``). They are scale invariant and
are computed in float64 on the input's device on a copy rescaled by a power of two, so any finite input is
safe from overflow. A matrix without variance (all rows equal) has no dimensions: every marker returns 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from lightning_geomarkers.functional.preprocessing import _centered64, _scaled64
from lightning_geomarkers.utilities.checks import check_features

__all__ = ["participation_ratio", "numerical_rank", "effective_rank"]


def participation_ratio(features: Any) -> torch.Tensor:
    r"""Participation ratio of the covariance spectrum of all samples.

    .. math:: \mathrm{PR} = \frac{\left(\sum_i \lambda_i\right)^2}{\sum_i \lambda_i^2}
              = \frac{\operatorname{tr}(C)^2}{\|C\|_F^2}

    with :math:`\lambda_i` the eigenvalues of the covariance :math:`C` of the centred features (the
    normalisation of :math:`C` cancels). :math:`1 \le \mathrm{PR} \le \operatorname{rank}(C)`; ``N`` for an
    isotropic cloud. Computed from the smaller of the ``N x N`` and ``S x S`` Gram matrices (same non-zero
    eigenvalues), without an eigendecomposition.

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.

    Returns:
        0-dim float64 tensor on the features' device; ``0`` when all rows are equal.

    Raises:
        ValueError: ``features`` is not 2-D, is empty, or holds NaN/Inf.
        TypeError: ``features`` is not a tensor/array.

    Example:
        >>> import torch
        >>> round(float(participation_ratio(torch.eye(3))), 6)  # two equal eigenvalues
        2.0
    """
    xc = _centered64(check_features(features))
    gram = xc.T @ xc if xc.shape[1] <= xc.shape[0] else xc @ xc.T
    total = torch.trace(gram)
    if float(total) == 0.0:
        return total.new_zeros(())
    return total**2 / (gram**2).sum()


def numerical_rank(features: Any, rtol: float = 1e-3) -> torch.Tensor:
    r"""Number of singular values of the centred feature matrix at or above ``rtol`` times the largest.

    .. math:: r = \#\{\, i : \sigma_i \ge \mathrm{rtol} \cdot \sigma_{\max} \,\}, \qquad
              \sigma = \operatorname{svd}(X - \bar x)

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.
        rtol: relative threshold in ``(0, 1]`` on singular values (not eigenvalues).

    Returns:
        0-dim **int64** tensor on the features' device; ``0`` for a constant (e.g. all-zero) matrix.

    Raises:
        ValueError: bad shape, NaN/Inf, or ``rtol`` outside ``(0, 1]``.
        TypeError: wrong argument types.

    Example:
        >>> import torch
        >>> x = torch.randn(100, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
        >>> int(numerical_rank(x))
        3
    """
    x = check_features(features)
    rtol = _check_rtol(rtol)
    sv = torch.linalg.svdvals(_centered64(x))
    if float(sv[0]) == 0.0:
        return torch.zeros((), dtype=torch.int64, device=x.device)
    return (sv >= rtol * sv[0]).sum().to(torch.int64)


def effective_rank(features: Any, centered: bool = True) -> torch.Tensor:
    r"""Effective rank (Roy & Vetterli, 2007) of the feature matrix; RankMe when ``centered=False``.

    .. math:: \operatorname{erank}(X) = \exp\Big(-\sum_i p_i \log p_i\Big), \qquad
              p_i = \frac{\sigma_i}{\sum_j \sigma_j}

    with :math:`\sigma_i` the singular values of the **centred** matrix :math:`X - \bar x` (default), or of
    the raw, uncentred :math:`X` when ``centered=False``: that is RankMe (Garrido et al., 2023), computed
    here exactly, without RankMe's small additive epsilon. Zero singular values contribute
    :math:`0 \log 0 = 0`. :math:`1 \le \operatorname{erank} \le \operatorname{rank}`, with equality for
    ``k`` equal non-zero singular values (``erank = k``).

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.
        centered: subtract the global mean row first (Roy & Vetterli on the centred cloud). ``False``:
            RankMe on the uncentred features.

    Returns:
        0-dim float64 tensor on the features' device; ``0`` when the (centred) matrix is all zeros.

    Raises:
        ValueError: bad shape or NaN/Inf.
        TypeError: wrong argument types.

    Example:
        >>> import torch
        >>> round(float(effective_rank(torch.eye(4), centered=False)), 6)
        4.0
    """
    x = check_features(features)
    if not isinstance(centered, bool):
        raise TypeError(f"`centered` must be a bool, got {centered!r}.")
    xw = _centered64(x) if centered else _scaled64(x)[0]
    sv = torch.linalg.svdvals(xw)
    total = sv.sum()
    if float(total) == 0.0:
        return total.new_zeros(())
    p = sv / total
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return torch.exp(-plogp.sum())


def _check_rtol(rtol: Any) -> float:
    """Validate a relative threshold in ``(0, 1]``."""
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real):
        raise TypeError(f"`rtol` must be a float in (0, 1], got {rtol!r}.")
    value = float(rtol)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"`rtol` must be in (0, 1] (e.g. 1e-3), got {rtol!r}.")
    return value
