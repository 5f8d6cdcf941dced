"""Tests of the non-GLUE geometry markers against independent numpy/scipy references and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

from lightning_geomarkers.functional.distances import within_class_distance
from lightning_geomarkers.functional.intrinsic_dimension import local_intrinsic_dimension
from lightning_geomarkers.functional.neural_collapse import neural_collapse
from lightning_geomarkers.functional.spectral import effective_rank, numerical_rank, participation_ratio

# The global torch seed is reset before every test by tests/conftest.py.


# ----------------------------------------------------------------------------------------------------
# Independent numpy/scipy references (direct transcriptions of the formulas)
# ----------------------------------------------------------------------------------------------------


def ref_participation_ratio(x):
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]))
    return lam.sum() ** 2 / (lam**2).sum()


def ref_effective_rank(x, centered=True):
    xc = x - x.mean(axis=0) if centered else x
    s = np.linalg.svd(xc, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return np.exp(-(p * np.log(p)).sum())


def ref_nc1(x, y, rtol=1e-3):
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    resid = x - means[np.searchsorted(classes, y)]
    sigma_w = resid.T @ resid / x.shape[0]
    mb = means - means.mean(axis=0)
    sigma_b = mb.T @ mb / len(classes)
    lam, vec = np.linalg.eigh(sigma_b)
    keep = lam > rtol * lam.max()
    pinv = (vec[:, keep] / lam[keep]) @ vec[:, keep].T
    return np.trace(sigma_w @ pinv) / len(classes)


def ref_mle(x, k):
    dist, _ = cKDTree(x).query(x, k=k + 1)
    t = dist[:, 1:]  # drop the point itself
    m = 1.0 / (np.log(t[:, -1:] / t[:, :-1]).sum(axis=1) / (k - 1))
    return m.mean()


def ref_twonn(x):
    dist, _ = cKDTree(x).query(x, k=3)
    return x.shape[0] / np.log(dist[:, 2] / dist[:, 1]).sum()


def linear_manifold(d, n_points=3000, ambient=50, kind="uniform", seed=0):
    rng = np.random.default_rng(seed)
    z = rng.uniform(size=(n_points, d)) if kind == "uniform" else rng.normal(size=(n_points, d))
    basis, _ = np.linalg.qr(rng.normal(size=(ambient, d)))
    return z @ basis.T + rng.normal(size=ambient)  # random subspace, shifted off the origin


# ----------------------------------------------------------------------------------------------------
# Participation ratio
# ----------------------------------------------------------------------------------------------------


def test_pr_isotropic_gaussian_close_to_n():
    n = 30
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(6000, n)))
    pr = participation_ratio(x)
    assert pr.dtype == torch.float64 and pr.ndim == 0
    assert abs(float(pr) - n) < 0.1 * n


@pytest.mark.parametrize("shape", [(200, 10), (15, 40), (3, 2)])
def test_pr_matches_eigvalsh(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape) * rng.uniform(0.1, 5.0, size=shape[1]) + 3.0
    np.testing.assert_allclose(float(participation_ratio(x)), ref_participation_ratio(x), rtol=1e-8)


def test_pr_closed_forms_and_scale_invariance():
    assert float(participation_ratio(torch.eye(3))) == pytest.approx(2.0, rel=1e-12)
    x = np.random.default_rng(2).normal(size=(50, 6))
    ref = ref_participation_ratio(x)
    for scale in (1e-200, 1e200):
        assert float(participation_ratio(x * scale)) == pytest.approx(ref, rel=1e-8)
    assert float(participation_ratio(np.ones((5, 3)))) == 0.0  # no variance: no dimensions
    assert float(participation_ratio(torch.randn(20, 4).float())) >= 1.0


# ----------------------------------------------------------------------------------------------------
# Numerical rank
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 5, 17, 30])
def test_numerical_rank_of_rank_r_matrix(rank):
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(120, rank)) @ rng.normal(size=(rank, 30)) + rng.normal(size=30)
    r = numerical_rank(x)
    assert r.dtype == torch.int64 and r.ndim == 0
    assert int(r) == rank


def test_numerical_rank_matches_svd_threshold():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 12)) * np.logspace(0, -5, 12)  # singular values spread over 5 decades
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    for rtol in (1e-1, 1e-3, 1e-4):
        assert int(numerical_rank(x, rtol=rtol)) == int((s >= rtol * s[0]).sum())


def test_numerical_rank_constant_and_zero():
    assert int(numerical_rank(np.zeros((4, 3)))) == 0
    assert int(numerical_rank(np.full((4, 3), 0.1))) == 0  # constant rows: centred matrix is exactly 0
    assert int(numerical_rank(np.array([[0.0, 1.0]]))) == 0


# ----------------------------------------------------------------------------------------------------
# Effective rank
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("centered", [True, False])
def test_effective_rank_matches_svd_formula(centered):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 15)) * rng.uniform(0.01, 3.0, size=15) + 1.0
    er = effective_rank(x, centered=centered)
    assert er.dtype == torch.float64
    np.testing.assert_allclose(float(er), ref_effective_rank(x, centered), rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_equal_singular_values(k):
    rng = np.random.default_rng(k)
    n_samples, n_features = 50, 20
    # k orthonormal columns orthogonal to the all-ones vector: the matrix is already centred.
    u = rng.normal(size=(n_samples, k))
    u, _ = np.linalg.qr(u - u.mean(axis=0))
    v, _ = np.linalg.qr(rng.normal(size=(n_features, k)))
    x = 2.5 * u @ v.T
    assert float(effective_rank(x)) == pytest.approx(k, rel=1e-10)
    assert float(effective_rank(x, centered=False)) == pytest.approx(k, rel=1e-10)


def test_effective_rank_rankme_differs_from_centred_and_zero_cases():
    x = np.random.default_rng(5).normal(size=(30, 5)) + 10.0  # large offset: one dominant direction
    assert float(effective_rank(x, centered=False)) < float(effective_rank(x, centered=True))
    assert float(effective_rank(np.ones((4, 2)))) == 0.0
    assert float(effective_rank(np.zeros((4, 2)), centered=False)) == 0.0
    assert float(effective_rank(np.ones((4, 2)), centered=False)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------
# Neural collapse NC1
# ----------------------------------------------------------------------------------------------------


def test_nc1_collapsed_classes_near_zero():
    rng = np.random.default_rng(6)
    means = rng.normal(size=(5, 16)) * 3.0
    y = np.repeat(np.arange(5), 20)
    x = means[y] + 1e-6 * rng.normal(size=(100, 16))
    nc1 = neural_collapse(x, y)
    assert nc1.dtype == torch.float64 and nc1.ndim == 0
    assert 0.0 <= float(nc1) < 1e-9


@pytest.mark.parametrize(
    ("n_classes", "n_features", "rtol"), [(4, 10, 1e-3), (6, 3, 1e-3), (3, 8, 0.5), (2, 5, 1e-3)]
)
def test_nc1_matches_numpy(n_classes, n_features, rtol):
    rng = np.random.default_rng(7)
    y = rng.integers(0, n_classes, size=90)
    y[:n_classes] = np.arange(n_classes)  # every class present, unbalanced counts
    x = rng.normal(size=(90, n_features)) * rng.uniform(0.2, 2.0, size=n_features) + y[:, None] * 0.7
    np.testing.assert_allclose(float(neural_collapse(x, y, rtol=rtol)), ref_nc1(x, y, rtol), rtol=1e-8)


def test_nc1_closed_form_and_ordering():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]])
    assert float(neural_collapse(x, [0, 0, 1, 1])) == pytest.approx(0.125, rel=1e-12)
    rng = np.random.default_rng(8)
    y = np.repeat(np.arange(3), 30)
    centres = rng.normal(size=(3, 6)) * 4
    tight = centres[y] + 0.1 * rng.normal(size=(90, 6))
    loose = centres[y] + 2.0 * rng.normal(size=(90, 6))
    assert float(neural_collapse(tight, y)) < float(neural_collapse(loose, y))


def test_nc1_equal_class_means_raise():
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    with pytest.raises(ValueError, match="class means are equal"):
        neural_collapse(x, [0, 0, 1, 1])


# ----------------------------------------------------------------------------------------------------
# Local intrinsic dimension
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 5])
@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_mle_lid_recovers_linear_manifold_dimension(d, kind):
    x = torch.from_numpy(linear_manifold(d, kind=kind, seed=d))
    lid = local_intrinsic_dimension(x, k=20)
    assert lid.dtype == torch.float64 and lid.ndim == 0
    assert abs(float(lid) - d) < 0.15 * d


@pytest.mark.parametrize("d", [2, 5])
def test_twonn_recovers_linear_manifold_dimension(d):
    x = linear_manifold(d, kind="uniform", seed=10 + d)
    assert abs(float(local_intrinsic_dimension(x, method="twonn")) - d) < 0.15 * d


@pytest.mark.parametrize("k", [2, 5, 12])
def test_mle_matches_ckdtree_reference(k):
    x = np.random.default_rng(k).normal(size=(150, 6)) * np.array([1, 2, 3, 0.5, 0.1, 1])
    np.testing.assert_allclose(float(local_intrinsic_dimension(x, k=k)), ref_mle(x, k), rtol=1e-8)


def test_twonn_matches_ckdtree_reference():
    x = np.random.default_rng(11).normal(size=(150, 4))
    np.testing.assert_allclose(float(local_intrinsic_dimension(x, method="twonn")), ref_twonn(x), rtol=1e-8)


def test_lid_large_offset_uses_exact_distances():
    # Far from the origin the Gram-matrix distances lose digits; the result must not.
    x = np.random.default_rng(12).normal(size=(200, 5))
    ref = ref_mle(x, 10)
    np.testing.assert_allclose(float(local_intrinsic_dimension(x + 1e4, k=10)), ref, rtol=1e-6)
    np.testing.assert_allclose(float(local_intrinsic_dimension(x * 1e-150, k=10)), ref, rtol=1e-8)


@pytest.mark.parametrize("method", ["mle", "twonn"])
def test_lid_duplicates_are_removed(method):
    rng = np.random.default_rng(13)
    x = rng.normal(size=(80, 3))
    with_dups = np.concatenate([x, x[:30], x[:5]])[rng.permutation(115)]
    ref = ref_mle(x, 8) if method == "mle" else ref_twonn(x)
    np.testing.assert_allclose(
        float(local_intrinsic_dimension(with_dups, k=8, method=method)), ref, rtol=1e-8
    )


def test_lid_too_few_distinct_points():
    x = np.repeat(np.random.default_rng(14).normal(size=(6, 3)), 10, axis=0)  # 60 rows, 6 distinct
    with pytest.raises(ValueError, match=r"only 6 distinct point.*smaller k \(at most 5\)"):
        local_intrinsic_dimension(x, k=20)
    assert np.isfinite(float(local_intrinsic_dimension(x, k=5)))
    with pytest.raises(ValueError, match="distinct"):
        local_intrinsic_dimension(np.ones((10, 2)), method="twonn")


def test_lid_lattice_raises_instead_of_inf():
    x = np.arange(10.0)[:, None]
    with pytest.raises(ValueError, match="equidistant"):
        local_intrinsic_dimension(x, k=2)
    square = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # r1 = r2 = 1 everywhere
    with pytest.raises(ValueError, match="equidistant"):
        local_intrinsic_dimension(square, method="twonn")


# ----------------------------------------------------------------------------------------------------
# Within-class distance
# ----------------------------------------------------------------------------------------------------


def test_within_class_distance_matches_pdist():
    rng = np.random.default_rng(15)
    y = np.array([0] * 7 + [3] * 2 + [5] * 20)
    x = rng.normal(size=(29, 9)) * 3 + 100.0
    ref = np.mean([pdist(x[y == c]).mean() for c in (0, 3, 5)])
    out = within_class_distance(torch.from_numpy(x).float(), torch.from_numpy(y))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(float(within_class_distance(x, y)), ref, rtol=1e-12)
    np.testing.assert_allclose(float(out), ref, rtol=1e-5)


def test_within_class_distance_closed_form_and_scale():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 2.0]])
    assert float(within_class_distance(x, [0, 0, 1, 1])) == pytest.approx(3.5)
    assert float(within_class_distance(x * 1e-300, [0, 0, 1, 1])) == pytest.approx(3.5e-300)
    assert float(within_class_distance(x * 1e300, [0, 0, 1, 1])) == pytest.approx(3.5e300)


def test_within_class_distance_singleton_class_raises():
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        within_class_distance(np.ones((3, 2)), [0, 0, 1])


# ----------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ----------------------------------------------------------------------------------------------------

_SINGLE = [
    ("pr", participation_ratio),
    ("numerical_rank", numerical_rank),
    ("effective_rank", effective_rank),
    ("lid", local_intrinsic_dimension),
]
_LABELLED = [("nc1", neural_collapse), ("within", within_class_distance)]


@pytest.mark.parametrize(("name", "fn"), _SINGLE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_raise(name, fn, bad):
    x = np.random.default_rng(0).normal(size=(30, 3))
    x[4, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        fn(x)


@pytest.mark.parametrize(("name", "fn"), _LABELLED)
def test_non_finite_features_raise_labelled(name, fn):
    x = np.random.default_rng(0).normal(size=(6, 3))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        fn(x, [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize(("name", "fn"), _SINGLE)
@pytest.mark.parametrize("shape", [(10,), (2, 3, 4), (0, 3), (3, 0)])
def test_wrong_shape_raises(name, fn, shape):
    with pytest.raises(ValueError, match=r"2-D|empty"):
        fn(np.ones(shape))


@pytest.mark.parametrize(("name", "fn"), _SINGLE + _LABELLED)
def test_wrong_type_raises(name, fn):
    args = ("not a tensor",) if (name, fn) in _SINGLE else ("not a tensor", [0, 1])
    with pytest.raises(TypeError, match="torch.Tensor or numpy array"):
        fn(*args)


@pytest.mark.parametrize(("name", "fn"), _LABELLED)
def test_label_problems_raise(name, fn):
    x = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(ValueError, match="must match"):
        fn(x, [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="1-D"):
        fn(x, np.zeros((6, 1)))
    with pytest.raises(ValueError, match="non-integer"):
        fn(x, [0, 0, 0.5, 1, 1, 1])


def test_nc1_single_class_raises():
    with pytest.raises(ValueError, match="at least 2 classes"):
        neural_collapse(np.random.default_rng(0).normal(size=(6, 3)), [1] * 6)


def test_bad_parameters_raise():
    x = np.random.default_rng(0).normal(size=(30, 3))
    with pytest.raises(ValueError, match=r"`k` must be >= 2"):
        local_intrinsic_dimension(x, k=1)
    with pytest.raises(TypeError, match="`k`"):
        local_intrinsic_dimension(x, k=3.0)
    with pytest.raises(ValueError, match=r"smaller k \(at most 29\)"):
        local_intrinsic_dimension(x, k=30)
    with pytest.raises(ValueError, match="`method`"):
        local_intrinsic_dimension(x, method="pca")
    for rtol in (0.0, -1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="rtol"):
            numerical_rank(x, rtol=rtol)
        with pytest.raises(ValueError, match="rtol"):
            neural_collapse(x, [0] * 15 + [1] * 15, rtol=rtol)
    with pytest.raises(TypeError, match="rtol"):
        numerical_rank(x, rtol="1e-3")
    with pytest.raises(TypeError, match="centered"):
        effective_rank(x, centered="yes")


def test_inputs_accept_float32_and_numpy_and_return_float64():
    x32 = torch.randn(40, 5).float()
    y = torch.arange(40) % 4
    for value in (participation_ratio(x32), effective_rank(x32), neural_collapse(x32, y)):
        assert value.dtype == torch.float64
    assert local_intrinsic_dimension(x32.numpy(), k=5).dtype == torch.float64
    np.testing.assert_allclose(
        float(participation_ratio(x32)), ref_participation_ratio(x32.double().numpy()), rtol=1e-8
    )


# ----------------------------------------------------------------------------------------------------
# Property-based: odd input raises ValueError/TypeError or gives a finite number, never a silent NaN
# ----------------------------------------------------------------------------------------------------

_odd_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -1.0, 2.0, 1e-308, 5e-324, 1e308, -1e308]),
)
_odd_matrices = hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 4)), elements=_odd_floats)


def _finite_or_clear_error(fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except (ValueError, TypeError):
        return None
    assert out.ndim == 0
    assert bool(torch.isfinite(out)), f"{fn.__name__} returned {out} silently"
    return out


@settings(max_examples=25, deadline=None)
@given(_odd_matrices)
def test_spectral_property(x):
    pr = _finite_or_clear_error(participation_ratio, x)
    rank = _finite_or_clear_error(numerical_rank, x)
    er = _finite_or_clear_error(effective_rank, x)
    _finite_or_clear_error(effective_rank, x, centered=False)
    assert pr is not None and rank is not None and er is not None  # finite input: always defined
    assert 0 <= int(rank) <= min(x.shape)
    assert 0.0 <= float(pr) <= min(x.shape) + 1e-9
    assert 0.0 <= float(er) <= min(x.shape) + 1e-9


@settings(max_examples=25, deadline=None)
@given(_odd_matrices, st.integers(2, 4), st.sampled_from(["mle", "twonn"]))
def test_lid_property(x, k, method):
    out = _finite_or_clear_error(local_intrinsic_dimension, x, k=k, method=method)
    if out is not None:
        assert float(out) > 0.0


@settings(max_examples=25, deadline=None)
@given(_odd_matrices, st.data())
def test_labelled_markers_property(x, data):
    y = data.draw(hnp.arrays(np.int64, x.shape[0], elements=st.integers(0, 2)))
    nc1 = _finite_or_clear_error(neural_collapse, x, y)
    if nc1 is not None:
        assert float(nc1) >= 0.0
    dist = _finite_or_clear_error(within_class_distance, x, y)
    if dist is not None:
        assert float(dist) >= 0.0


def test_lid_warns_about_neighbours_within_the_inputs_round_off():
    """Near-duplicates (one input twice with last-bit differences) are distinct rows at tiny distances:
    TwoNN fell from 5.2 to 2.1 with 2% of them, silently. It warns now; clean data do not warn."""
    import warnings

    from lightning_geomarkers.errors import GeomarkersWarning
    from lightning_geomarkers.functional import local_intrinsic_dimension

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2000, 5, generator=g) @ torch.randn(5, 64, generator=g)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = float(local_intrinsic_dimension(x, method="twonn"))
    near = x.clone()
    idx = torch.arange(20)
    ulp = x[idx].abs() * torch.finfo(torch.float32).eps
    near[idx + 100] = x[idx] + ulp * torch.sign(torch.randn(20, 64, generator=g))
    with pytest.warns(
        GeomarkersWarning, match=r"^40 of 2000 distinct points have a nearest neighbour within the round-off"
    ):
        biased = float(local_intrinsic_dimension(near, method="twonn"))
    assert biased < 0.5 * clean  # the bias the warning is about


def test_lid_does_not_take_a_dense_bfloat16_manifold_for_near_duplicates():
    """In bfloat16 the round-off level (4 eps) is 3% of a point's norm, the spacing of ordinary clustered
    features: a warning needs the second neighbour far beyond the first, as for a real near-duplicate."""
    import warnings

    from lightning_geomarkers.functional import local_intrinsic_dimension

    g = torch.Generator().manual_seed(0)
    z = torch.rand(3000, 3, generator=g) @ torch.randn(3, 32, generator=g)
    x = torch.relu(z + 1.0).bfloat16()  # a 3-D ReLU manifold in 32-D (a review: 4099 of 5000 flagged)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local_intrinsic_dimension(x)
