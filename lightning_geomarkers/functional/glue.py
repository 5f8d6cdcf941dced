"""GLUE (Geometry Linked to Untangling Efficiency) markers at margin kappa = 0.

Definitions: ``docs/markers.md`` section 3; the project's choices are in its section 4.
For each probe k, with t_k ~ N(0, I_N) and a dichotomy y_k in {+1, -1}^P,

    lambda = argmin_{lambda >= 0} || G^T lambda - t_k ||^2,     rows of G: y_k[mu] x for every point x,

anchors s^mu = sum_i lambda_{mu,i} x_i / sum_i lambda_{mu,i} (manifolds with zero total weight are
inactive for the probe), centers s0^mu = mean anchor over active probes, axis parts s1 = s - s0, and

    a = (S t)^T (S S^T)^+ (S t),   b = (S1 t)^T (S1 S1^T)^+ (S1 t),   c = (S1 t)^T (S0 S0^T + S1 S1^T)^+ (S1 t)

    capacity = P / E[a],  dimension = E[b] / P,  radius = sqrt(E[c] / E[b - c]),  utility = E[c] / E[a].

(The dichotomy signs cancel in a, b and c, so they are computed on unsigned anchors.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch

from lightning_geomarkers.errors import (
    GeomarkersWarning,
    NonSeparableWarning,
    SolverWarning,
    outside_stacklevel,
)
from lightning_geomarkers.functional._nnls import (
    KKT_CERTIFIED,
    _gram_times,
    _layout,
    batched_nnls,
    separable_dichotomies,
)
from lightning_geomarkers.functional.preprocessing import _abs_peak, _safe_shift, _times_pow2
from lightning_geomarkers.utilities.checks import (
    DICHOTOMY_KINDS,
    as_manifolds,
    as_tensor,
    check_eigen_cutoff,
    check_finite,
    check_positive_int,
)
from lightning_geomarkers.utilities.seeds import as_generator, child_generators
from lightning_geomarkers.utilities.threads import limit_threads

__all__ = ["GlueResult", "glue", "make_dichotomies", "GLUE_MARKERS"]

#: The scalar GLUE markers, in the order they are reported.
GLUE_MARKERS = (
    "capacity",
    "dimension",
    "radius",
    "utility",
    "center_alignment",
    "axis_alignment",
    "center_axis_alignment",
)

#: Points count as linearly independent when every relative Cholesky pivot of their Gram (L_ii^2 / K_ii)
#: exceeds this (each point keeps a component of relative size >= 1e-5 outside the others' span).
_INDEPENDENCE_RTOL = 1e-10
#: The Cholesky path of the pseudo-inverse quadratic forms is taken where a lower bound on the
#: smallest eigenvalue exceeds this multiple of the cut-off (the rest go through ``eigh``).
_CERTIFIED_CUTOFF_FACTOR = 4.0
#: Ho-Kashyap steps of the cheap separability certificate (before the exact test).
_HO_KASHYAP_STEPS = 20
#: Cap on the float64 elements of the marker algebra's per-chunk temporaries (2^22: 32 MiB).
_ALGEBRA_ELEMENTS = 2**22
#: ``glue`` warns when the total number of points exceeds this multiple of the feature dimension.
JOINT_POINTS_PER_FEATURE = 4
#: ... and has at least this many points (below it the cost is small whatever the geometry).
JOINT_WARN_MIN_POINTS = 1000


@dataclass
class GlueResult:
    """GLUE markers of one set of P manifolds, plus solver diagnostics.

    Every marker is a 0-dim float64 tensor (``float(result.capacity)`` works). ``a``, ``b``, ``c`` are the
    per-probe quantities of ``docs/markers.md`` 3.5 (shape (n_t,)), ``active`` the (n_t, P) mask of manifolds with
    positive weight, ``anchors`` the (n_t, P, N) anchor points (only with ``return_anchors=True``; in the
    input's units).
    """

    capacity: torch.Tensor
    dimension: torch.Tensor
    radius: torch.Tensor
    utility: torch.Tensor
    center_alignment: torch.Tensor
    axis_alignment: torch.Tensor
    center_axis_alignment: torch.Tensor
    n_probes: int
    n_degenerate: int
    iterations: int
    kkt_violation: float
    converged: bool
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    active: torch.Tensor
    anchors: torch.Tensor | None = None

    def to_dict(self) -> dict[str, float]:
        """The seven markers and the scalar diagnostics as plain Python numbers."""
        out: dict[str, float] = {name: float(getattr(self, name)) for name in GLUE_MARKERS}
        out.update(
            n_probes=self.n_probes,
            n_degenerate=self.n_degenerate,
            iterations=self.iterations,
            kkt_violation=self.kkt_violation,
        )
        return out

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.to_dict().items())
        return f"GlueResult({shown})"


def make_dichotomies(
    kind: str | Any, n_t: int, n_manifolds: int, generator: torch.Generator | int | None = None
) -> torch.Tensor:
    """(n_t, P) float64 tensor of +-1 labels: "random" (i.i.d. signs), "balanced" (half +1, random
    sign for odd P), "one_vs_rest" (+1 on one class, cycling through a random order), or an explicit
    (n_t, P) array of +-1 (any numeric dtype). ``generator``: CPU generator, int seed or None.

    Raises:
        ValueError / TypeError: an unknown kind, ``n_t`` or ``n_manifolds`` not a positive integer, or an
            explicit array of the wrong shape or with values other than +-1.
    """
    n_manifolds = check_positive_int(n_manifolds, "n_manifolds")
    generator = as_generator(generator)
    if isinstance(kind, str):
        n_t = check_positive_int(n_t, "n_t")
        if kind not in DICHOTOMY_KINDS:
            raise ValueError(
                f"Unknown dichotomies={kind!r}; use one of {DICHOTOMY_KINDS} or an (n_t, P) tensor."
            )
        if kind == "random":
            return torch.randint(0, 2, (n_t, n_manifolds), generator=generator, device="cpu").double() * 2 - 1
        if kind == "balanced":
            base = torch.ones(n_manifolds, dtype=torch.float64, device="cpu")
            base[n_manifolds // 2 :] = -1
            perms = torch.argsort(torch.rand((n_t, n_manifolds), generator=generator, device="cpu"), dim=1)
            y = base[perms]
            if n_manifolds % 2:  # keep the ensemble symmetric under y -> -y
                y = y * (torch.randint(0, 2, (n_t, 1), generator=generator, device="cpu").double() * 2 - 1)
            return y
        order = torch.randperm(n_manifolds, generator=generator, device="cpu")
        y = -torch.ones((n_t, n_manifolds), dtype=torch.float64, device="cpu")
        rows = torch.arange(n_t, device="cpu")
        y[rows, order[rows % n_manifolds]] = 1
        return y
    y = as_tensor(kind, "dichotomies").double().cpu()
    if y.ndim != 2 or y.shape[1] != n_manifolds:
        raise ValueError(
            f"Explicit `dichotomies` must have shape (n_t, P) = (n_t, {n_manifolds}), got {tuple(y.shape)}."
        )
    if not bool(((y == 1) | (y == -1)).all()):
        raise ValueError("Explicit `dichotomies` must contain only +1 and -1.")
    return y


def _eigh_quad(gram: torch.Tensor, vec: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v^T G^+ v by eigendecomposition (eigenvalues <= cutoff dropped) and v projected on the kept
    eigenvectors."""
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > cutoff
    proj = (evecs.transpose(-1, -2) @ vec.unsqueeze(-1)).squeeze(-1)
    inv = torch.where(keep, 1.0 / evals.clamp_min(cutoff), torch.zeros_like(evals))
    kept = (evecs @ (proj * keep).unsqueeze(-1)).squeeze(-1)
    return (proj.square() * inv).sum(-1), kept


@overload
def _quad_pinv(
    gram: torch.Tensor,
    vec: torch.Tensor,
    cutoff: float,
    active: torch.Tensor,
    *,
    return_kept: Literal[False] = False,
) -> torch.Tensor: ...
@overload
def _quad_pinv(
    gram: torch.Tensor, vec: torch.Tensor, cutoff: float, active: torch.Tensor, *, return_kept: Literal[True]
) -> tuple[torch.Tensor, torch.Tensor]: ...
def _quad_pinv(
    gram: torch.Tensor, vec: torch.Tensor, cutoff: float, active: torch.Tensor, *, return_kept: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """v^T G^+ v for batched symmetric PSD G, with an ABSOLUTE eigenvalue cut-off.

    An absolute cut-off (tied to the data scale) keeps round-off from being counted as dimensions;
    zero rows of inactive manifolds fall below it and drop out exactly as if left out. With
    ``return_kept`` also returns v projected on the retained eigenvectors.

    ``active`` (..., P) marks the rows and columns that may be non-zero (G and v vanish elsewhere).
    Fast path, same value: with a unit diagonal on the inactive rows, G' = L L^T by Cholesky, and
    lambda_min(G') >= 1 / trace(G'^-1) = 1 / ||L^-1||_F^2. Where that bound exceeds
    ``_CERTIFIED_CUTOFF_FACTOR`` x cutoff, no eigenvalue of the active block falls below the cut-off, so
    G^+ is the inverse there: v^T G^+ v = ||L^-1 v||^2 and v is kept whole. The other rows (some
    eigenvalue near or below the cut-off, or a failed factorization) are decomposed by ``eigh``.
    """
    n = gram.shape[-1]
    padded = gram + torch.diag_embed((~active).to(gram.dtype))
    chol, info = torch.linalg.cholesky_ex(padded)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device).expand_as(padded)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    bound = 1.0 / chol_inv.square().sum((-1, -2))
    certified = (info == 0) & (bound > _CERTIFIED_CUTOFF_FACTOR * cutoff)  # NaN bounds fail
    value = (chol_inv @ vec.unsqueeze(-1)).squeeze(-1).square().sum(-1)
    kept = vec
    rest = (~certified).nonzero().squeeze(1)  # one host read per call
    if rest.numel():
        v_rest, k_rest = _eigh_quad(gram[rest], vec[rest], cutoff)
        value = value.index_put((rest,), v_rest)
        kept = kept.index_put((rest,), k_rest)
    return (value, kept) if return_kept else value


def _mean_abs_cos(
    dots: torch.Tensor, sq_u: torch.Tensor, sq_v: torch.Tensor, valid: torch.Tensor, cutoff: float
) -> torch.Tensor:
    """Mean |cos(u_mu, v_nu)| over ordered pairs mu != nu, from inner products.

    dots: (B, K, P, P) inner products u_mu . v_nu; sq_u, sq_v: (B, K, P) squared norms; valid:
    (B, K, P, P). Per pair the mean is over the K (probe) axis where valid; vectors with squared norm
    below ``cutoff`` have no direction and are skipped. Returns (B,): the mean over pairs that were
    valid at least once (NaN if none).
    """
    num, cnt = _abs_cos_sums(dots, sq_u, sq_v, valid, cutoff)
    return _pair_mean(num.sum(1), cnt.sum(1))


def _abs_cos_sums(
    dots: torch.Tensor, sq_u: torch.Tensor, sq_v: torch.Tensor, valid: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry of ``dots`` (..., P, P): |cos| where it counts (valid, both vectors above the cut-off,
    mu != nu; 0 elsewhere) and whether it counts, for :func:`_mean_abs_cos`'s sums over probes."""
    ok = valid & (sq_u[..., :, None] > cutoff) & (sq_v[..., None, :] > cutoff)
    ok = ok & ~torch.eye(dots.shape[-1], dtype=torch.bool, device=dots.device)
    cos = dots.abs() / (sq_u[..., :, None] * sq_v[..., None, :]).clamp_min(cutoff * cutoff).sqrt()
    return torch.where(ok, cos, torch.zeros_like(cos)), ok.to(cos.dtype)


def _pair_mean(num: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
    """(B,) mean over pairs of the per-pair means num / cnt ((B, P, P) sums over probes), over the pairs
    counted at least once (NaN if none)."""
    per_pair = torch.where(cnt > 0, num / cnt.clamp_min(1), torch.full_like(num, math.nan))
    return torch.nanmean(per_pair.flatten(-2), dim=-1)


def _support_blocks(
    gram: torch.Tensor, group: torch.Tensor, lam: torch.Tensor, n_sup: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each probe's support and its Gram block: the ``n_sup`` largest multipliers (Q, n_sup) (the
    support first, as lam >= 0; zeros pad shorter supports), their point indices and K_FF
    (Q, n_sup, n_sup), gathered by flat index from the probes' (G, T, T) Grams."""
    n_points = lam.shape[1]
    vals, idx = lam.topk(n_sup, dim=1)
    flat = (group * (n_points * n_points))[:, None, None] + idx[:, :, None] * n_points + idx[:, None, :]
    k_ff = gram.reshape(-1).index_select(0, flat.reshape(-1)).view(-1, n_sup, n_sup)
    return vals, idx, k_ff


def _support_products(
    gram: torch.Tensor,
    group: torch.Tensor,
    lam: torch.Tensor,
    weight: torch.Tensor,
    c0k: torch.Tensor,
    h: torch.Tensor,
    m_max: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S S^T, S S0^T and S t of a batch of probes from their supports only.

    With F the support of probe q (lambda_F > 0), B (|F|, P) the normalised multipliers w_a = lambda_a /
    weight_{man(a)} placed in their manifold's column, and K_FF the Gram block of the support:

        S S^T = B^T K_FF B,      S S0^T = B^T (K C0^T)_F,      S t = B^T h_F,

    where (K C0^T)_{a, nu} = (c0_nu K_{nu,:})_a is ``c0k`` (B, P, T) transposed. Cost O(Q |F| (|F| + P) P)
    instead of the O(Q P M T) of forming each anchor's Gram row: supports are a handful of points.

    Args:
        gram: (G, T, T); group: (Q,); lam: (Q, T) multipliers; weight: (Q, P) per-manifold sums of lam;
        c0k: (G, P, T); h: (Q, T) the products X t; m_max: points per manifold (T = P m_max,
        manifold by manifold).
    Returns:
        (Q, P, P) S S^T, (Q, P, P) S S0^T and (Q, P) S t.
    """
    n_q, n_points = lam.shape
    n_man = weight.shape[1]
    n_sup = max(1, int((lam > 0).sum(1).max())) if n_q else 1  # one host read per chunk
    vals, idx, k_ff = _support_blocks(gram, group, lam, n_sup)
    man = torch.div(idx, m_max, rounding_mode="floor")
    w_f = vals / weight.gather(1, man).clamp_min(torch.finfo(lam.dtype).tiny)  # 0 off the support
    coef = torch.zeros((n_q, n_sup, n_man), dtype=lam.dtype, device=lam.device)
    coef.scatter_(2, man[..., None], w_f[..., None])  # (Q, S, P): B
    s_s = coef.transpose(1, 2) @ (k_ff @ coef)
    kc_f = (
        c0k.transpose(1, 2).reshape(-1, n_man).index_select(0, (group[:, None] * n_points + idx).reshape(-1))
    )
    s_c = coef.transpose(1, 2) @ kc_f.view(n_q, n_sup, n_man)
    s_t = (coef * h.gather(1, idx)[..., None]).sum(1)
    return s_s, s_c, s_t


def _residual_certificate(
    gram: torch.Tensor,
    group: torch.Tensor,
    sig: torch.Tensor,
    real: torch.Tensor,
    norm_d: torch.Tensor,
    lam: torch.Tensor,
    h: torch.Tensor,
    t_norm: torch.Tensor,
) -> torch.Tensor:
    """(Q,) bool: separability certified by the probe's own GLUE solution.

    With lambda the probe's NNLS multipliers (support F) and r = t - G^T lambda the residual, dual
    feasibility gives sigma_i <x_i, -r> >= 0 for every point, 0 on F: -r separates weakly. The support is
    linearly independent (the solver keeps it so), so d = X_F^T a with K_FF a = sigma_F has margin 1 on
    F, and v = -r + eps d separates strictly once eps is below every off-support margin of -r over the
    (negative) margin of d there. The margins of v are checked as computed, against a round-off bound
    like the other certificates', so any lambda (optimal or not) gives a sound answer; this one costs a
    solve on each support and two products with K. On barely separable features (ReLU features of 32 to
    40 classes of 50 points in 400 dimensions) it certified every dichotomy that the class-mean
    certificates left to the exact test.

    Args:
        gram: (D, T, T); group: (Q,) index into it; sig: (Q, T) point signs (0 on padding); real: (Q, T)
        real points; norm_d: (Q, T) point norms; lam: (Q, T) multipliers; h: (Q, T) X t; t_norm: (Q,).
    """
    n_q, n_points = lam.shape
    support = lam > 0
    n_sup = max(1, int(support.sum(1).max())) if n_q else 1  # one host read
    coef_d = torch.zeros_like(lam)  # d = X^T coef_d (0 off the support)
    factored = torch.ones(n_q, dtype=torch.bool, device=lam.device)
    # The (probes, |F|, |F|) support blocks, a bounded number of probes at a time (supports can be
    # hundreds of points where P M >> N).
    step = max(1, _ALGEBRA_ELEMENTS // (n_sup * n_sup))
    for k0 in range(0, n_q, step):
        sl = slice(k0, k0 + step)
        vals, idx, k_ff = _support_blocks(gram, group[sl], lam[sl], n_sup)
        on = vals > 0
        k_ff = torch.where(on[:, :, None] & on[:, None, :], k_ff, torch.zeros_like(k_ff))
        k_ff.diagonal(dim1=-2, dim2=-1).add_((~on).to(k_ff.dtype))  # unit diagonal on the padding slots
        chol, info = torch.linalg.cholesky_ex(k_ff)
        a = torch.cholesky_solve((sig[sl].gather(1, idx) * on).unsqueeze(-1), chol).squeeze(-1)
        coef_d[sl] = coef_d[sl].scatter(1, idx, a * on)
        factored[sl] = info == 0
    coef_u = lam * sig  # G^T lambda = X^T (sigma lambda)
    both, both_group = torch.cat([coef_u, coef_d]), torch.cat([group, group])
    prods = _gram_times(gram, both, *_layout(both_group, gram.shape[0]), None)  # one host read
    base = sig * (prods[:n_q] - h)  # sigma_i <x_i, -r>
    lift = sig * prods[n_q:]  # sigma_i <x_i, d>
    off = real & ~support
    # The largest eps keeping every off-support margin positive, halved; 1 when d has none negative.
    ratio = torch.where(off & (lift < 0), base / (-lift).clamp_min(torch.finfo(lam.dtype).tiny), torch.inf)
    eps = (ratio.amin(1) / 2).clamp_max(1.0)
    margins = base + eps[:, None] * lift
    weight = t_norm + (norm_d * (coef_u.abs() + eps[:, None] * coef_d.abs())).sum(1)
    slack = 1e-12 * n_points * norm_d * weight[:, None]
    # An exactly-zero point is never strictly separated (sigma <v, 0> = 0). Its margin here is round-off
    # of h, not 0, where h = X t was drawn by the symmetric square root of a dependent group's Gram (its
    # zero row carries ~eps sqrt(lambda_max) of error); that certified dichotomies with a zero point.
    return torch.where(real, (margins > slack) & (norm_d > 0), True).all(1) & factored & (eps > 0)


def _sign_patterns(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2^(P-1) sign patterns of P classes up to a global sign (first class +1), as (D, 2^(P-1), P)
    for the D groups of ``labels`` (D, n_t, P) (entries +-1), and each probe's pattern index (D, n_t):
    y and -y share one.

    Example:
        >>> y = torch.tensor([[[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]])
        >>> table, code = _sign_patterns(y)
        >>> table[0].tolist(), code.tolist()
        ([[1.0, -1.0], [1.0, 1.0]], [[0, 0, 1]])
    """
    n_groups, _, n_man = labels.shape
    bits = 2 ** torch.arange(n_man - 1, device=labels.device)
    code = (((labels * labels[..., :1])[..., 1:] > 0).long() * bits).sum(-1)
    index = torch.arange(2 ** (n_man - 1), device=labels.device)
    rest = torch.where((index[:, None] & bits) > 0, 1.0, -1.0).to(labels.dtype)
    table = torch.cat([torch.ones_like(rest[:, :1]), rest], 1)
    return table.expand(n_groups, -1, -1), code


def _separable_probes(
    gram: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
    solution: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    n_feat: int | None = None,
) -> torch.Tensor:
    """(B * n_t,) bool: is each probe's dichotomy strictly separable? Solved once per distinct dichotomy
    of a group, up to sign (y and -y are separable together): at most 2 per pair for P = 2. ``factor``:
    :func:`_padded_cholesky` of ``gram`` if the caller has it (otherwise it is computed only for groups
    that the class-mean certificates leave open and that have at most ``n_feat`` real points: more points
    than features are dependent); ``solution``: the probes' GLUE multipliers, X t and ||t||
    ((B * n_t, T), (B * n_t, T), (B * n_t,)), for :func:`_residual_certificate`."""
    n_groups, n_t, n_man = labels.shape
    separable = torch.ones((n_groups, n_t), dtype=torch.bool, device=labels.device)
    # Strict separability does not change when a point is rescaled (sigma_i <v, x_i> > 0 for any
    # positive multiple of x_i), so no test below may depend on how large the largest point is (one
    # outlier 1e5 x the typical norm made separable dichotomies look degenerate): the independence test
    # uses relative pivots, the certificates a per-point round-off bound, the exact test unit-norm points.
    norms2 = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0)  # (B, T)
    # Linearly independent points realise every sign pattern (solve X v = s), so only groups whose
    # points are (numerically) dependent need the tests below. With the caller's factor that is decided
    # first; without one, the Cholesky factorization (T^3 / 3 per group) waits until the cheap class-mean
    # certificates have run, which often settle everything (and it is never needed with more points than
    # features).
    if factor is not None:
        dependent = _dependent_groups(gram, mask, factor)
        if not bool(dependent.any()):
            return separable.reshape(-1)
        dep = dependent.nonzero().squeeze(1)
    else:
        dep = torch.arange(n_groups, device=gram.device)  # any group may be dependent: all go on
    # Cheap sufficient certificates, tried before the exact test: a direction v = X^T c separates
    # strictly when every margin sigma_i (K c)_i is positive. In coefficient space, each on what the
    # ones before it leave open:
    #  - the signed class-mean direction, c = sum_mu y_mu (indicator of mu) / M_mu;
    #  - the class means' interpolant (a P x P solve per group);
    #  - without the caller's factor: the independence test (here, not above);
    #  - the probes' own GLUE solutions (_residual_certificate);
    #  - the ridge least-squares fit of the signs, c = (K + eps I)^-1 sigma, which interpolates them
    #    whenever the classes' affine spans are independent (low-dimensional clouds, P M > N);
    #  - a few Ho-Kashyap steps.
    # The margin threshold bounds the round-off of K c, so a certificate is never an artefact.
    gram_d = gram if dep.numel() == n_groups else gram[dep]
    fmask = mask[dep].to(labels.dtype)  # (D, P, M)
    n_dep, n_pts = dep.numel(), gram_d.shape[-1]
    sig = (labels[dep][..., None] * fmask[:, None]).reshape(n_dep, n_t, n_pts)
    real = fmask.reshape(n_dep, 1, n_pts) > 0
    # |K_ij| <= ||x_i|| ||x_j|| (Cauchy-Schwarz); the largest diagonal entry sets the ridge.
    norm_d = norms2[dep].sqrt()[:, None, :]  # (D, 1, T)
    k_max = gram_d.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(gram.dtype).tiny)[:, None, None]
    mean_coef = fmask / fmask.sum(-1, keepdim=True).clamp_min(1)  # (D, P, M)

    def check(
        kc: torch.Tensor, weight: torch.Tensor, part: tuple[torch.Tensor, ...] = (sig, norm_d, real)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Margins sigma_i (K c)_i from ``kc`` = K c and whether all clear the round-off bound;
        ``weight`` = sum_j ||x_j|| |c_j| (D, n_t, 1); ``part``: the signs, point norms and real-point
        masks of the groups checked (all D by default)."""
        signs, norms, points_real = part
        margins = signs * kc
        # Round-off of (K c)_i (and of K itself) is at most ~(T + N) u ||x_i|| sum_j ||x_j|| |c_j|
        # (u = 1.1e-16): 1e-12 T covers it for N up to ~10^4 T.
        slack = 1e-12 * n_pts * norms * weight
        return margins, (torch.where(points_real, margins > slack, True).all(-1)) & (weight[..., 0] > 0)

    # The two class-mean certificates depend on a dichotomy only up to sign (y and -y give the same
    # margins): with few classes (2^(P-1) sign patterns, fewer than the probes: the pairs have 2) they
    # run once per pattern and are read off per probe.
    y_dep = labels[dep]  # (D, n_t, P)
    patterns, code = _sign_patterns(y_dep) if 2 ** (n_man - 1) < n_t else (y_dep, None)
    n_pat = patterns.shape[1]
    pattern_part = (
        (sig, norm_d, real)
        if code is None
        else ((patterns[..., None] * fmask[:, None]).reshape(n_dep, n_pat, n_pts), norm_d, real)
    )
    # The class-mean direction c = sum_mu y_mu 1_mu / M_mu: K c = sum_mu y_mu (K 1_mu / M_mu), from the P
    # class-mean columns of K, so no (n_t, T) x (T, T) product; sum_j ||x_j|| |c_j| is the same for every
    # dichotomy.
    mean_k = torch.einsum("dpm,dpmt->dpt", mean_coef, gram_d.reshape(n_dep, n_man, -1, n_pts))  # (D, P, T)
    mean_weight = (mean_coef * norm_d.view(n_dep, n_man, -1)).sum((-1, -2))[:, None, None]
    certified = check(patterns @ mean_k, mean_weight.expand(-1, n_pat, -1), pattern_part)[1]
    # The class means' interpolant: the direction v = sum_mu a_mu m_mu with <v, m_mu> = y_mu for every
    # class mean m_mu (a from the P x P Gram of the means, slightly ridged), c = sum_mu a_mu 1_mu / M_mu.
    # Each point's margin is then 1 plus its offset from its class mean along v: it certifies tight
    # classes whatever P M is against N (many classes of many points: P = 100, M = 50, N = 512), where
    # the signed mean direction fails on the P - 1 cross terms and the ridge fit of T = P M signs
    # cannot interpolate. Costs a P x P solve and an (n_t, P) x (P, T) product per group. One host read.
    if not bool(certified.all()):
        means_gram = torch.einsum("dpqm,dqm->dpq", mean_k.reshape(n_dep, n_man, n_man, -1), mean_coef)
        means_gram = (means_gram + means_gram.transpose(1, 2)) / 2
        top = means_gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(gram.dtype).tiny)
        means_gram.diagonal(dim1=-2, dim2=-1).add_(1e-10 * top[:, None])
        means_chol, means_info = torch.linalg.cholesky_ex(means_gram)
        interp = torch.cholesky_solve(patterns.transpose(1, 2), means_chol).transpose(1, 2)  # (D, n_pat, P)
        interp = interp * (means_info == 0)[:, None, None]
        class_weight = (mean_coef * norm_d.view(n_dep, n_man, -1)).sum(-1)  # (D, P): sum_j ||x_j|| / M_mu
        interp_weight = (interp.abs() * class_weight[:, None]).sum(-1, keepdim=True)
        certified |= check(interp @ mean_k, interp_weight, pattern_part)[1]
    if code is not None:
        certified = certified.gather(1, code)  # (D, n_t): each probe's pattern
    # Without the caller's factor: the independence test for the groups still open that can be
    # independent. One host read.
    if factor is None and not bool(certified.all()):
        maybe = ~certified.all(1)
        if n_feat is not None:
            maybe &= fmask.sum((1, 2)) <= n_feat
        test = maybe.nonzero().squeeze(1)
        if test.numel():
            certified[test] |= ~_dependent_groups(gram_d[test], mask[dep[test]])[:, None]
    # The probes' own GLUE solutions (see _residual_certificate), for what the class means leave open: a
    # solve on each open probe's support instead of the ridge's (T, T) factorization and Ho-Kashyap's
    # (n_t, T) x (T, T) steps, which rarely certify when T exceeds the points' rank.
    if solution is not None and not bool(certified.all()):
        lam, h_all, t_all = solution
        rows = torch.nonzero(~certified)  # (open, 2): dependent group, probe
        flat_rows = dep[rows[:, 0]] * n_t + rows[:, 1]
        certified[rows[:, 0], rows[:, 1]] = _residual_certificate(
            gram_d,
            rows[:, 0],
            sig[rows[:, 0], rows[:, 1]],
            real[rows[:, 0], 0],
            norm_d[rows[:, 0], 0],
            lam[flat_rows],
            h_all[flat_rows],
            t_all[flat_rows],
        )
    # The ridge fit and Ho-Kashyap only for what is still open (often nothing: then the
    # (T, T) ridge factorization is skipped), on the groups with open rows. One host read.
    if not bool(certified.all()):
        open_groups = (~certified).any(1).nonzero().squeeze(1)
        # All of them: views, no copies.
        sub: torch.Tensor | slice = slice(None) if open_groups.numel() == n_dep else open_groups
        gram_s, part = gram_d[sub], (sig[sub], norm_d[sub], real[sub])

        def check_coef(coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return check(coef @ gram_s, (coef.abs() * part[1]).sum(-1, keepdim=True), part)

        ridge = gram_s.clone()
        ridge.diagonal(dim1=-2, dim2=-1).add_(1e-8 * k_max[sub, :, 0])
        ridge_chol, ridge_info = torch.linalg.cholesky_ex(ridge)
        factored = (ridge_info == 0)[:, None, None]
        coef = torch.cholesky_solve(part[0].transpose(1, 2), ridge_chol).transpose(1, 2)
        certified[sub] |= check_coef(coef * factored)[1]
        # Then Ho-Kashyap on what is left (at most _HO_KASHYAP_STEPS steps, stopping as soon as everything
        # is certified: one host read per step, outside the NNLS loop): least squares towards positive
        # targets b, raising b where the margins already exceed it, so the fit moves towards a separating
        # direction when one exists; every step is checked like the above. On the digits-MLP features
        # every dichotomy is certified within 2-3 steps; the other 17 steps were a third of the
        # separability test's time.
        if not bool(certified.all()):
            targets = part[2].to(gram.dtype).expand(-1, n_t, -1)
            for _ in range(_HO_KASHYAP_STEPS):
                coef = torch.cholesky_solve((part[0] * targets).transpose(1, 2), ridge_chol).transpose(1, 2)
                margins, ok = check_coef(coef * factored)
                certified[sub] |= ok
                if bool(certified.all()):
                    break
                excess = margins - targets
                targets = targets + (excess + excess.abs()) * part[2]
    # Separability depends on the dichotomy (up to sign), not on the probe: a certificate found for one
    # probe (its own GLUE solution) holds for every probe of the group with that sign pattern. Without
    # this, probes of one dichotomy could get different verdicts (the exact test below calls margins
    # under ~3e-5 non-separable).
    if not bool(certified.all()):
        y_dep = labels[dep]
        canon = (y_dep * y_dep[..., :1]).reshape(n_dep * n_t, -1)
        owner = torch.arange(n_dep, device=labels.device).repeat_interleave(n_t)[:, None].to(canon.dtype)
        _, pattern = torch.unique(torch.cat([owner, canon], 1), dim=0, return_inverse=True)
        any_certified = torch.zeros(int(pattern.max()) + 1, dtype=torch.int64, device=labels.device)
        any_certified.scatter_reduce_(0, pattern, certified.reshape(-1).long(), "amax")
        certified = any_certified[pattern].bool().reshape(n_dep, n_t)
    open_rows = (~certified).nonzero()
    if open_rows.shape[0] == 0:
        return separable.reshape(-1)
    group = dep[open_rows[:, 0]]
    canon = labels[group, open_rows[:, 1]]
    canon = canon * canon[:, :1]
    rows = torch.cat([group[:, None].to(labels.dtype), canon], dim=1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    u_group = uniq[:, 0].long()
    sigma = (uniq[:, 1:, None] * mask[u_group].to(labels.dtype)).reshape(uniq.shape[0], -1)
    # The exact test on unit-norm points (its residual threshold is absolute); zero points stay zero
    # (never strictly separated).
    inv = torch.where(norms2 > 0, norms2.rsqrt(), torch.zeros_like(norms2))
    unit = gram * inv[:, :, None] * inv[:, None, :]
    separable[group, open_rows[:, 1]] = separable_dichotomies(unit, u_group, sigma)[inverse]
    return separable.reshape(-1)


def _glue_groups(
    points: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    probes: torch.Tensor | None,
    generators: Sequence[torch.Generator],
    eigen_cutoff: float,
    max_iter: int | None,
    return_anchors: bool = False,
) -> dict[str, Any]:
    """GLUE on B independent problem groups at once (the engine behind :func:`glue` and the protocols),
    on raw (not normalised) points, with explicit or drawn probes.

    Args:
        points: (B, P, M, N) float64 whose squares cannot overflow or underflow; zero rows as padding.
        mask: (B, P, M) real points; labels: (B, n_t, P) dichotomies.
        probes: (B, n_t, N) explicit probes, or None to draw them from ``generators`` (one per group) in
            the span of the points (:func:`_span_probes`; needs at most N real points per group).
    Returns:
        :func:`_glue_from_gram`'s dict; anchors (if asked for) in the units of ``points``. The points are
        normalised through their Gram only (:func:`_normalised_gram`): no pass over the (B, T, N) points
        beyond the two products with them.
    """
    n_groups, n_man, m_max, n_feat = points.shape
    # The solver issues hundreds of small ops per iteration: inference mode skips autograd's bookkeeping
    # in each of them (0-9% of the time, typically 5-8%: docs/performance.md). Nothing here needs
    # gradients; the results leave as ordinary tensors (cloned, or computed after the block), so callers
    # may modify them.
    with torch.inference_mode():
        gram, scale = _normalised_gram(points, mask)
        factor = None
        if probes is None:
            factor = _padded_cholesky(gram, mask)
            h, t_norm = _span_probes(gram, mask, factor, n_feat, labels.shape[1], generators)
        else:
            h = torch.einsum("btn,bqn->bqt", points.flatten(1, 2), probes).div_(scale[:, None, None])
            h, t_norm = h.reshape(-1, n_man * m_max), probes.norm(dim=-1).reshape(-1)
        # With many points in few dimensions (T > 2 N) the solver's products K u are cheaper through the
        # (normalised) points than through the Gram.
        nnls_points = points.flatten(1, 2) / scale[:, None, None] if n_man * m_max > 2 * n_feat else None
        out = _glue_from_gram(
            gram,
            mask,
            h,
            t_norm,
            labels,
            eigen_cutoff=eigen_cutoff,
            max_iter=max_iter,
            factor=factor,
            nnls_points=nnls_points,
            n_feat=n_feat,
        )
    weights = out.pop("weights")
    out = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in out.items()}
    # Anchors s = w X, formed outside inference mode (an ordinary tensor, no copy of the largest output).
    out["anchors"] = torch.einsum("bkpm,bpmn->bkpn", weights, points) if return_anchors else None
    return out


def _gram(points: torch.Tensor) -> torch.Tensor:
    """(B, T, T) Gram matrices of (B, P, M, N) points, T = P M (manifold by manifold)."""
    flat = points.flatten(1, 2)
    return flat @ flat.transpose(1, 2)


def _normalised_gram(points: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices (B, T, T) of the groups' points scaled to mean squared point norm 1, and the (B,)
    scales: what rescaling the points then forming their Gram would give, without a pass over the (B, T, N) points
    beyond the product itself. ``points``: (B, P, M, N) float64 whose squares cannot overflow (see
    :func:`~lightning_geomarkers.functional.preprocessing._safe_shift`)."""
    gram = _gram(points)
    real = mask.reshape(gram.shape[0], -1)
    sq = (gram.diagonal(dim1=-2, dim2=-1) * real).sum(-1) / real.sum(-1).clamp_min(1)
    if bool((sq == 0).any()):
        raise ValueError(
            "All points of a manifold set are zero; GLUE is undefined. Check that the features are not "
            "constant (e.g. dead ReLUs) and do not center data with a single point per class."
        )
    return gram.div_(sq[:, None, None]), sq.sqrt()  # in place: the product is ours


def _dependent_groups(
    gram: torch.Tensor, mask: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """(B,) bool: are the real points of each group (numerically) linearly dependent? From
    :func:`_padded_cholesky` of ``gram`` (``factor``, computed if not given): a failed factorization or a
    relative pivot L_ii^2 / K_ii (each point's squared distance from the span of the points before it,
    over its squared norm) at or below ``_INDEPENDENCE_RTOL``."""
    chol, info = _padded_cholesky(gram, mask) if factor is None else factor
    padding = (~mask.reshape(gram.shape[0], -1)).to(gram.dtype)
    padded_diag = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0) + padding
    pivots = chol.diagonal(dim1=-2, dim2=-1).square() / padded_diag.clamp_min(torch.finfo(gram.dtype).tiny)
    return (info != 0) | (pivots.amin(-1) <= _INDEPENDENCE_RTOL)


def _padded_cholesky(gram: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cholesky_ex`` of each Gram with a unit diagonal on the padding points: (B, T, T) factors and (B,)
    LAPACK infos. Padding rows and columns of the Gram are exactly zero, so the padding stays decoupled
    in the factor (its rows and columns are exactly those of the identity)."""
    padded = gram.clone()  # in place on a copy: no further (T, T) temporaries
    padded.diagonal(dim1=-2, dim2=-1).add_(~mask.reshape(gram.shape[0], -1))
    return torch.linalg.cholesky_ex(padded)


def _span_probes(
    gram: torch.Tensor,
    mask: torch.Tensor,
    factor: tuple[torch.Tensor, torch.Tensor],
    n_feat: int,
    n_t: int,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Draw the products ``h = X t`` and norms ``||t||`` of ``n_t`` Gaussian probes per group in the span
    of the group's points, with exactly the law they have for ``t ~ N(0, I_N)``.

    With ``X`` the group's (T, N) points (T <= N) and ``K = X X^T = L L^T``, ``h = X t`` is Gaussian with
    covariance ``K``, so ``h = L z`` with ``z ~ N(0, I_T)`` has its law; writing ``t`` as its part in the
    row space of ``X`` plus an orthogonal part, ``||t||^2 = ||z||^2 + \chi^2_{N - T}``, the chi-square
    independent of ``z``. Cost O(n_t T^2) per group instead of the O(n_t N T) of drawing ``t`` in N
    dimensions (N = 2048, T = 100: 20x fewer normals). Where the points are dependent (rank r < T), ``L``
    is the symmetric square root ``U diag(sqrt(max(mu, 0))) U^T`` from ``eigh``: with ``X = U_r S V_r^T``,
    ``h = U_r S (U_r^T z)`` and ``||z||^2 = ||U_r^T z||^2 + \chi^2_{T - r}`` have the law of
    ``h = U_r S (V_r^T t)`` and the row-space part of ``||t||^2``, so the same formula for ``||t||`` holds.
    Padding points get ``h = 0`` and do not count in ``T``.

    Args:
        gram: (B, T, T) normalised Grams; mask: (B, P, M) real points; factor: :func:`_padded_cholesky`
            of ``gram``; n_feat: N; n_t: probes per group; generators: one CPU generator per group.
    Returns:
        ``h`` (B * n_t, T) and ``||t||`` (B * n_t,), float64 on the Gram's device.
    """
    n_groups, n_pts, _ = gram.shape
    chol, info = factor
    real = mask.reshape(n_groups, n_pts)
    n_real = real.sum(-1).tolist()
    lower = chol
    # Groups whose points are (numerically) dependent, by the relative pivots rather than by whether the
    # factorization happened to fail: for an exactly singular Gram that is decided by round-off, which
    # may differ between devices. One host read per call.
    failed = torch.nonzero(_dependent_groups(gram, mask, factor)).squeeze(1)
    if failed.numel():
        # The symmetric square root U diag(sqrt(mu)) U^T: unlike U diag(sqrt(mu)) it does not depend on
        # the eigensolver's choice of eigenvector signs (or bases of repeated eigenvalues), which LAPACK
        # and cuSOLVER need not share, so a seed gives the same probes on every device.
        evals, evecs = torch.linalg.eigh(gram[failed])
        lower = chol.clone()
        lower[failed] = (evecs * evals.clamp_min(0).sqrt()[:, None, :]) @ evecs.mT
    z = torch.stack(
        [torch.randn((n_t, n_pts), generator=g, dtype=torch.float64, device="cpu") for g in generators]
    )
    rest = torch.stack([_chi_square(g, n_feat - m, n_t) for g, m in zip(generators, n_real, strict=True)])
    z = z.to(gram.device)
    h = (z @ lower.transpose(1, 2)) * real[:, None, :]
    t_norm = ((z.square() * real[:, None, :]).sum(-1) + rest.to(gram.device)).sqrt()
    return h.reshape(n_groups * n_t, n_pts), t_norm.reshape(-1)


def _chi_square(generator: torch.Generator, dof: int, size: int) -> torch.Tensor:
    """``size`` chi-square draws with ``dof >= 0`` degrees of freedom (float64, CPU), seeded from
    ``generator`` (torch has no seeded chi-square sampler; numpy's ``Generator`` is used)."""
    if dof <= 0:
        return torch.zeros(size, dtype=torch.float64, device="cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu"))
    return torch.from_numpy(np.random.default_rng(seed).chisquare(dof, size))


def _glue_from_gram(
    gram: torch.Tensor,
    mask: torch.Tensor,
    h: torch.Tensor,
    t_norm: torch.Tensor,
    labels: torch.Tensor,
    *,
    eigen_cutoff: float,
    max_iter: int | None,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
    nnls_points: torch.Tensor | None = None,
    n_feat: int | None = None,
) -> dict[str, Any]:
    """GLUE from the groups' normalised Grams (B, T, T), the probes' products
    ``h = X t`` (B * n_t, T) and norms (B * n_t,): the probes themselves are never needed. The dict also
    holds ``weights``, the (B, n_t, P, M) normalised multipliers w of the anchors s = w X; ``factor`` is
    :func:`_padded_cholesky` of ``gram`` when the caller already has it;
    ``nnls_points`` the normalised (B, T, N) points behind ``gram``, for the solver's products where
    T > 2 N (see :func:`~lightning_geomarkers.functional._nnls.batched_nnls`); ``n_feat`` the points'
    dimension N, if known (groups with more points are dependent without a factorization)."""
    n_groups, n_t, n_man = labels.shape
    m_max = mask.shape[-1]
    sigma = (labels[..., None] * mask[:, None].to(labels.dtype)).reshape(n_groups * n_t, -1)
    group = torch.arange(n_groups, device=gram.device).repeat_interleave(n_t)
    sol = batched_nnls(gram, group, h, sigma, t_norm, max_iter=max_iter, block_size=m_max, points=nnls_points)

    # Everything below lives in coefficient space: an anchor is s = w X with w the (normalised) NNLS
    # multipliers of its manifold, so every inner product of anchors, centers and probes is a small
    # contraction with the point Gram K and with h = X t. Nothing of size N is formed (the caller forms
    # the anchors, if asked for, from the returned weights), which is what keeps many-pair batches cheap.
    q_all = n_groups * n_t
    lam = sol.lam.reshape(q_all, n_man, m_max)
    weight = lam.sum(-1)  # (Q, P)
    active = weight > 0
    # lam >= 0, so a manifold with zero weight has all-zero multipliers and gets w = 0 / tiny = 0.
    w = lam / weight.clamp_min(torch.finfo(lam.dtype).tiny)[..., None]
    n_active = active.reshape(n_groups, n_t, n_man).sum(1)  # (B, P)
    c0 = w.reshape(n_groups, n_t, n_man, m_max).sum(1) / n_active.clamp_min(1)[..., None]  # (B, P, M)
    c0_blocks = c0.reshape(n_groups, n_man, m_max)
    c0k = torch.einsum("bpm,bpmt->bpt", c0_blocks, gram.reshape(n_groups, n_man, m_max, n_man * m_max))
    c_c = (c0k.reshape(n_groups, n_man, n_man, m_max) * c0_blocks[:, None]).sum(-1)  # (B, P, P) = S0 S0^T
    # The rest per probe, a bounded number of probes at a time: S S^T and S S0^T (unmasked centers) from
    # each probe's support (its (|F|, |F|) Gram block), then a, b, c and the alignments' sums from the
    # (P, P) products. Unchunked, the (probes, P, P) arrays grew as n_t P^2 (+1.5 GB at P = 300).
    lam_flat = sol.lam
    n_sup_all = max(1, int((lam_flat > 0).sum(1).max()))
    step = max(1, _ALGEBRA_ELEMENTS // max(n_sup_all * (n_sup_all + 2 * n_man), 12 * n_man * n_man))
    weight_flat = weight.reshape(q_all, n_man)
    c_t = (h.reshape(n_groups, n_t, n_man, m_max) * c0[:, None]).sum(-1).reshape(q_all, n_man)  # S0 t
    act_all = active.to(lam_flat.dtype)
    a = lam_flat.new_empty(q_all)
    b, c = torch.empty_like(a), torch.empty_like(a)
    sums = [lam_flat.new_zeros((n_groups, n_man, n_man)) for _ in range(4)]  # |cos| and counts, 2 kinds
    c_diag = c_c.diagonal(dim1=-2, dim2=-1)
    for k0 in range(0, q_all, step):
        sl = slice(k0, k0 + step)
        rows = group[sl]
        s_s, s_c, s_t = _support_products(gram, rows, lam_flat[sl], weight_flat[sl], c0k, h[sl], m_max)
        act = act_all[sl]
        active_k = active[sl]
        pair_act = act[:, :, None] * act[:, None, :]
        c_c_k = c_c[rows] * pair_act  # centers of the active manifolds only
        s_c = s_c * act[:, None, :]
        s1_s1 = s_s - s_c - s_c.transpose(-1, -2) + c_c_k  # S1 S1^T with S1 = S - S0 on active rows
        s1_t = s_t - c_t[sl] * act
        # Points have mean squared norm 1 here, so the cut-off is absolute in the data's own scale.
        a[sl] = _quad_pinv(s_s, s_t, eigen_cutoff, active_k)
        b[sl], s1_t_kept = _quad_pinv(s1_s1, s1_t, eigen_cutoff, active_k, return_kept=True)
        # c only sees the axis directions that survived the cut-off in b: round-off is not a dimension.
        c[sl] = _quad_pinv(c_c_k + s1_s1, s1_t_kept, eigen_cutoff, active_k)
        both = pair_act.bool()
        s1_sq = s1_s1.diagonal(dim1=-2, dim2=-1)
        for num, cnt, (cos, ok) in (
            (sums[0], sums[1], _abs_cos_sums(s1_s1, s1_sq, s1_sq, both, eigen_cutoff)),
            # s0_mu . s1_nu = s0_mu . s_nu - s0_mu . s0_nu
            (
                sums[2],
                sums[3],
                _abs_cos_sums(s_c.transpose(-1, -2) - c_c_k, c_diag[rows], s1_sq, both, eigen_cutoff),
            ),
        ):
            num.index_add_(0, rows, cos)
            cnt.index_add_(0, rows, ok)
    a, b, c = (v.reshape(n_groups, n_t) for v in (a, b, c))
    active = active.reshape(n_groups, n_t, n_man)

    ea, eb, ec = a.mean(1), b.mean(1), c.mean(1)
    capacity = n_man / ea
    dimension = eb / n_man
    spread = (eb - ec).clamp_min(0)
    # radius: 0/0 (point manifolds have no axis part) is 0, not NaN.
    radius = torch.where(ec > 0, (ec / spread).sqrt(), torch.zeros_like(ec))
    utility = torch.where(ea > 0, ec / ea, torch.zeros_like(ea))

    center_al = _mean_abs_cos(
        c_c[:, None],
        c_diag[:, None],
        c_diag[:, None],
        torch.ones_like(c_c[:, None], dtype=torch.bool),
        eigen_cutoff,
    )
    axis_al = _pair_mean(sums[0], sums[1])
    center_axis_al = _pair_mean(sums[2], sums[3])
    separable = _separable_probes(gram, mask, labels, factor, (sol.lam, h, t_norm), n_feat=n_feat)
    degenerate = ~separable.reshape(n_groups, n_t)
    return {
        "capacity": capacity,
        "dimension": dimension,
        "radius": radius,
        "utility": utility,
        "center_alignment": center_al,
        "axis_alignment": axis_al,
        "center_axis_alignment": center_axis_al,
        "a": a,
        "b": b,
        "c": c,
        "active": active,
        "weights": w.reshape(n_groups, n_t, n_man, m_max),
        "n_degenerate": degenerate.sum(1),
        "iterations": sol.iterations,
        "kkt_violation": sol.kkt_violation.reshape(n_groups, n_t).amax(1),
        "converged": sol.converged.reshape(n_groups, n_t).all(1),
    }


def warn_diagnostics(
    n_degenerate: int, n_probes: int, converged: bool, kkt: float, where: str = "", n_zero: int = 0
) -> None:
    """Turn solver diagnostics into warnings that say what happened and what to do. ``n_zero``: points
    that are exactly zero, which no hyperplane through the origin separates strictly."""
    if n_degenerate:
        advice = (
            f" {n_zero} point(s) are exactly zero (at the origin): no hyperplane through the origin separates "
            "them strictly, so dichotomies of their problems count as degenerate, although such points add "
            "nothing to the cone. Drop all-zero rows (e.g. samples whose ReLU features are all dead), centre "
            "the features (geometry_markers' center_features=True), or, for manifolds of unequal sizes, pass "
            "a list of (M_mu, N) tensors instead of a zero-padded stack."
            if n_zero
            else " Use fewer points per class or fewer classes (roughly P * M <= 2 r is needed for generic "
            "points, r the rank of the features: the feature dimension N at most, less where units are dead "
            "or a bottleneck narrows the layer)."
        )
        warnings.warn(
            f"GLUE{where}: {n_degenerate} of {n_probes} probes were degenerate (the manifolds are not linearly "
            "separable by a hyperplane through the origin for that probe's dichotomy), so dimension, radius and "
            "utility are unreliable." + advice,
            NonSeparableWarning,
            stacklevel=outside_stacklevel(),
        )
    if not converged:
        warnings.warn(
            f"GLUE{where}: the NNLS solver did not certify every probe: it hit its iteration cap, or the "
            f"final KKT check failed (largest relative KKT violation {kkt:.2e}, certified up to "
            f"{KKT_CERTIFIED:g}). Raise `max_iter`; if the violation stays, the features are numerically "
            "rank-deficient (e.g. duplicated or collinear points): use fewer points per class.",
            SolverWarning,
            stacklevel=outside_stacklevel(),
        )


def _prepare_probes(
    probes: Any,
    dichotomies: Any,
    n_t: int,
    n_man: int,
    n_feat: int,
    generator: torch.Generator,
    *,
    draw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Generator]:
    """Explicit or drawn probes (n_t, N) and dichotomies (n_t, P), float64 on the CPU, and the probes'
    generator.

    Probes and dichotomies come from two independent streams seeded from ``generator``. With
    ``draw=False`` and no explicit probes, no probe is drawn (``None``): the caller draws them in the span
    of the points from the returned generator (:func:`_span_probes`).
    """
    g_t, g_y = child_generators(generator, 2)
    t: torch.Tensor | None = None
    if probes is None:
        if draw:
            t = torch.randn((n_t, n_feat), generator=g_t, dtype=torch.float64, device="cpu")
    else:
        t = as_tensor(probes, "probes").double().cpu()
        if t.ndim != 2 or t.shape[1] != n_feat or t.shape[0] < 2:
            raise ValueError(
                f"`probes` must have shape (n_t, N) = (n_t, {n_feat}) with n_t >= 2, got {tuple(t.shape)} (with one "
                "probe every anchor is its manifold's center: dimension, radius and utility would be 0)."
            )
        check_finite(t, "probes")
        sq = (t * t).sum(1)
        zero = torch.nonzero((t == 0).all(1)).flatten().tolist()
        if zero:
            raise ValueError(
                f"`probes` rows {zero[:10]} are zero: a zero probe has no projection to measure (the capacity "
                "would come out infinite). Pass non-zero probes, e.g. standard Gaussian rows."
            )
        if not bool(torch.isfinite(sq).all()) or bool((sq < torch.finfo(torch.float64).tiny).any()):
            raise ValueError(
                "`probes` rows are too large or too small for their squared norms in float64 (the markers "
                "would overflow to capacity inf, dimension 0): pass probes of moderate norm, e.g. standard "
                "Gaussian rows."
            )
        n_t = t.shape[0]
    y = make_dichotomies(dichotomies, n_t, n_man, g_y)
    if y.shape[0] != n_t:
        raise ValueError(f"`dichotomies` has {y.shape[0]} rows but there are {n_t} probes.")
    return t, y, g_t


def glue(
    manifolds: torch.Tensor | Sequence[torch.Tensor],
    *,
    n_t: int = 200,
    dichotomies: str | torch.Tensor = "random",
    probes: torch.Tensor | None = None,
    generator: torch.Generator | int | None = None,
    eigen_cutoff: float = 1e-9,
    max_iter: int | None = None,
    return_anchors: bool = False,
    warn: bool = True,
    num_threads: int | None = 1,
) -> GlueResult:
    """GLUE capacity, effective dimension, radius, utility and alignments of P manifolds.

    Args:
        manifolds: (P, M, N) tensor or a sequence of P tensors of shape (M_mu, N); rows are points.
            No preprocessing is applied (see :func:`center` and :func:`random_projection`).
        n_t: number of probes (ignored when ``probes`` is given).
        dichotomies: "random", "balanced", "one_vs_rest", or an explicit (n_t, P) tensor of +-1.
        probes: optional explicit (n_t, N) probe vectors t_k; with explicit dichotomies the result is
            deterministic. Drawn probes (the default) enter the solver only through ``X t`` and
            ``||t||``; when the P M points number at most N these are drawn in the span of the points with
            exactly their law for ``t ~ N(0, I_N)`` (``X t = L z``, ``K = L L^T``), at O(n_t (P M)^2)
            instead of O(n_t N P M) cost.
        generator: CPU ``torch.Generator`` or int seed for the probes and dichotomies.
        eigen_cutoff: absolute eigenvalue cut-off of the pseudo-inverses, in units of the mean squared
            point norm.
        max_iter: cap on the solver's batched iterations.
        return_anchors: keep the (n_t, P, N) anchors in the result.
        warn: emit ``NonSeparableWarning``/``SolverWarning`` for degenerate probes / non-convergence,
            and a ``GeomarkersWarning`` when the P M points far exceed 2 N (see below).
        num_threads: torch intra-op threads for the computation on CPU (restored afterwards); ``None``
            keeps torch's setting. The default 1 is the measured choice: the solver issues many small
            ops, which stall when threads are oversubscribed on a shared CPU (see docs/performance.md).

    Cost: the Gram is (P M)^2 and each solver iteration about n_t P M min(P M, 2 N); with P M far above 2 N
    (more than ``JOINT_POINTS_PER_FEATURE`` x N, and at least ``JOINT_WARN_MIN_POINTS`` points) generic
    points are not separable, the supports grow and the time with them: a warning then suggests fewer
    classes (``max_classes``), fewer points per class or the pairs protocol.

    Returns:
        :class:`GlueResult`. Computation runs in float64 on the manifolds' device.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.functional import glue
        >>> g = torch.Generator().manual_seed(0)
        >>> clouds = torch.randn(4, 1, 64, generator=g)  # 4 isolated points in 64 dimensions
        >>> res = glue(clouds, n_t=400, generator=0)
        >>> 1.6 < float(res.capacity) < 2.4 and float(res.dimension) == 0.0
        True
    """
    n_t = check_positive_int(n_t, "n_t", minimum=2)
    eigen_cutoff = check_eigen_cutoff(eigen_cutoff)
    if max_iter is not None:
        max_iter = check_positive_int(max_iter, "max_iter")
    points, mask = as_manifolds(manifolds)
    n_man, _, n_feat = points.shape
    gen = as_generator(generator)
    n_points = int(mask.sum())
    # Drawn probes enter only through X t and ||t||: drawn in the span of the points when it is smaller.
    in_span = probes is None and n_points <= n_feat
    t, y, g_t = _prepare_probes(probes, dichotomies, n_t, n_man, n_feat, gen, draw=not in_span)
    device = points.device
    if warn and n_points > JOINT_POINTS_PER_FEATURE * n_feat and n_points >= JOINT_WARN_MIN_POINTS:
        warnings.warn(
            f"GLUE: {n_man} manifolds with {n_points} points in total far exceed "
            f"{JOINT_POINTS_PER_FEATURE} x N = {JOINT_POINTS_PER_FEATURE * n_feat} (N = {n_feat} features): "
            "generic points are then not linearly separable and the solver's time and memory grow as "
            "(P M)^2 per probe. Use fewer classes (`max_classes`) or fewer points per class so that "
            f"P * M <= {JOINT_POINTS_PER_FEATURE * n_feat}, or the pairs protocol.",
            GeomarkersWarning,
            stacklevel=outside_stacklevel(),
        )
    with limit_threads(num_threads if device.type == "cpu" else None):
        pts = points.double()[None]
        shift = _safe_shift(_abs_peak(pts))  # only where squares could overflow or underflow
        out = _glue_groups(
            _times_pow2(pts, shift),
            mask[None],
            y.to(device)[None],
            probes=None if t is None else t.to(device)[None],
            generators=[g_t],
            eigen_cutoff=float(eigen_cutoff),
            max_iter=max_iter,
            return_anchors=return_anchors,
        )
    res = GlueResult(
        **{name: out[name][0] for name in GLUE_MARKERS},
        n_probes=y.shape[0],
        n_degenerate=int(out["n_degenerate"][0]),
        iterations=out["iterations"],
        kkt_violation=float(out["kkt_violation"][0]),
        converged=bool(out["converged"][0]),
        a=out["a"][0],
        b=out["b"][0],
        c=out["c"][0],
        active=out["active"][0],
        anchors=_times_pow2(out["anchors"][0], -shift) if return_anchors else None,
    )
    if warn:
        n_zero = int(((points == 0).all(-1) & mask).sum()) if res.n_degenerate else 0
        warn_diagnostics(res.n_degenerate, res.n_probes, res.converged, res.kkt_violation, n_zero=n_zero)
    return res
