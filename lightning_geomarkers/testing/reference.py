"""A straightforward per-probe GLUE written directly from the spec with numpy and scipy.

It shares no code with the torch solver: one ``scipy.optimize.nnls`` call per probe, plain loops, numpy
pseudo-inverses. It is the independent reference the tests compare against and the baseline the
benchmark times.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import nnls


def _pinv_quad(gram: np.ndarray, vec: np.ndarray, cutoff: float) -> float:
    evals, evecs = np.linalg.eigh(gram)
    keep = evals > cutoff
    proj = evecs.T @ vec
    return float(np.sum(proj[keep] ** 2 / evals[keep]))


def _kept_part(gram: np.ndarray, vec: np.ndarray, cutoff: float) -> np.ndarray:
    """``vec`` projected on the eigen-directions of ``gram`` above the cut-off (docs/markers.md 4.3: c
    sees only the axis directions that b keeps)."""
    evals, evecs = np.linalg.eigh(gram)
    kept = evecs[:, evals > cutoff]
    return kept @ (kept.T @ vec)


def _abs_cos(u: np.ndarray, v: np.ndarray, cutoff: float) -> float | None:
    """|cos(u, v)|, or None where a vector's squared norm is at or below the cut-off (no direction,
    docs/markers.md 3.7)."""
    uu, vv = float(u @ u), float(v @ v)
    if uu <= cutoff or vv <= cutoff:
        return None
    return abs(float(u @ v)) / math.sqrt(uu * vv)


def reference_glue(
    manifolds: list[np.ndarray],
    probes: np.ndarray,
    dichotomies: np.ndarray,
    *,
    eigen_cutoff: float = 1e-9,
) -> dict:
    """GLUE markers of ``manifolds`` (list of (M_mu, N) arrays) for explicit probes (n_t, N) and
    dichotomies (n_t, P). The eigenvalue cut-off is ``eigen_cutoff`` times the mean squared point norm.

    Returns a dict with the seven markers, per-probe ``a``, ``b``, ``c``, ``proj_norm2`` (||cone
    projection||^2 from the NNLS residual), ``anchors`` (n_t, P, N) and ``active`` (n_t, P).
    """
    mans = [np.asarray(m, dtype=np.float64) for m in manifolds]
    n_man = len(mans)
    n_t, n_feat = probes.shape
    all_pts = np.concatenate(mans, axis=0)
    cutoff = eigen_cutoff * float(np.mean(np.sum(all_pts**2, axis=1)))
    owner = np.concatenate([np.full(len(m), i) for i, m in enumerate(mans)])

    anchors = np.zeros((n_t, n_man, n_feat))
    active = np.zeros((n_t, n_man), dtype=bool)
    proj_norm2 = np.zeros(n_t)
    # scipy's NNLS tests optimality with tolerances absolute in the columns' units, so one point far larger
    # than the others (an outlier 1e3 x the typical norm) stops it early: anchors 24% off, measured. It is
    # solved on unit-norm columns instead (the same cone: lambda_i = unit_i / ||x_i||; zero points never
    # enter the support).
    norms = np.linalg.norm(all_pts, axis=1)
    col_scale = np.where(norms > 0, norms, 1.0)
    for k in range(n_t):
        signs = dichotomies[k][owner]
        g = signs[:, None] * all_pts
        unit, _ = nnls((g / col_scale[:, None]).T, probes[k], maxiter=50 * g.shape[0])
        lam = unit / col_scale
        proj_norm2[k] = float(np.sum((g.T @ lam) ** 2))
        for mu in range(n_man):
            w = lam[owner == mu]
            if w.sum() > 0:
                active[k, mu] = True
                anchors[k, mu] = w @ mans[mu] / w.sum()

    centers = np.zeros((n_man, n_feat))
    for mu in range(n_man):
        if active[:, mu].any():
            centers[mu] = anchors[active[:, mu], mu].mean(axis=0)

    a, b, c = np.zeros(n_t), np.zeros(n_t), np.zeros(n_t)
    for k in range(n_t):
        idx = np.flatnonzero(active[k])
        s = dichotomies[k][idx, None] * anchors[k, idx]
        s0 = dichotomies[k][idx, None] * centers[idx]
        s1 = s - s0
        t = probes[k]
        a[k] = _pinv_quad(s @ s.T, s @ t, cutoff)
        b[k] = _pinv_quad(s1 @ s1.T, s1 @ t, cutoff)
        c[k] = _pinv_quad(s0 @ s0.T + s1 @ s1.T, _kept_part(s1 @ s1.T, s1 @ t, cutoff), cutoff)

    ea, eb, ec = a.mean(), b.mean(), c.mean()
    out = {
        "capacity": n_man / ea,
        "dimension": eb / n_man,
        # docs/markers.md 4.4: R = 0 when E[c] = 0, infinite when E[c] > 0 = E[b - c]; Psi = 0 when E[a] = 0
        "radius": (math.sqrt(ec / (eb - ec)) if eb > ec else math.inf) if ec > 0 else 0.0,
        "utility": ec / ea if ea > 0 else 0.0,
    }
    pairs = [(m, n) for m in range(n_man) for n in range(n_man) if m != n]
    cen = [_abs_cos(centers[m], centers[n], cutoff) for m, n in pairs]
    out["center_alignment"] = float(np.mean([x for x in cen if x is not None]))
    axis_means, ca_means = [], []
    for m, n in pairs:
        ax, ca = [], []
        for k in range(n_t):
            if active[k, m] and active[k, n]:
                v = _abs_cos(anchors[k, m] - centers[m], anchors[k, n] - centers[n], cutoff)
                if v is not None:
                    ax.append(v)
                v = _abs_cos(centers[m], anchors[k, n] - centers[n], cutoff)
                if v is not None:
                    ca.append(v)
        if ax:
            axis_means.append(np.mean(ax))
        if ca:
            ca_means.append(np.mean(ca))
    out["axis_alignment"] = float(np.mean(axis_means)) if axis_means else float("nan")
    out["center_axis_alignment"] = float(np.mean(ca_means)) if ca_means else float("nan")
    out.update(a=a, b=b, c=c, proj_norm2=proj_norm2, anchors=anchors, active=active)
    return out
