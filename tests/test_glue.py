"""GLUE solver: agreement with the independent per-probe scipy reference, exact identities, ground
truths (isolated points, simulated capacity), invariances, determinism and input validation."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_geomarkers.errors import NonSeparableWarning
from lightning_geomarkers.functional import glue, glue_joint, glue_pairs, make_dichotomies, simulated_capacity
from lightning_geomarkers.functional.glue import GLUE_MARKERS, _normalised_gram
from lightning_geomarkers.testing import reference_glue
from tests.glue_helpers import engine_with_probes

MAIN = ("capacity", "dimension", "radius", "utility")


def gaussian_clouds(
    rng: np.random.Generator,
    P: int,
    M: int | list[int],
    N: int,
    *,
    radius: float,
    dim: int,
    aniso: float = 0.0,
) -> list[np.ndarray]:
    """P clouds: a random center (norm ~ 1) plus `radius`-scaled Gaussian points in a random `dim`-dim
    subspace; `aniso` > 0 makes the axis variances decay as exp(-aniso * j)."""
    sizes = [M] * P if isinstance(M, int) else M
    scales = np.exp(-aniso * np.arange(dim))
    out = []
    for m in sizes:
        center = rng.standard_normal(N) / math.sqrt(N)
        basis = np.linalg.qr(rng.standard_normal((N, dim)))[0].T  # (dim, N) orthonormal rows
        out.append(center + radius * (rng.standard_normal((m, dim)) * scales) @ basis / math.sqrt(dim))
    return out


def probes_and_dichotomies(
    rng: np.random.Generator, n_t: int, P: int, N: int
) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((n_t, N)), rng.choice([-1.0, 1.0], size=(n_t, P))


def assert_markers_close(ours, ref: dict, names=GLUE_MARKERS, rtol: float = 1e-4) -> None:
    for name in names:
        got, want = float(getattr(ours, name)), float(ref[name])
        assert got == pytest.approx(want, rel=rtol, abs=1e-12), f"{name}: {got} vs reference {want}"


CASES = [
    # P, M, N, radius, dim, aniso
    (2, 50, 512, 1.0, 20, 0.0),
    (2, 10, 64, 0.3, 5, 0.0),
    (8, 20, 64, 0.5, 8, 0.0),
    (8, 30, 256, 2.0, 30, 0.2),
    (10, 50, 512, 1.0, 50, 0.0),
    (10, 25, 128, 0.2, 10, 0.5),
]


@pytest.mark.parametrize("P,M,N,radius,dim,aniso", CASES)
def test_glue_matches_scipy_reference(P, M, N, radius, dim, aniso):
    rng = np.random.default_rng(P * 1000 + M + N)
    mans = gaussian_clouds(rng, P, M, N, radius=radius, dim=dim, aniso=aniso)
    t, y = probes_and_dichotomies(rng, 60, P, N)
    ref = reference_glue(mans, t, y)
    res = glue(
        [torch.from_numpy(m) for m in mans],
        probes=torch.from_numpy(t),
        dichotomies=torch.from_numpy(y),
        return_anchors=True,
    )
    assert res.converged and res.kkt_violation < 1e-9
    assert res.n_degenerate == 0
    assert_markers_close(res, ref)
    np.testing.assert_allclose(res.a.numpy(), ref["a"], rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(res.active.numpy(), ref["active"])
    np.testing.assert_allclose(res.anchors.numpy(), ref["anchors"], atol=1e-7)


def test_unequal_manifold_sizes_match_reference():
    rng = np.random.default_rng(3)
    mans = gaussian_clouds(rng, 5, [3, 17, 40, 1, 25], 96, radius=0.8, dim=6)
    t, y = probes_and_dichotomies(rng, 50, 5, 96)
    ref = reference_glue(mans, t, y)
    res = glue(
        [torch.from_numpy(m) for m in mans], probes=torch.from_numpy(t), dichotomies=torch.from_numpy(y)
    )
    assert_markers_close(res, ref)


@pytest.mark.parametrize("N", [80, 24])
def test_batched_engine_with_padding_matches_reference_per_group(N):
    """The engine behind the pairs protocol solves several padded problem groups in one batch; with
    N = 24 the first two groups have more than 2 N points, so the solver's products go through the
    (padded) points instead of the Gram."""
    rng = np.random.default_rng(11)
    sizes = [(12, 30), (30, 5), (7, 7)]
    n_t = 40
    points = torch.zeros(len(sizes), 2, 30, N, dtype=torch.float64)
    mask = torch.zeros(len(sizes), 2, 30, dtype=torch.bool)
    groups, probes, labels = [], [], []
    for g, (m1, m2) in enumerate(sizes):
        mans = gaussian_clouds(rng, 2, [m1, m2], N, radius=0.7, dim=4)
        for side, m in enumerate(mans):
            points[g, side, : len(m)] = torch.from_numpy(m)
            mask[g, side, : len(m)] = True
        t, y = probes_and_dichotomies(rng, n_t, 2, N)
        groups.append(mans)
        probes.append(torch.from_numpy(t))
        labels.append(torch.from_numpy(y))
    out = engine_with_probes(
        points,
        mask,
        torch.stack(labels),
        torch.stack(probes),
    )
    for g, mans in enumerate(groups):
        ref = reference_glue(mans, probes[g].numpy(), labels[g].numpy())
        for name in GLUE_MARKERS:
            assert float(out[name][g]) == pytest.approx(ref[name], rel=1e-4), (g, name)


def test_projection_norm_and_exact_identity():
    rng = np.random.default_rng(5)
    mans = gaussian_clouds(rng, 6, 20, 128, radius=1.0, dim=10)
    t, y = probes_and_dichotomies(rng, 80, 6, 128)
    ref = reference_glue(mans, t, y)
    res = glue(torch.from_numpy(np.stack(mans)), probes=torch.from_numpy(t), dichotomies=torch.from_numpy(y))
    # a = ||projection of t on the cone K||^2, the cone projection computed independently by scipy NNLS.
    np.testing.assert_allclose(res.a.numpy(), ref["proj_norm2"], rtol=1e-8)
    # alpha = Psi (1 + R^-2) / D
    cap, psi, rad, dim = (float(getattr(res, k)) for k in ("capacity", "utility", "radius", "dimension"))
    assert cap == pytest.approx(psi * (1 + rad**-2) / dim, rel=1e-10)
    assert 0.0 <= psi <= 1.0


@pytest.mark.parametrize("P,N", [(20, 400), (40, 800)])
def test_isolated_points_have_capacity_two(P, N):
    """Cover: P random points in general position, P/N small -> capacity 2, no dimension, no radius."""
    pts = torch.randn(P, 1, N, generator=torch.Generator().manual_seed(P), dtype=torch.float64)
    res = glue(pts, n_t=1000, generator=1)
    assert float(res.capacity) == pytest.approx(2.0, rel=0.05)
    assert float(res.dimension) == 0.0
    assert float(res.radius) == 0.0
    assert float(res.utility) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("P,M,N,radius,dim", [(16, 10, 200, 0.5, 5), (24, 5, 150, 1.5, 3)])
def test_capacity_agrees_with_simulated_capacity(P, M, N, radius, dim):
    rng = np.random.default_rng(P + M)
    mans = torch.from_numpy(np.stack(gaussian_clouds(rng, P, M, N, radius=radius, dim=dim)))
    res = glue(mans, n_t=500, generator=0)
    sim = simulated_capacity(mans, n_trials=80, generator=1)
    alpha_sim = P / sim.n_crit_interpolated
    assert float(res.capacity) == pytest.approx(alpha_sim, rel=0.10)
    # The integer-grid definition (smallest n with p >= 0.5) is within one grid step of it.
    assert P / sim.n_crit <= alpha_sim * (1 + 1e-12)
    assert P / sim.n_crit >= P / (sim.n_crit_interpolated + 1)


def test_simulated_capacity_of_points_follows_cover():
    pts = torch.randn(24, 1, 80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sim = simulated_capacity(pts, n_trials=60, generator=3)
    # Cover: P points in general position are separable in n dims w.p. >= 1/2 iff n >= P/2.
    assert sim.n_crit == pytest.approx(12, abs=2)
    assert np.all(np.diff(sim.probability) >= 0)


def _random_rotation(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q * torch.sign(torch.diagonal(r))


def _setup(seed=7, P=6, M=15, N=48):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.stack(gaussian_clouds(rng, P, M, N, radius=1.0, dim=6)))
    t, y = probes_and_dichotomies(rng, 50, P, N)
    return x, torch.from_numpy(t), torch.from_numpy(y)


def _markers(res) -> np.ndarray:
    return np.array([float(getattr(res, k)) for k in GLUE_MARKERS])


def test_rotation_invariance():
    x, t, y = _setup()
    rot = _random_rotation(x.shape[-1], 0)
    base = glue(x, probes=t, dichotomies=y)
    rotated = glue(x @ rot, probes=t @ rot, dichotomies=y)
    np.testing.assert_allclose(_markers(base), _markers(rotated), rtol=1e-8)


def test_class_and_point_permutation_invariance():
    x, t, y = _setup()
    base = glue(x, probes=t, dichotomies=y)
    perm_c = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    perm_p = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(2))
    permuted = glue(x[perm_c][:, perm_p], probes=t, dichotomies=y[:, perm_c])
    np.testing.assert_allclose(_markers(base), _markers(permuted), rtol=1e-8)


@pytest.mark.parametrize("scale", [1e-6, 3.0, 1e5])
def test_global_scaling_invariance(scale):
    x, t, y = _setup()
    base = glue(x, probes=t, dichotomies=y)
    scaled = glue(x * scale, probes=t, dichotomies=y)
    np.testing.assert_allclose(_markers(base), _markers(scaled), rtol=1e-7)


def test_float32_and_float64_inputs_agree():
    x, t, y = _setup()
    r32 = glue(x.float(), probes=t.float(), dichotomies=y)
    r64 = glue(x.float().double(), probes=t.float().double(), dichotomies=y)
    np.testing.assert_allclose(_markers(r32), _markers(r64), rtol=1e-10)
    r64_orig = glue(x, probes=t, dichotomies=y)
    np.testing.assert_allclose(_markers(r32), _markers(r64_orig), rtol=1e-4)


def test_results_are_ordinary_tensors_though_computed_in_inference_mode():
    """The engine runs under ``torch.inference_mode`` for speed; what it returns must still behave as
    ordinary tensors (in-place edits, autograd-free use), for inputs with and without ``requires_grad``,
    and the anchors must still be the multipliers' weighted means of the points (checked directly)."""
    x, t, y = _setup()
    res = glue(x.clone().requires_grad_(True), probes=t, dichotomies=y, return_anchors=True)
    fields = [getattr(res, name) for name in (*GLUE_MARKERS, "a", "b", "c", "active", "anchors")]
    for value in fields:
        assert not value.is_inference() and not value.requires_grad
    res.capacity.add_(1.0)  # raises on an inference tensor outside inference mode
    res.anchors.mul_(1.0)
    # Anchors from the reference's multipliers: s = sum_i lambda_i x_i / sum_i lambda_i per manifold.
    ref = reference_glue(list(x.numpy()), t.numpy(), y.numpy())
    np.testing.assert_allclose(res.anchors.numpy(), ref["anchors"], atol=1e-7)
    pairs = glue_pairs(
        x.reshape(-1, x.shape[-1]),
        torch.arange(x.shape[0]).repeat_interleave(x.shape[1]),
        n_t=20,
        generator=0,
    )
    for value in (pairs.capacity, *pairs.per_pair.values(), *pairs.std.values()):
        assert not value.is_inference()
        value.add_(0.0)


def test_reproducible_with_fixed_generator():
    x, _, _ = _setup()
    a = glue(x, n_t=40, generator=123)
    b = glue(x, n_t=40, generator=torch.Generator().manual_seed(123))
    c = glue(x, n_t=40, generator=124)
    np.testing.assert_array_equal(_markers(a), _markers(b))
    assert not np.array_equal(_markers(a), _markers(c))


def test_dichotomy_ensembles():
    g = torch.Generator().manual_seed(0)
    bal = make_dichotomies("balanced", 100, 6, g)
    assert torch.all(bal.sum(1) == 0)
    bal_odd = make_dichotomies("balanced", 400, 5, g)
    assert set(bal_odd.sum(1).abs().tolist()) == {1.0}
    assert abs(float((bal_odd.sum(1) > 0).float().mean()) - 0.5) < 0.1
    ovr = make_dichotomies("one_vs_rest", 12, 4, g)
    assert torch.all((ovr == 1).sum(1) == 1)
    assert torch.all((ovr == 1).sum(0) == 3)  # cycles through every class
    rnd = make_dichotomies("random", 2000, 3, g)
    assert set(rnd.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(rnd.mean())) < 0.05
    # With P = 2 the balanced and one-vs-rest ensembles coincide up to sign: both are {(+,-), (-,+)}.
    for kind in ("balanced", "one_vs_rest"):
        d = make_dichotomies(kind, 50, 2, g)
        assert torch.all(d[:, 0] == -d[:, 1])


def test_explicit_integer_dichotomies_accepted():
    x, t, y = _setup()
    base = glue(x, probes=t, dichotomies=y)
    as_int = glue(x, probes=t, dichotomies=y.to(torch.int64))
    np.testing.assert_array_equal(_markers(base), _markers(as_int))


def test_non_separable_data_is_counted_and_warned():
    rng = np.random.default_rng(0)
    mans = np.stack(gaussian_clouds(rng, 4, 40, 10, radius=3.0, dim=10))  # 160 points in 10 dims
    with pytest.warns(NonSeparableWarning, match="not linearly separable"):
        res = glue(torch.from_numpy(mans), n_t=50, generator=0)
    assert res.n_degenerate > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = glue(torch.from_numpy(mans), n_t=50, generator=0, warn=False)
    assert quiet.n_degenerate == res.n_degenerate


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(1, 5, 8), "at least 2 manifolds"),
        (torch.randn(5, 8), r"shape \(P, M, N\)"),
        (torch.full((2, 3, 4), float("nan")), "NaN/Inf"),
        ([torch.randn(3, 4), torch.randn(3, 5)], "feature dimension"),
        ([torch.randn(3, 4), torch.randn(0, 4)], "Manifold 1 has 0 point"),
        ("abc", "must be a"),
        (torch.zeros(3, 2, 4), "All points of a manifold set are zero"),
    ],
)
def test_bad_manifolds_raise_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        glue(bad, n_t=5)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(3, 4, 10)
    with pytest.raises(ValueError, match="Unknown dichotomies"):
        glue(x, dichotomies="pairs")
    with pytest.raises(ValueError, match=r"shape \(n_t, P\)"):
        glue(x, dichotomies=torch.ones(5, 4))
    with pytest.raises(ValueError, match=r"only \+1 and -1"):
        glue(x, dichotomies=torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"`probes` must have shape"):
        glue(x, probes=torch.randn(5, 11))
    with pytest.raises(ValueError, match="rows but there are"):
        glue(x, probes=torch.randn(5, 10), dichotomies=torch.ones(6, 3))
    with pytest.raises(ValueError, match="n_t"):
        glue(x, n_t=0)
    with pytest.raises(TypeError, match="generator"):
        glue(x, generator="seed")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    P=st.integers(1, 5),
    M=st.integers(0, 6),
    N=st.integers(1, 12),
    scale=st.sampled_from([0.0, 1e-12, 1.0, 1e8]),
    dup=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_odd_input_raises_clearly_or_returns_finite(P, M, N, scale, dup, seed):
    x = torch.randn(P, M, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if dup and M > 1:
        x[:, 1:] = x[:, :1]  # duplicated points: singular Gram blocks
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = glue(x, n_t=8, generator=seed)
    except (ValueError, TypeError) as err:
        assert str(err)
        return
    for name in MAIN:
        assert math.isfinite(float(getattr(res, name))), name
    assert res.kkt_violation < 1e-6


# ------------------------------------------------------------------------------------------------ protocols


def labelled_features(n_classes=5, per_class=40, N=64, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(n_classes, N, generator=g, dtype=torch.float64)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = means[y] + spread * torch.randn(len(y), N, generator=g, dtype=torch.float64)
    return x, y


def test_pairs_protocol_uses_all_pairs_and_is_deterministic():
    x, y = labelled_features()
    res = glue_pairs(x, y, points_per_class=20, n_pairs=None, n_t=30, generator=0)
    assert res.pairs.shape == (10, 2)
    assert {tuple(p) for p in res.pairs.tolist()} == {(i, j) for i in range(5) for j in range(i + 1, 5)}
    again = glue_pairs(x, y, points_per_class=20, n_pairs=None, n_t=30, generator=0)
    for name in GLUE_MARKERS:
        assert float(getattr(res, name)) == float(getattr(again, name))
        per = res.per_pair[name]
        assert float(getattr(res, name)) == pytest.approx(float(per.mean()), rel=1e-12)
        assert float(res.std[name]) == pytest.approx(float(per.std(unbiased=False)), rel=1e-12, abs=1e-15)
    assert res.n_probes == 300 and res.converged


def _replayed_span_probes(points: torch.Tensor, g_t: torch.Generator, n_t: int, n_feat: int):
    """Explicit N-dimensional probes t with exactly the X t and ||t|| that ``_span_probes`` draws from
    ``g_t`` for the (T, N) ``points`` (one group, no padding), built independently of it: t is the
    least-squares preimage of h (numpy lstsq) plus an orthogonal part (numpy SVD) of the drawn norm."""
    from lightning_geomarkers.functional.glue import _normalised_gram, _padded_cholesky, _span_probes

    pts = points[None, :, None, :].transpose(1, 2)  # (1, 1, T, N): one manifold of all points
    mask = torch.ones(pts.shape[:3], dtype=torch.bool)
    gram, scale = _normalised_gram(pts, mask)
    h, t_norm = _span_probes(gram, mask, _padded_cholesky(gram, mask), n_feat, n_t, [g_t])
    x_n = (points / scale).numpy()
    row_part = np.linalg.lstsq(x_n, h.numpy().T, rcond=None)[0].T  # (n_t, N), in the row space
    _, _, vt = np.linalg.svd(x_n)
    perp = vt[np.linalg.matrix_rank(x_n) :][0]  # a unit vector orthogonal to every point
    extra = t_norm.numpy() ** 2 - (row_part**2).sum(1)
    assert (extra >= 0).all()  # ||t||^2 = ||z||^2 + chi^2 >= ||t_row||^2 = ||z||^2
    t = row_part + np.sqrt(extra)[:, None] * perp
    np.testing.assert_allclose(x_n @ t.T, h.numpy().T, rtol=1e-9, atol=1e-9)
    return t


def test_pairs_protocol_matches_reference_when_every_point_is_used():
    """One pair with points_per_class >= class size uses every point: compare to the reference on the
    same points (point order does not matter) with probes that give the same X t and ||t|| as the ones
    glue_pairs drew (in the span of the points) from the same seed."""
    x, y = labelled_features(n_classes=2, per_class=15, N=40, seed=4)
    res = glue_pairs(x, y, points_per_class=50, n_t=25, generator=9)
    # glue_pairs draws the point subsample before the probes from the same generator; redo the draws.
    g = torch.Generator().manual_seed(9)
    order = [torch.nonzero(y == c).squeeze(1)[torch.randperm(15, generator=g)] for c in (0, 1)]
    from lightning_geomarkers.functional.glue import _prepare_probes

    t0, d, g_t = _prepare_probes(None, "random", 25, 2, 40, g, draw=False)
    assert t0 is None
    t = _replayed_span_probes(x[torch.cat(order)], g_t, 25, 40)
    ref = reference_glue([x[y == 0].numpy(), x[y == 1].numpy()], t, d.numpy())
    assert_markers_close(res, ref)
    # The replayed draws are the ones glue_pairs used: glue() given them explicitly agrees too, while
    # glue() drawing its own probes from another seed does not (so the replay is what makes them agree).
    replayed = glue([x[y == 0], x[y == 1]], probes=torch.from_numpy(t), dichotomies=d)
    assert_markers_close(replayed, ref)
    own_draws = glue([x[y == 0], x[y == 1]], n_t=25, generator=10)
    assert not torch.equal(own_draws.a, replayed.a)


def test_pairs_protocol_with_more_points_than_features_draws_full_probes():
    """With 2 M > N the pairs protocol draws N-dimensional probes: replaying the draws and giving the
    reference the same points and probes reproduces the markers."""
    x, y = labelled_features(n_classes=2, per_class=15, N=24, seed=5)
    res = glue_pairs(x, y, points_per_class=50, n_t=25, generator=3, warn=False)
    g = torch.Generator().manual_seed(3)
    torch.randperm(15, generator=g), torch.randperm(15, generator=g)
    from lightning_geomarkers.functional.glue import _prepare_probes

    t, d, _ = _prepare_probes(None, "random", 25, 2, 24, g, draw=True)
    assert t is not None
    ref = reference_glue([x[y == 0].numpy(), x[y == 1].numpy()], t.numpy(), d.numpy())
    assert_markers_close(res, ref)


def test_span_probes_have_the_law_of_gaussian_probes():
    """h = X t and ||t||^2 for t ~ N(0, I_N), drawn in the span of the points: E[h h^T] = K (the
    normalised Gram), E||t||^2 = N and Var ||t||^2 = 2 N, E[h_i ||t||^2] = 0, checked on 40,000 draws
    against these closed forms; also for dependent points and padding on the eigendecomposition path."""
    from lightning_geomarkers.functional.glue import _normalised_gram, _padded_cholesky, _span_probes

    g = torch.Generator().manual_seed(0)
    n_feat, n_t = 30, 40_000
    base = torch.randn(2, 6, n_feat, generator=g, dtype=torch.float64)
    dependent = base.clone()
    dependent[1, 4] = dependent[0, 0] + dependent[1, 0]  # a point in the span of two others
    dependent[1, 5] = 0.0  # and a padding row
    for pts, pad in ((base, False), (dependent, True)):
        mask = torch.ones(pts.shape[:2], dtype=torch.bool)
        if pad:
            mask[1, 5] = False
        gram, _ = _normalised_gram(pts[None], mask[None])
        factor = _padded_cholesky(gram, mask[None])
        if pad:  # take the eigendecomposition path (the one for groups whose Cholesky factor fails)
            factor = (factor[0], torch.ones_like(factor[1]))
        h, t_norm = _span_probes(gram, mask[None], factor, n_feat, n_t, [torch.Generator().manual_seed(1)])
        cov = h.T @ h / n_t
        k = gram[0]
        assert torch.allclose(cov, k, atol=0.05 * float(k.diagonal().max()))
        sq = t_norm.square()
        assert float(sq.mean()) == pytest.approx(n_feat, rel=0.02)
        assert float(sq.var()) == pytest.approx(2 * n_feat, rel=0.05)
        corr = (h * (sq - n_feat)[:, None]).mean(0) / (k.diagonal().sqrt() * math.sqrt(2 * n_feat)).clamp_min(
            1e-12
        )
        assert float(corr.abs().max()) < 0.03
        if pad:
            assert bool((h[:, 11] == 0).all())  # padding rows get h = 0


def test_span_probes_of_dependent_points_do_not_depend_on_the_eigenvector_signs(monkeypatch):
    """Dependent points take the eigendecomposition path, whose eigenvector signs are the solver's choice
    (LAPACK and cuSOLVER need not agree): the probes there come from the symmetric square root of the
    Gram, so flipping the signs changes nothing (with L = U sqrt(mu) the markers moved by up to 4%)."""
    from lightning_geomarkers.functional.glue import _normalised_gram, _padded_cholesky, _span_probes

    g = torch.Generator().manual_seed(0)
    pts = torch.randn(1, 2, 6, 30, generator=g, dtype=torch.float64)
    pts[0, 1, 4] = pts[0, 0, 0] + pts[0, 1, 0]  # a point in the span of two others
    mask = torch.ones(pts.shape[1:3], dtype=torch.bool)[None]
    gram, _ = _normalised_gram(pts, mask)
    factor = _padded_cholesky(gram, mask)

    def draw():
        return _span_probes(gram, mask, factor, 30, 50, [torch.Generator().manual_seed(1)])

    h, t_norm = draw()
    eigh = torch.linalg.eigh

    def flipped(a):
        evals, evecs = eigh(a)
        signs = torch.tensor([(-1.0) ** j for j in range(evecs.shape[-1])], dtype=evecs.dtype)
        return evals, evecs * signs

    monkeypatch.setattr(torch.linalg, "eigh", flipped)
    h_flipped, t_norm_flipped = draw()
    assert torch.allclose(h_flipped, h, rtol=0, atol=1e-12) and torch.equal(t_norm_flipped, t_norm)


def test_span_probes_give_the_markers_of_full_probes():
    """Drawn in the span or in N dimensions, the probes give the same markers in expectation: glue()
    with drawn probes (span path) against glue() given N-dimensional Gaussian probes, 2,000 probes each,
    within 4 standard errors of the difference of the per-probe means of a, b and c."""
    mans = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mans += 2 * torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    span = glue(mans, n_t=2000, generator=5)
    probes = torch.randn(2000, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    full = glue(mans, probes=probes, dichotomies=make_dichotomies("random", 2000, 3, 7))
    for q in ("a", "b", "c"):
        u, v = getattr(span, q), getattr(full, q)
        se = math.sqrt(float(u.var()) / u.numel() + float(v.var()) / v.numel())
        assert abs(float(u.mean()) - float(v.mean())) < 4 * se, q


def test_pairs_protocol_subsets_and_errors():
    x, y = labelled_features(n_classes=6)
    res = glue_pairs(x, y, points_per_class=10, n_pairs=4, n_t=10, generator=1)
    assert res.pairs.shape == (4, 2) and len({tuple(p) for p in res.pairs.tolist()}) == 4
    sub = glue_pairs(x, y, points_per_class=10, n_pairs=None, max_classes=3, n_t=10, generator=1)
    assert sub.pairs.shape == (3, 2) and len(set(sub.pairs.flatten().tolist())) == 3
    with pytest.raises(ValueError, match="at least 2 classes"):
        glue_pairs(x[y == 0], y[y == 0])
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        glue_pairs(torch.cat([x, x[:1]]), torch.cat([y, torch.tensor([9])]))
    with pytest.raises(ValueError, match="rows but `labels` has"):
        glue_pairs(x, y[:-1])


def test_joint_protocol():
    x, y = labelled_features(n_classes=4, per_class=30, N=128)
    res = glue_joint(x, y, points_per_class=20, n_t=40, generator=0)
    assert res.active.shape == (40, 4)
    sub = glue_joint(x, y, points_per_class=20, max_classes=3, n_t=40, generator=0)
    assert sub.active.shape == (40, 3)
    assert float(res.capacity) > 0 and float(sub.capacity) > 0


def test_separability_test_agrees_with_linear_programming():
    """The LDP/NNLS separability test against an LP feasibility check (scipy HiGHS) on each dichotomy."""
    from lightning_geomarkers.functional._nnls import separable_dichotomies
    from lightning_geomarkers.functional.simulated_capacity import _separable

    rng = np.random.default_rng(0)
    agree, seen_both = 0, set()
    for trial in range(30):
        P, M, N = 2 + trial % 3, 4 + trial % 5, 2 + trial % 4
        x = torch.from_numpy(rng.standard_normal((P, M, N)) + rng.standard_normal((P, 1, N)))
        mask = torch.ones(P, M, dtype=torch.bool)
        flat = x.reshape(1, P * M, N) / _normalised_gram(x[None], mask[None])[1]
        y = torch.from_numpy(rng.choice([-1.0, 1.0], size=(6, P)))
        sigma = y.repeat_interleave(M, dim=1)
        got = separable_dichotomies(flat @ flat.transpose(1, 2), torch.zeros(6, dtype=torch.long), sigma)
        for k in range(6):
            want = _separable((sigma[k][:, None] * flat[0]).numpy())
            assert bool(got[k]) == want, (trial, k)
            agree += 1
            seen_both.add(want)
    assert agree == 180 and seen_both == {True, False}


@pytest.mark.parametrize("n_points,N", [(6, 10), (12, 4)])  # independent points / more points than dims
def test_probe_separability_with_independence_shortcut_agrees_with_lp(n_points, N):
    from lightning_geomarkers.functional.glue import _separable_probes
    from lightning_geomarkers.functional.simulated_capacity import _separable

    rng = np.random.default_rng(n_points)
    P, M = 3, n_points // 3
    x = torch.from_numpy(rng.standard_normal((1, P, M, N)) + rng.standard_normal((1, P, 1, N)))
    mask = torch.ones(1, P, M, dtype=torch.bool)
    flat = x.reshape(1, P * M, N) / _normalised_gram(x, mask)[1]
    y = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, 16, P)))
    got = _separable_probes(flat @ flat.transpose(1, 2), mask, y)
    want = [_separable((y[0, k].repeat_interleave(M)[:, None] * flat[0]).numpy()) for k in range(16)]
    assert got.tolist() == want
    assert all(want) == (n_points <= N)


def test_make_dichotomies_accepts_an_int_seed():
    a = make_dichotomies("random", 20, 4, 7)
    b = make_dichotomies("random", 20, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_the_scipy_reference_follows_the_documented_edge_conventions():
    """The reference the solver is tested against follows docs/markers.md 3.7, 4.3 and 4.4 by itself (no
    code shared): point manifolds and axis parts below the cut-off give D = R = Psi = 0 and NaN axis
    alignments at any scale (it gave radius NaN and round-off alignments, e.g. 0.21 at scale 1e4),
    and Psi = 0 when E[a] = 0 (it gave NaN)."""
    rng = np.random.default_rng(0)
    n_man, n_feat, n_t = 3, 20, 50
    t = rng.standard_normal((n_t, n_feat))
    y = rng.choice([-1.0, 1.0], size=(n_t, n_man))
    points = rng.standard_normal((n_man, 1, n_feat))
    centers = rng.standard_normal((n_man, n_feat))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    step = 1e-6 * rng.standard_normal((n_man, n_feat))  # squared extent ~2e-11, below the 1e-9 cut-off
    tiny_segments = [np.stack([c + u, c - u]) for c, u in zip(centers, step, strict=True)]
    for mans in (list(points), list(1e4 * points), tiny_segments):
        ref = reference_glue(mans, t, y)
        assert (ref["dimension"], ref["radius"], ref["utility"]) == (0.0, 0.0, 0.0)
        assert math.isnan(ref["axis_alignment"]) and math.isnan(ref["center_axis_alignment"])
        assert 0 <= ref["center_alignment"] <= 1 and ref["capacity"] > 0
    ref = reference_glue(list(points), np.zeros((5, n_feat)), y[:5])
    assert ref["utility"] == 0.0 and ref["capacity"] == math.inf


def test_simulated_capacity_does_not_depend_on_the_scale():
    """Strict separability does not change with the scale, but the rows' norms overflowed at 1e160 (every
    trial 'not separable': a wrong capacity with the advice to use fewer points) and the LP failed at
    1e-170 (HiGHS 'Model error')."""
    from lightning_geomarkers.functional import simulated_capacity

    pts = torch.randn(10, 1, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = simulated_capacity(pts, n_trials=30, generator=0)
    for scale in (1e-170, 1e160):
        other = simulated_capacity(pts * scale, n_trials=30, generator=0)
        assert other.capacity == base.capacity and np.array_equal(other.critical_dims, base.critical_dims)


def test_the_degenerate_warning_names_exactly_zero_points():
    """An all-zero point (a dead-ReLU sample without centring) cannot be separated strictly by a
    hyperplane through the origin, so dichotomies count as degenerate: the warning used to advise fewer
    points or a wider layer; it names the zero points and the fix now."""
    import warnings

    from lightning_geomarkers.errors import NonSeparableWarning

    g = torch.Generator().manual_seed(3)
    pts = 2 * torch.randn(2, 1, 20, generator=g, dtype=torch.float64) + torch.randn(
        2, 5, 20, generator=g, dtype=torch.float64
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert glue(pts, n_t=30, generator=0).n_degenerate == 0
    pts[0, 2] = 0
    with pytest.warns(NonSeparableWarning, match=r"1 point\(s\) are exactly zero .* Drop all-zero rows"):
        # Every dichotomy holds the zero point: none is strictly separable. The probes' own solutions
        # had certified 17 of the 30 (round-off of X t on the zero point), so only 13 were counted.
        assert glue(pts, n_t=30, generator=0).n_degenerate == 30
    y = torch.arange(2).repeat_interleave(5)
    with pytest.warns(NonSeparableWarning, match=r"pairs protocol.*1 point\(s\) are exactly zero"):
        glue_pairs(pts.reshape(10, 20), y, n_t=30, generator=0)


@pytest.mark.parametrize(
    ("scale", "match"),
    [(0.0, "rows .* are zero"), (1e160, "too large or too small"), (1e-170, "too large or too small")],
)
def test_explicit_probes_without_a_usable_norm_are_refused(scale, match):
    """All-zero probes gave capacity inf, dimension 0 and utility 0 without a word, and probes of 1e160
    the same through overflow."""
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    t = torch.randn(10, 8, generator=g, dtype=torch.float64) * scale
    with pytest.raises(ValueError, match=match):
        glue(pts, probes=t)


def test_glue_warnings_point_at_the_callers_line():
    """They pointed at protocols.py (and, under the default filter, showed once per process there)."""
    import warnings

    from lightning_geomarkers.errors import NonSeparableWarning
    from lightning_geomarkers.functional import glue_joint

    g = torch.Generator().manual_seed(3)
    pts = torch.randn(2, 5, 20, generator=g, dtype=torch.float64)
    pts[0, 2] = 0  # a zero point: every dichotomy is degenerate
    y = torch.arange(2).repeat_interleave(5)
    for call in (
        lambda: glue(pts, n_t=20, generator=0),
        lambda: glue_pairs(pts.reshape(10, 20), y, n_t=20, generator=0),
        lambda: glue_joint(pts.reshape(10, 20), y, n_t=20, generator=0),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        (said,) = [w for w in caught if issubclass(w.category, NonSeparableWarning)]
        assert said.filename == __file__, said.filename


def test_warnings_point_at_a_user_script_in_a_folder_named_like_the_package(tmp_path):
    """The package's frames were recognised by the substring 'lightning_geomarkers/' anywhere in a path,
    so a user script under such a folder (a checkout named after it) was taken for package code."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "lightning_geomarkers"
    folder.mkdir()
    script = folder / "run.py"
    script.write_text(
        "import warnings, torch\n"
        "from lightning_geomarkers.functional import glue\n"
        "pts = torch.randn(2, 5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))\n"
        "pts[0, 2] = 0\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    glue(pts, n_t=20, generator=0)\n"
        "print([w.filename for w in caught][-1])\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(script)
