"""Tests of the preprocessing functions (centering, random projection, per-class subsampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_geomarkers.functional.preprocessing import center, per_class_subsample, random_projection

# The global torch seed is reset before every test by tests/conftest.py.


# ----------------------------------------------------------------------------------------------------
# center
# ----------------------------------------------------------------------------------------------------


def test_center_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(40, 7))
    out = center(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), x - x.mean(axis=0, keepdims=True), rtol=0, atol=1e-12)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_center_keeps_dtype_and_zero_mean(dtype):
    x = (torch.randn(50, 5, dtype=torch.float64) + 10.0).to(dtype)
    out = center(x)
    assert out.dtype == dtype and out.shape == x.shape
    tol = {torch.float16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert out.to(torch.float64).mean(dim=0).abs().max() < tol


def test_center_numpy_input_and_constant_columns_exactly_zero():
    x = np.array([[0.1, 1.0], [0.1, 2.0], [0.1, 6.0]])
    out = center(x)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out[:, 0], torch.zeros(3, dtype=torch.float64))
    np.testing.assert_allclose(out[:, 1].numpy(), [-2.0, -1.0, 3.0])


def test_center_integer_input_becomes_float():
    out = center(np.array([[1, 2], [3, 4]]))
    assert out.is_floating_point()
    np.testing.assert_allclose(out.numpy(), [[-1, -1], [1, 1]])


def test_center_huge_values_no_spurious_overflow():
    x = torch.tensor([[1e308, 0.0], [-1e308, 1.0]], dtype=torch.float64)
    np.testing.assert_allclose(center(x).numpy(), [[1e308, -0.5], [-1e308, 0.5]])


# ----------------------------------------------------------------------------------------------------
# random_projection
# ----------------------------------------------------------------------------------------------------


def test_random_projection_shape_dtype():
    x = torch.randn(10, 300)
    out = random_projection(x, 20, generator=0)
    assert out.shape == (10, 20) and out.dtype == torch.float32


def test_random_projection_preserves_norms_in_expectation():
    # E ||x R||^2 = ||x||^2 for R_ij ~ N(0, 1/d): average the ratio over many rows and a large d.
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(200, 500)))
    out = random_projection(x, 400, generator=3)
    ratio = (out.norm(dim=1) ** 2 / x.norm(dim=1) ** 2).numpy()
    assert abs(ratio.mean() - 1.0) < 0.03
    # each row: chi^2_d / d has std sqrt(2/d) ~ 0.07; nothing wildly off
    assert np.all(np.abs(ratio - 1.0) < 0.5)


def test_random_projection_entries_are_gaussian_with_variance_one_over_d():
    # Projecting the identity returns the projection matrix itself.
    n, d = 400, 100
    r = random_projection(torch.eye(n, dtype=torch.float64), d, generator=5).numpy()
    assert abs(r.mean()) < 0.005
    assert abs(r.var() * d - 1.0) < 0.03


def test_random_projection_deterministic_with_seed_and_generator():
    x = torch.randn(6, 50)
    a = random_projection(x, 8, generator=42)
    b = random_projection(x, 8, generator=42)
    c = random_projection(x, 8, generator=43)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(random_projection(x, 8, generator=g1), random_projection(x, 8, generator=g2))


def test_random_projection_same_matrix_for_every_dtype():
    x = torch.randn(6, 50, dtype=torch.float64)
    a = random_projection(x, 8, generator=1)
    b = random_projection(x.float(), 8, generator=1)
    np.testing.assert_allclose(a.numpy(), b.double().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("out_dim", [50, 51, 1000])
def test_random_projection_unchanged_when_small(out_dim):
    x = torch.randn(6, 50)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    out = random_projection(x, out_dim, generator=g)
    assert torch.equal(out, x)
    assert torch.equal(g.get_state(), state)  # generator not advanced


def test_random_projection_bad_input():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="out_dim"):
        random_projection(x, 0)
    with pytest.raises(TypeError, match="out_dim"):
        random_projection(x, 2.5)
    with pytest.raises(TypeError, match="generator"):
        random_projection(x, 2, generator="seed")
    with pytest.raises(ValueError, match="2-D"):
        random_projection(torch.randn(10), 2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        random_projection(torch.tensor([[1.0, float("inf")]]), 1)


# ----------------------------------------------------------------------------------------------------
# per_class_subsample
# ----------------------------------------------------------------------------------------------------


def _labelled(n_per_class=(5, 12, 3), n_features=4):
    labels = np.concatenate([np.full(n, c) for c, n in zip((7, 2, 4), n_per_class, strict=True)])
    # every row unique and identifiable: first column is the row index
    x = np.column_stack(
        [np.arange(labels.size), np.random.default_rng(0).normal(size=(labels.size, n_features))]
    )
    return torch.from_numpy(x), torch.from_numpy(labels)


def test_per_class_subsample_counts_membership_order():
    x, y = _labelled()
    parts, ids = per_class_subsample(x, y, 4, generator=0)
    assert ids.tolist() == [2, 4, 7] and ids.dtype == torch.int64
    assert [p.shape[0] for p in parts] == [4, 3, 4]  # min(4, count)
    for part, c in zip(parts, ids.tolist(), strict=True):
        rows = part[:, 0].long()
        assert len(set(rows.tolist())) == part.shape[0]  # without replacement
        assert torch.all(y[rows] == c)  # membership
        assert torch.equal(part, x[rows])  # rows copied intact
        assert part.dtype == x.dtype


def test_per_class_subsample_takes_all_when_class_is_small():
    x, y = _labelled()
    parts, ids = per_class_subsample(x, y, 100, generator=0)
    assert [p.shape[0] for p in parts] == [12, 3, 5]
    for part, c in zip(parts, ids.tolist(), strict=True):
        assert sorted(part[:, 0].tolist()) == x[y == c, 0].tolist()


def test_per_class_subsample_deterministic():
    x, y = _labelled()
    a, _ = per_class_subsample(x, y, 3, generator=11)
    b, _ = per_class_subsample(x, y, 3, generator=11)
    c, _ = per_class_subsample(x, y, 3, generator=12)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_per_class_subsample_classes_argument():
    x, y = _labelled()
    parts, ids = per_class_subsample(x, y, 2, classes=[7, 2], generator=0)
    assert ids.tolist() == [7, 2]
    assert torch.all(y[parts[0][:, 0].long()] == 7) and torch.all(y[parts[1][:, 0].long()] == 2)
    _, ids = per_class_subsample(x, y, 2, classes=torch.tensor([4]), generator=0)
    assert ids.tolist() == [4]


def test_per_class_subsample_numpy_input():
    x, y = _labelled()
    parts, ids = per_class_subsample(x.numpy(), y.numpy(), 2, generator=0)
    assert isinstance(parts[0], torch.Tensor) and ids.tolist() == [2, 4, 7]


def test_per_class_subsample_bad_input():
    x, y = _labelled()
    with pytest.raises(ValueError, match=r"do not occur in `labels`"):
        per_class_subsample(x, y, 2, classes=[2, 99])
    with pytest.raises(ValueError, match="duplicates"):
        per_class_subsample(x, y, 2, classes=[2, 2])
    with pytest.raises(ValueError, match="non-empty"):
        per_class_subsample(x, y, 2, classes=[])
    with pytest.raises(ValueError, match="non-integer"):
        per_class_subsample(x, y, 2, classes=[2.5])
    with pytest.raises(TypeError, match="integer class ids"):
        per_class_subsample(x, y, 2, classes=["a"])
    with pytest.raises(ValueError, match="points_per_class"):
        per_class_subsample(x, y, 0)
    with pytest.raises(ValueError, match="must match"):
        per_class_subsample(x, y[:-1], 2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        per_class_subsample(torch.full((3, 2), float("nan")), [0, 1, 1], 2)


# ----------------------------------------------------------------------------------------------------
# Property-based: odd input raises a clear error or gives finite output
# ----------------------------------------------------------------------------------------------------

_odd_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -1.0, 1e-308, 5e-324, 1e308, -1e308]),
)
_odd_matrices = hnp.arrays(
    np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6), elements=_odd_floats
)


@settings(max_examples=25, deadline=None)
@given(_odd_matrices)
def test_center_property(x):
    try:
        out = center(x)
    except (ValueError, TypeError):
        return
    assert out.shape == x.shape and torch.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(_odd_matrices, st.integers(1, 8))
def test_random_projection_property(x, out_dim):
    """Wider than out_dim: x @ R with R the seeded (N, out_dim) Gaussian matrix (read off by projecting the
    identity), or a clear overflow error; otherwise x itself. A projection that does nothing fails."""
    t = torch.from_numpy(x)
    n = x.shape[1]
    if n <= out_dim:
        assert torch.equal(random_projection(x, out_dim, generator=0), t)
        return
    matrix = random_projection(torch.eye(n, dtype=torch.float64), out_dim, generator=0)
    assert matrix.shape == (n, out_dim) and bool((matrix != 0).all())
    want = t @ matrix
    if not bool(torch.isfinite(want).all()):
        with pytest.raises(ValueError, match="overflowed"):
            random_projection(x, out_dim, generator=0)
        return
    out = random_projection(x, out_dim, generator=0)
    assert out.shape == (x.shape[0], out_dim)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=0.0)


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 3)), elements=_odd_floats),
    st.data(),
    st.integers(1, 4),
)
def test_per_class_subsample_property(x, data, points):
    y = data.draw(hnp.arrays(np.int64, x.shape[0], elements=st.integers(-2, 2)))
    parts, ids = per_class_subsample(x, y, points, generator=0)
    assert ids.tolist() == sorted(set(y.tolist()))
    for part, c in zip(parts, ids.tolist(), strict=True):
        assert part.shape[0] == min(points, int((y == c).sum()))


def test_float32_projection_runs_in_float64_where_float32_matmuls_take_a_shortcut(monkeypatch):
    """With TF32/bf16 allowed for float32 matmuls (``torch.set_float32_matmul_precision("high")`` or the
    newer ``fp32_precision`` settings), float32 features are projected in float64 and rounded once, so the
    markers do not depend on that setting; IEEE float32 keeps the float32 matmul."""
    import lightning_geomarkers.functional.preprocessing as prep

    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    proj = torch.randn(64, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64) / 4.0
    exact = (x.double() @ proj).float()  # the float64 product, rounded once
    float32 = x @ proj.float()
    assert not torch.equal(exact, float32)  # the two routes are distinguishable on these data
    monkeypatch.setattr(prep, "ieee_float32_matmul", lambda device: False)
    assert torch.equal(random_projection(x, 16, generator=9), exact)
    assert torch.equal(prep._center_project(x, 16, centered=False, generator=9), exact)
    monkeypatch.setattr(prep, "ieee_float32_matmul", lambda device: True)
    assert torch.equal(random_projection(x, 16, generator=9), float32)
    assert torch.equal(prep._center_project(x, 16, centered=False, generator=9), float32)


def test_class_rows_equal_a_scan_per_class():
    """The per-class row lists come from one stable sort (a scan of every row per class cost O(C S): 2.8 s
    for the within-class distance at 20,000 classes); they equal torch.nonzero(y == c) class by class, in
    the order the classes are asked for."""
    from lightning_geomarkers.functional.preprocessing import _class_rows

    g = torch.Generator().manual_seed(0)
    y = torch.randint(-50, 50, (3000,), generator=g)
    classes = torch.unique(y)[torch.randperm(torch.unique(y).numel(), generator=g)]
    rows = _class_rows(y, classes)
    assert len(rows) == classes.numel()
    for c, r in zip(classes.tolist(), rows, strict=True):
        assert torch.equal(r, torch.nonzero(y == c).squeeze(1))
