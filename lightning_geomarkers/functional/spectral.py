"""Spectral dimension markers of a feature cloud: participation ratio, numerical and effective rank.

All three look at the spectrum of the ``(S, N)`` feature matrix (rows are samples) after centring on the
global mean (except RankMe, :func:`effective_rank` with ``centered=False``). They are scale invariant and
are computed in float64 on the input's device, on blocks rescaled by a power of two, so any finite input is
safe from overflow. A matrix without variance (all rows equal) has no dimensions: every marker returns 0.

One decomposition serves them all: :func:`feature_spectrum` returns the singular values, and every marker
accepts it as ``spectrum=`` (``geometry_markers`` computes it once per call). It is computed from the
eigenvalues of the smaller Gram side (``N x N`` or ``S x S``, accumulated block by block in float64),
which costs ``S N min(S, N) + min(S, N)^3`` instead of an SVD's larger constant and needs no float64 copy
of the features.

Precision. Forming the Gram squares the condition number: an eigenvalue ``lambda = sigma^2`` carries an
absolute error of about ``n eps lambda_max`` (``n = min(S, N)``, ``eps = 2.2e-16``). Singular values at or
above ``rtol sigma_max`` with ``rtol = 1e-3`` have eigenvalues at ``1e-6 lambda_max``, so they are
resolved to better than ``1e-6`` relative for any ``n`` below ``1e4``: numerical rank and participation
ratio equal the float64 SVD's. Eigenvalues below ``n eps lambda_max`` (singular values below
``sqrt(n eps) sigma_max``, e.g. ``6.7e-7 sigma_max`` at ``n = 2048``) are round-off and are returned as 0;
they can move the effective rank by at most about ``k sqrt(n eps) (1 + log(1/sqrt(n eps)))`` relative for
``k`` such values (below ``1e-4`` in the tests on ill-conditioned inputs). ``tests/test_spectrum_and_memory.py``
checks all of this against ``numpy.linalg.svd``.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_geomarkers.functional.preprocessing import (
    _Blocks,
    _centered64,
    _gram64,
    _pow2_shift,
    _times_pow2,
)
from lightning_geomarkers.utilities.checks import check_bool, check_features, check_rtol

__all__ = ["feature_spectrum", "participation_ratio", "numerical_rank", "effective_rank"]

# Gram eigenvalues below this many ``n * eps * lambda_max`` are round-off, returned as 0.
_GRAM_FLOOR = 1.0
# ``numerical_rank`` trusts the Gram spectrum when its threshold rtol^2 lies this far above the floor.
_RTOL_MARGIN = 1e4


def feature_spectrum(features: Any, centered: bool = True) -> torch.Tensor:
    r"""Singular values of the centred feature matrix, descending, in float64 (one decomposition).

    .. math:: \sigma_i = \sqrt{\lambda_i(W^\top W)} = \sqrt{\lambda_i(W W^\top)}, \qquad
              W = X - \bar x

    computed from the eigenvalues (``eigvalsh``) of the smaller Gram side, accumulated in float64 blocks:
    ``N x N`` when ``S > N``, else ``S x S``. Memory: ``min(S, N)^2`` float64 plus one 16 MiB block; no
    float64 copy of the features. Values below ``sqrt(n eps) sigma_max`` (``n = min(S, N)``) are round-off
    of the Gram route and are returned as exactly 0 (see the module docstring for the precision argument).
    Pass the result as ``spectrum=`` to :func:`participation_ratio`, :func:`numerical_rank` and
    :func:`effective_rank` to share it.

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.
        centered: subtract the global mean row first (default); ``False`` gives the spectrum of the raw
            matrix (RankMe's).

    Returns:
        ``(min(S, N),)`` float64 tensor on the features' device, in the units of ``features``, sorted
        descending; all zeros when the (centred) matrix is zero.

    Raises:
        ValueError: bad shape or NaN/Inf, or singular values beyond the float64 range (rescale first).
        TypeError: wrong argument types.

    Example:
        >>> import torch
        >>> x = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> [round(v, 12) for v in feature_spectrum(x).tolist()]  # sqrt(18), sqrt(2), to round-off
        [4.242640687119, 1.414213562373]
    """
    x = check_features(features)
    check_bool(centered, "centered")
    return _feature_spectrum(x, centered)


def _feature_spectrum(x: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """:func:`feature_spectrum` on an already validated tensor."""
    sv, shift = _spectrum64(x, centered)
    out = _times_pow2(sv, -shift)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            "The singular values overflow float64: `features` values are too large. Rescale them (e.g. "
            "divide by their largest absolute value) first."
        )
    return out


def _spectrum64(x: torch.Tensor, centered: bool) -> tuple[torch.Tensor, int]:
    """Descending singular values of the (centred) working matrix and its power-of-two ``shift``.

    The values are those of ``(x - mean) * 2**shift`` (``shift`` a power of two keeping squares clear of
    overflow and underflow), so scale-invariant markers can use them directly, whatever the input's scale.
    """
    blocks = _Blocks(x, centered=centered)
    # Only the upper triangle is filled, and eigvalsh reads only one: the lower one of the transpose (the
    # default, whose LAPACK path was 15% faster here than UPLO="U"; the transpose is a view).
    gram = _gram64(blocks, mirror=False)
    lam = torch.linalg.eigvalsh(gram.mT).flip(0)
    floor = _GRAM_FLOOR * gram.shape[0] * torch.finfo(torch.float64).eps * lam[:1].clamp_min(0)
    lam = torch.where(lam > floor, lam, torch.zeros_like(lam))
    return lam.sqrt(), blocks.shift


def _as_spectrum(spectrum: Any, x: torch.Tensor) -> torch.Tensor:
    """Validate a precomputed spectrum for ``x`` and rescale it by a power of two (markers are scale
    invariant): a descending, non-negative, finite float64 vector of length ``min(S, N)``."""
    if not isinstance(spectrum, torch.Tensor):
        raise TypeError(
            f"`spectrum` must be a torch.Tensor from feature_spectrum(features), got {type(spectrum).__name__}."
        )
    s = spectrum.detach().to(device=x.device, dtype=torch.float64)
    n = min(x.shape)
    if s.ndim != 1 or s.numel() != n:
        raise ValueError(
            f"`spectrum` must be the (min(S, N),) = ({n},) singular values of these features, got shape "
            f"{tuple(s.shape)}. Pass feature_spectrum(features) for the same features."
        )
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(
            "`spectrum` must hold finite, non-negative singular values (feature_spectrum's output)."
        )
    peak = float(s.max())
    return _times_pow2(s.sort(descending=True).values, _pow2_shift(peak))


def participation_ratio(features: Any, *, spectrum: torch.Tensor | None = None) -> torch.Tensor:
    r"""Participation ratio of the covariance spectrum of all samples.

    .. math:: \mathrm{PR} = \frac{\left(\sum_i \lambda_i\right)^2}{\sum_i \lambda_i^2}
              = \frac{\operatorname{tr}(C)^2}{\|C\|_F^2}

    with :math:`\lambda_i` the eigenvalues of the covariance :math:`C` of the centred features (the
    normalisation of :math:`C` cancels). :math:`1 \le \mathrm{PR} \le \operatorname{rank}(C)`; ``N`` for an
    isotropic cloud. Computed from the smaller of the ``N x N`` and ``S x S`` Gram matrices (same non-zero
    eigenvalues, accumulated in float64 blocks), without an eigendecomposition; or, when ``spectrum`` is
    given, from :math:`\lambda_i = \sigma_i^2`.

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.
        spectrum: optional :func:`feature_spectrum` of the same ``features`` (centred), to share one
            decomposition between markers.

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
    return _participation_ratio(check_features(features), spectrum)


def _participation_ratio(x: torch.Tensor, spectrum: torch.Tensor | None) -> torch.Tensor:
    """:func:`participation_ratio` on an already validated tensor."""
    # PR is scale invariant: normalise by the trace before squaring, so huge features (a spectrum in the
    # features' own units, e.g. 1e77) cannot overflow total**2 or the sum of squares.
    if spectrum is not None:
        sv = _as_spectrum(spectrum, x)
        peak = sv.max() if sv.numel() else sv.new_zeros(())
        if float(peak) == 0.0:
            return peak.new_zeros(())
        lam = (sv / peak) ** 2
        total = lam.sum()
    else:
        lam = _gram64(_Blocks(x, centered=True))  # the Gram's trace and Frobenius norm are the spectrum's
        total = torch.trace(lam)
    if float(total) == 0.0:
        return total.new_zeros(())
    return (
        1.0 / lam.div_(total).square_().sum()
    )  # in place: lam is this function's own (min(S, N)^2 on the Gram side)


def numerical_rank(
    features: Any, rtol: float = 1e-3, *, spectrum: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Number of singular values of the centred feature matrix at or above ``rtol`` times the largest.

    .. math:: r = \#\{\, i : \sigma_i \ge \mathrm{rtol} \cdot \sigma_{\max} \,\}, \qquad
              \sigma = \operatorname{svd}(X - \bar x)

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples.
        rtol: relative threshold in ``(0, 1]`` on singular values (not eigenvalues).
        spectrum: optional :func:`feature_spectrum` of the same ``features`` (centred), to share one
            decomposition between markers. Without it the spectrum is computed here the same way.

    The spectrum comes from the Gram route (see the module docstring). When ``rtol`` is so small that
    ``rtol^2`` comes within ``1e4`` times of the Gram route's round-off floor ``n eps`` (``rtol < 1e-4``
    for ``n = 2048``), an exact ``svdvals`` of the centred matrix is used instead.

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
    return _numerical_rank(check_features(features), check_rtol(rtol), spectrum)


def _numerical_rank(x: torch.Tensor, rtol: float, spectrum: torch.Tensor | None) -> torch.Tensor:
    """:func:`numerical_rank` on an already validated tensor and ``rtol``."""
    n = min(x.shape)
    if rtol**2 < _RTOL_MARGIN * _GRAM_FLOOR * n * torch.finfo(torch.float64).eps:
        sv = torch.linalg.svdvals(_centered64(x))  # below the Gram route's resolution: exact SVD
    elif spectrum is not None:
        sv = _as_spectrum(spectrum, x)
    else:
        sv = _spectrum64(x, True)[0]
    if float(sv[0]) == 0.0:
        return torch.zeros((), dtype=torch.int64, device=x.device)
    return (sv >= rtol * sv[0]).sum().to(torch.int64)


def effective_rank(
    features: Any, centered: bool = True, *, spectrum: torch.Tensor | None = None
) -> torch.Tensor:
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
        spectrum: optional :func:`feature_spectrum` of the same ``features`` with the same ``centered``,
            to share one decomposition between markers. Without it the spectrum is computed here the same
            way (Gram route; see the module docstring for its precision).

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
    check_bool(centered, "centered")
    return _effective_rank(x, centered, spectrum)


def _effective_rank(x: torch.Tensor, centered: bool, spectrum: torch.Tensor | None) -> torch.Tensor:
    """:func:`effective_rank` on an already validated tensor."""
    sv = _as_spectrum(spectrum, x) if spectrum is not None else _spectrum64(x, centered)[0]
    total = sv.sum()
    if float(total) == 0.0:
        return total.new_zeros(())
    p = sv / total
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return torch.exp(-plogp.sum())
