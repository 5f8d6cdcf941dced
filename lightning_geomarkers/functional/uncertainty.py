r"""Standard errors of the GLUE markers: how far an estimate may move from sampling alone.

Every GLUE marker is an estimate from sampled points, probes and (pairs protocol) class pairs, so two
epochs can differ without any change of the representation. These standard errors (SE) measure that
noise, so an alert can ask for a drop larger than ``k`` standard errors.

**Pairs protocol** (:class:`~lightning_geomarkers.functional.GluePairsResult`). The reported marker is
the mean over pairs of the per-pair values :math:`v_1, \dots, v_n` (NaN values, e.g. alignments of
point-like pairs, left out, as in the mean). Treating the pairs as independent draws,

.. math:: \mathrm{SE} = \frac{s}{\sqrt{n}}, \qquad
          s^2 = \frac{1}{n-1} \sum_{j=1}^{n} (v_j - \bar v)^2

for all seven markers. Each :math:`v_j` already carries its own probe and subsample noise, so this
covers all three sources. When every pair of the monitored classes is used, the spread between pairs is
partly real (not sampling) and the SE is conservative. Needs at least 2 finite values.

**Joint protocol** (:class:`~lightning_geomarkers.functional.GlueResult`). The markers are ratios of
means over the ``n_t`` probes of the per-probe quantities ``a``, ``b``, ``c``:
:math:`\alpha = P / \bar a`, :math:`D = \bar b / P`, :math:`R = \sqrt{\bar c / (\bar b - \bar c)}`,
:math:`\Psi = \bar c / \bar a`. Their SE is the delete-a-group jackknife over probes: split the probes
into ``G`` contiguous groups (``G = n_t``, delete-one, by default), recompute each marker
:math:`\hat\theta_{(g)}` from the means without group ``g``, and

.. math:: \mathrm{SE}_{\mathrm{jack}} = \sqrt{\frac{G-1}{G} \sum_{g=1}^{G}
          \big(\hat\theta_{(g)} - \bar\theta_{(\cdot)}\big)^2}, \qquad
          \bar\theta_{(\cdot)} = \frac{1}{G} \sum_g \hat\theta_{(g)}

(Efron & Tibshirani, 1993, ch. 11). This measures the probe (Monte-Carlo) noise for the fixed sampled
points; the alignments are not ratios of probe means and get no SE here. A marker whose SE is undefined
(fewer than 2 values, a non-finite result) is left out of the returned dict.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_geomarkers.utilities.checks import check_positive_int

__all__ = ["glue_standard_errors", "jackknife_standard_errors", "pairs_standard_errors"]

#: Markers that are ratios of probe means (the joint protocol's jackknife covers these).
RATIO_MARKERS = ("capacity", "dimension", "radius", "utility")


def _float64(values: Any) -> torch.Tensor:
    """A detached float64 tensor of ``values``: a tensor stays on its device, anything else goes to the
    CPU (not to torch's default device, which may be another one)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64)
    return torch.as_tensor(values, dtype=torch.float64, device="cpu")


def pairs_standard_errors(per_pair: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""Standard error of the mean over pairs, ``s / sqrt(n)`` (NaN-aware), for each marker.

    Args:
        per_pair: marker name -> ``(n_pairs,)`` tensor of per-pair values (``GluePairsResult.per_pair``).

    Returns:
        marker name -> 0-dim float64 tensor; markers with fewer than 2 finite values are absent.

    Example:
        >>> import torch
        >>> se = pairs_standard_errors({"dimension": torch.tensor([1.0, 2.0, 3.0, float("nan")])})
        >>> round(float(se["dimension"]), 6)  # s = 1 over the 3 finite values
        0.57735
    """
    out: dict[str, torch.Tensor] = {}
    for name, values in per_pair.items():
        v = _float64(values).reshape(-1)
        v = v[torch.isfinite(v)]
        if v.numel() < 2:
            continue
        out[name] = v.std(unbiased=True) / math.sqrt(v.numel())
    return out


def _ratio_markers(ea: torch.Tensor, eb: torch.Tensor, ec: torch.Tensor, n_manifolds: int) -> dict[str, Any]:
    """The four ratio markers from probe means, with the solver's conventions (``glue._glue_from_gram``):
    radius 0 where ``E[c] = 0`` (no axis part), utility 0 where ``E[a] = 0``."""
    spread = (eb - ec).clamp_min(0)
    return {
        "capacity": n_manifolds / ea,
        "dimension": eb / n_manifolds,
        "radius": torch.where(ec > 0, (ec / spread).sqrt(), torch.zeros_like(ec)),
        "utility": torch.where(ea > 0, ec / ea, torch.zeros_like(ea)),
    }


def jackknife_standard_errors(
    a: Any, b: Any, c: Any, n_manifolds: int, *, n_groups: int | None = None
) -> dict[str, torch.Tensor]:
    r"""Delete-a-group jackknife SE over probes of capacity, dimension, radius and utility.

    Args:
        a, b, c: ``(n_t,)`` per-probe quantities of one GLUE problem (``GlueResult.a/b/c``).
        n_manifolds: ``P``, the number of manifolds of that problem.
        n_groups: number of contiguous probe groups ``G`` (``2 <= G <= n_t``); ``None``: ``G = n_t``
            (delete-one). Groups differ in size by at most one probe.

    Returns:
        marker name -> 0-dim float64 tensor; markers whose SE is not finite are absent.

    Raises:
        ValueError: ``a``, ``b``, ``c`` are not 1-D of one length >= 2, or ``n_groups`` is out of range.

    Example:
        >>> import torch
        >>> a = torch.tensor([2.0, 4.0, 2.0, 4.0])
        >>> se = jackknife_standard_errors(a, a, 0.5 * a, n_manifolds=2)
        >>> float(se["utility"])  # c / a is 0.5 on every probe: no spread
        0.0
    """
    a, b, c = (_float64(v) for v in (a, b, c))
    if a.ndim != 1 or a.shape != b.shape or a.shape != c.shape or a.numel() < 2:
        raise ValueError(
            f"`a`, `b`, `c` must be 1-D per-probe tensors of one length >= 2, got shapes {tuple(a.shape)}, "
            f"{tuple(b.shape)}, {tuple(c.shape)}. Pass GlueResult.a/.b/.c of a run with n_t >= 2."
        )
    n_manifolds = check_positive_int(n_manifolds, "n_manifolds")
    n_t = a.numel()
    groups = n_t if n_groups is None else check_positive_int(n_groups, "n_groups", minimum=2)
    if groups > n_t:
        raise ValueError(f"`n_groups` must be at most the number of probes ({n_t}), got {groups}.")
    label = torch.arange(n_t, device=a.device) * groups // n_t  # contiguous, sizes differ by <= 1
    sizes = torch.bincount(label, minlength=groups).to(torch.float64)
    sums = torch.stack(
        [torch.zeros(groups, dtype=torch.float64, device=a.device).index_add_(0, label, v) for v in (a, b, c)]
    )
    loo = (sums.sum(dim=1, keepdim=True) - sums) / (n_t - sizes)  # (3, G) means without group g
    theta = _ratio_markers(loo[0], loo[1], loo[2], n_manifolds)
    out: dict[str, torch.Tensor] = {}
    for name, values in theta.items():
        se = ((groups - 1) / groups * (values - values.mean()).square().sum()).sqrt()
        if bool(torch.isfinite(se)):
            out[name] = se
    return out


def glue_standard_errors(result: Any, *, n_groups: int | None = None) -> dict[str, torch.Tensor]:
    """Standard errors of a GLUE result: over pairs for a ``GluePairsResult``, jackknife over probes for
    a ``GlueResult`` (see the module docstring for both formulas).

    Args:
        result: the output of :func:`~lightning_geomarkers.functional.glue_pairs`,
            :func:`~lightning_geomarkers.functional.glue_joint` or
            :func:`~lightning_geomarkers.functional.glue`.
        n_groups: jackknife groups for a ``GlueResult`` (ignored for pairs).

    Returns:
        marker name (without the ``glue_`` prefix) -> 0-dim float64 tensor; undefined ones are absent.

    Raises:
        TypeError: ``result`` is neither kind of GLUE result.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.functional import glue
        >>> clouds = torch.randn(3, 8, 40, generator=torch.Generator().manual_seed(0))
        >>> sorted(glue_standard_errors(glue(clouds, n_t=50, generator=0)))
        ['capacity', 'dimension', 'radius', 'utility']
    """
    per_pair = getattr(result, "per_pair", None)
    if isinstance(per_pair, dict):
        return pairs_standard_errors(per_pair)
    if all(isinstance(getattr(result, name, None), torch.Tensor) for name in ("a", "b", "c", "active")):
        return jackknife_standard_errors(
            result.a, result.b, result.c, int(result.active.shape[-1]), n_groups=n_groups
        )
    raise TypeError(
        f"Expected a GlueResult or GluePairsResult (from glue, glue_joint or glue_pairs), got "
        f"{type(result).__name__}."
    )
