"""The fast GLUE solver: agreement with the per-probe scipy reference where supports are large (high
intrinsic dimension and radius), the several-points-per-step path against textbook Lawson-Hanson and
scipy, the cheap separability certificates against the exact test, chunking invariance, bounded
memory, thread scoping, the joint-size warning, and a device-agnostic code path."""

from __future__ import annotations

import importlib
import itertools
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, nnls
from torch.overrides import TorchFunctionMode

from lightning_geomarkers.errors import GeomarkersWarning, NonSeparableWarning, SolverWarning
from lightning_geomarkers.functional import glue, glue_pairs
from lightning_geomarkers.functional._nnls import batched_nnls, separable_dichotomies
from lightning_geomarkers.functional.glue import (
    GLUE_MARKERS,
    _normalised_gram,
    _separable_probes,
)
from lightning_geomarkers.functional.protocols import _glue_pairs, _pairs_at
from lightning_geomarkers.testing import geometry_clouds, reference_glue
from lightning_geomarkers.utilities import limit_threads, torch_thread_pool
from tests.glue_helpers import engine_with_probes

# The package re-exports the functions under the module names, so fetch the modules themselves.
glue_module = importlib.import_module("lightning_geomarkers.functional.glue")
nnls_module = importlib.import_module("lightning_geomarkers.functional._nnls")
protocols_module = importlib.import_module("lightning_geomarkers.functional.protocols")


@pytest.mark.parametrize(
    "P,M,N,dim,radius", [(6, 25, 160, 20, 2.0), (5, 20, 128, 10, 1.0), (4, 30, 96, 2, 0.5)]
)
def test_grid_regime_matches_scipy_reference(P, M, N, dim, radius):
    """Large supports (high D, R) and low-dimensional, dependent clouds (D=2): same markers as scipy."""
    rng = np.random.default_rng(dim * 100 + P)
    mans = geometry_clouds(rng, P, M, N, dim, radius)
    t = rng.standard_normal((30, N))
    y = rng.choice([-1.0, 1.0], size=(30, P))
    ref = reference_glue(list(mans), t, y)
    res = glue(torch.from_numpy(mans), probes=torch.from_numpy(t), dichotomies=torch.from_numpy(y))
    assert res.converged and res.kkt_violation < 1e-9 and res.n_degenerate == 0
    for name in GLUE_MARKERS:
        assert float(getattr(res, name)) == pytest.approx(ref[name], rel=1e-4, abs=1e-12), name
    np.testing.assert_allclose(res.a.numpy(), ref["proj_norm2"], rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(res.active.numpy(), ref["active"])


def test_grid_regime_pairs_batch_matches_reference():
    rng = np.random.default_rng(7)
    mans = geometry_clouds(rng, 4, 25, 128, 20, 2.0)
    pairs = [(0, 1), (1, 2), (2, 3)]
    probes = rng.standard_normal((3, 25, 128))
    labels = rng.choice([-1.0, 1.0], size=(3, 25, 2))
    points = torch.from_numpy(np.stack([mans[list(p)] for p in pairs]))
    mask = torch.ones(points.shape[:3], dtype=torch.bool)
    out = engine_with_probes(
        points,
        mask,
        torch.from_numpy(labels),
        torch.from_numpy(probes),
    )
    for g, pair in enumerate(pairs):
        ref = reference_glue(list(mans[list(pair)]), probes[g], labels[g])
        for name in ("capacity", "dimension", "radius", "utility"):
            assert float(out[name][g]) == pytest.approx(ref[name], rel=1e-4), (g, name)


def _nnls_problem(rng, P, M, N, dim, radius, n_t):
    mans = geometry_clouds(rng, P, M, N, dim, radius)
    x = torch.from_numpy(mans.reshape(P * M, N))
    x = x / x.square().sum(1).mean().sqrt()
    t = torch.from_numpy(rng.standard_normal((n_t, N)))
    y = torch.from_numpy(rng.choice([-1.0, 1.0], size=(n_t, P)))
    sigma = y.repeat_interleave(M, dim=1)
    gram = (x @ x.T)[None]
    h = t @ x.T
    group = torch.zeros(n_t, dtype=torch.long)
    return x, t, sigma, gram, h, group


@pytest.mark.parametrize("dim,radius", [(2, 0.5), (20, 2.0)])
def test_several_points_per_step_equals_textbook_and_scipy(dim, radius):
    """Adding several points per step (and the single-point fallback after an overshoot) ends at the
    same certified optimum as textbook Lawson-Hanson (one point per step) and as scipy's NNLS."""
    rng = np.random.default_rng(dim)
    x, t, sigma, gram, h, group = _nnls_problem(rng, 6, 20, 128, dim, radius, 24)
    kwargs = dict(block_size=20)
    multi = batched_nnls(gram, group, h, sigma, t.norm(dim=1), add_per_iteration=16, **kwargs)
    single = batched_nnls(gram, group, h, sigma, t.norm(dim=1), add_per_iteration=1, **kwargs)
    assert bool(multi.converged.all()) and bool(single.converged.all())
    assert float(multi.kkt_violation.max()) < 1e-9
    assert multi.iterations < single.iterations  # the point of the multi-point steps
    # The cone projection G^T lambda is unique; the multipliers too where the points are independent
    # (D=20: 120 points spanning 126 dimensions), not for the D=2 clouds (120 points in 18 dimensions).
    unique = dim == 20
    for q in range(t.shape[0]):
        g = (sigma[q, :, None] * x).numpy()
        lam, _ = nnls(g.T, t[q].numpy(), maxiter=50 * g.shape[0])
        for sol in (multi, single):
            np.testing.assert_allclose(g.T @ sol.lam[q].numpy(), g.T @ lam, atol=1e-8)
            if unique:
                np.testing.assert_allclose(sol.lam[q].numpy(), lam, atol=1e-7)


def test_certificates_agree_with_exact_separability_test():
    """The cheap certificates only ever claim separability that the exact LDP test confirms, and the
    combined answer equals the exact one on separable and on non-separable dichotomies."""
    rng = np.random.default_rng(3)
    for dim, radius, n_feat in [(2, 0.5, 64), (10, 2.0, 64), (8, 3.0, 8)]:
        mans = geometry_clouds(rng, 4, 15, n_feat, dim, radius)
        points = torch.from_numpy(mans)[None]
        mask = torch.ones(points.shape[:3], dtype=torch.bool)
        gram, _ = _normalised_gram(points, mask)
        labels = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, 20, 4)))
        fast = _separable_probes(gram, mask, labels)
        sigma = labels[0].repeat_interleave(15, dim=1)
        exact = separable_dichotomies(gram, torch.zeros(20, dtype=torch.long), sigma)
        np.testing.assert_array_equal(fast.numpy(), exact.numpy())


def test_chunked_pairs_equal_unchunked(monkeypatch):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat_interleave(20)
    x = 2 * torch.randn(6, 48, generator=g)[y] + torch.randn(120, 48, generator=g)
    whole = glue_pairs(x, y, points_per_class=15, n_pairs=None, n_t=30, generator=4)
    monkeypatch.setattr(protocols_module, "_CHUNK_ELEMENTS", 1)  # one pair per chunk
    monkeypatch.setattr(glue_module, "_ALGEBRA_ELEMENTS", 1)  # one probe at a time in the algebra
    chunked = glue_pairs(x, y, points_per_class=15, n_pairs=None, n_t=30, generator=4)
    assert torch.equal(whole.pairs, chunked.pairs)
    for name in GLUE_MARKERS:
        np.testing.assert_allclose(chunked.per_pair[name].numpy(), whole.per_pair[name].numpy(), rtol=1e-12)


def test_pairs_workers_solve_chunks_concurrently_with_identical_results(monkeypatch):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat_interleave(20)
    x = 2 * torch.randn(6, 48, generator=g)[y] + torch.randn(120, 48, generator=g)
    per_pair = 30 * (48 + 16 * 2 * 15) + 2 * 15 * (48 + 2 * 15)  # glue_pairs' per-pair element count
    monkeypatch.setattr(protocols_module, "_CHUNK_ELEMENTS", 4 * per_pair)  # 15 pairs: 4 chunks, 4 4 4 3
    monkeypatch.setattr(protocols_module, "available_cpus", lambda: 4)  # workers is capped at the CPUs
    running, peak, threads, lock = [0], [0], set(), threading.Lock()
    original = protocols_module._glue_groups

    def counting(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads.add(threading.current_thread().name)
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(protocols_module, "_glue_groups", counting)
    one = glue_pairs(x, y, points_per_class=15, n_pairs=None, n_t=30, generator=4)
    assert threads == {threading.current_thread().name} and peak[0] == 1
    threads.clear()
    two = glue_pairs(x, y, points_per_class=15, n_pairs=None, n_t=30, generator=4, workers=2)
    assert threads <= {threading.current_thread().name} | {n for n in threads if n.startswith("geomarkers")}
    assert peak[0] <= 2  # bounded: at most `workers` chunks solved at once
    assert torch.equal(one.pairs, two.pairs) and one.n_degenerate == two.n_degenerate
    for name in GLUE_MARKERS:  # same chunks, same draws: bit for bit
        assert torch.equal(one.per_pair[name], two.per_pair[name]), name
    with pytest.raises(ValueError, match="workers"):
        glue_pairs(x, y, n_t=5, workers=0)

    # A helper that is busy when GLUE starts joins in as soon as it is free, while the calling thread is
    # still solving its first chunk (it used to be offered only the chunk after that one).
    monkeypatch.setattr(protocols_module, "_glue_groups", original)
    gate, helper_started = threading.Event(), threading.Event()
    spans, lock = [], threading.Lock()

    def observed(*args, **kwargs):
        name = threading.current_thread().name
        if name.startswith("geomarkers"):
            helper_started.set()
        else:
            gate.set()  # frees the helper: from now on it is idle
            helper_started.wait(timeout=30)  # the first chunk here waits until the helper has one too
        with lock:
            spans.append((name, "start"))
        out = original(*args, **kwargs)
        with lock:
            spans.append((name, "end"))
        return out

    monkeypatch.setattr(protocols_module, "_glue_groups", observed)
    with limit_threads(1), torch_thread_pool(1) as pool:
        pool.submit(gate.wait, 30)  # the helper's earlier work (LID in geometry_markers)
        busy = _glue_pairs(
            x, y, points_per_class=15, n_pairs=None, n_t=30, dichotomies="random", max_classes=None,
            generator=4, num_threads=1, pool=pool,
        )  # fmt: skip
    first_end = spans.index((threading.current_thread().name, "end"))
    assert any(n.startswith("geomarkers") and e == "start" for n, e in spans[:first_end])
    for name in GLUE_MARKERS:
        assert torch.equal(busy.per_pair[name], one.per_pair[name]), name


def test_results_do_not_depend_on_thread_setting_and_setting_is_restored():
    rng = np.random.default_rng(1)
    mans = torch.from_numpy(geometry_clouds(rng, 4, 10, 64, 5, 1.0))
    before = torch.get_num_threads()
    one = glue(mans, n_t=20, generator=0, num_threads=1)
    assert torch.get_num_threads() == before
    two = glue(mans, n_t=20, generator=0, num_threads=2)
    for name in GLUE_MARKERS:
        assert float(getattr(one, name)) == pytest.approx(float(getattr(two, name)), rel=1e-10)
    with pytest.raises(ValueError, match="num_threads"):
        glue(mans, n_t=5, num_threads=0)


def test_joint_far_above_cover_bound_warns_with_a_fix():
    rng = np.random.default_rng(2)
    mans = torch.from_numpy(geometry_clouds(rng, 6, 200, 64, 2, 0.3))  # 1200 points > 4 x 64
    with pytest.warns(GeomarkersWarning, match="max_classes"):
        glue(mans, n_t=5, generator=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeomarkersWarning)
        glue(mans[:, :40], n_t=5, generator=0)  # 240 points: no warning


def test_no_solver_warning_on_monitor_like_default_case():
    """Small, partly non-separable pairs like the monitor's test models (N=16, 30 points per class)
    and a monitor-sized default case: the solver certifies every probe, no iteration cap is hit."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    small = torch.randn(120, 16, generator=g) + 0.7 * torch.randn(4, 16, generator=g)[y]
    y10 = torch.arange(10).repeat_interleave(50)
    big = torch.randn(10, 256, generator=g)[y10] + torch.randn(500, 256, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonSeparableWarning)  # expected: 60 points in 16 dimensions
        warnings.simplefilter("error", SolverWarning)
        res = glue_pairs(small - small.mean(0), y, points_per_class=50, n_pairs=None, n_t=40, generator=0)
        assert res.converged
        res = glue_pairs(big - big.mean(0), y10, points_per_class=50, n_pairs=20, n_t=100, generator=0)
        assert res.converged and res.n_degenerate == 0


class _HostReads(TorchFunctionMode):
    """Counts the torch calls that make a CUDA device wait for the host: reading values (``bool``,
    ``int``, ``float``, ``item``, ``tolist``), data-dependent shapes (``nonzero``, ``unique``,
    ``masked_select``) and boolean-mask indexing."""

    READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "unique"}
    READS |= {"masked_select", "_unique2", "unique_consecutive"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name in ("__getitem__", "__setitem__", "index_put", "index_put_") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if len(args) > 1 and isinstance(args[1], tuple) else args[1:2])
        )
        self.count += name in self.READS or masked
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fraction", [(0.0, 0.0), (1.0, 1.0)], ids=["dense-products", "sparse-products"])
def test_solver_reads_the_host_once_per_iteration(monkeypatch, fraction):
    """GPU readiness: inside the iteration loop the only host read is the one convergence check per
    iteration, also when finished rows are compacted away (several groups finishing at different
    iterations). Before and after the loop a fixed handful (layout, final write-back). Both routes of
    the products K u: the dense GEMMs (the only one on CUDA) and the sparse products (CPU)."""
    monkeypatch.setattr(nnls_module, "_SPARSE_PRODUCT_FRACTION", fraction)
    rng = np.random.default_rng(11)
    mans = geometry_clouds(rng, 6, 20, 96, 10, 1.5)
    x = torch.from_numpy(mans.reshape(3, 2, 20, 96)).flatten(1, 2)
    x = x / x.square().sum(-1).mean().sqrt()
    n_t = 40
    t = torch.from_numpy(rng.standard_normal((3, n_t, 96)))
    y = torch.from_numpy(rng.choice([-1.0, 1.0], size=(3 * n_t, 2)))
    sigma = y.repeat_interleave(20, dim=1)
    gram = x @ x.transpose(1, 2)
    h = torch.einsum("btn,bqn->bqt", x, t).reshape(3 * n_t, 40)
    group = torch.arange(3).repeat_interleave(n_t)
    with _HostReads() as reads:
        sol = batched_nnls(gram, group, h, sigma, t.norm(dim=-1).reshape(-1), block_size=20)
    assert bool(sol.converged.all()) and sol.iterations >= 5
    assert reads.count <= sol.iterations + 4, (reads.count, sol.iterations)
    # The loop does compact (rows finish at different iterations): the count above includes it.
    lam_ref = [
        nnls((sigma[q, :, None] * x[q // n_t]).numpy().T, t.reshape(-1, 96)[q].numpy())[0] for q in range(5)
    ]
    for q, lam in enumerate(lam_ref):
        g = (sigma[q, :, None] * x[q // n_t]).numpy()
        np.testing.assert_allclose(g.T @ sol.lam[q].numpy(), g.T @ lam, atol=1e-8)


@pytest.mark.parametrize("outlier,cutoff", [(1e3, 1e-9), (1e5, 1e-12)])
def test_one_large_point_does_not_loosen_the_solution_for_the_others(outlier, cutoff):
    """An outlier point (norm ``outlier`` x the others) must not make the solver stop early or the
    separability test fail: their tolerances are per point. Before, at 1e5 the anchors were 5.5% off
    while the solve reported itself converged, and 29 of 30 separable dichotomies were flagged
    degenerate. References: scipy's NNLS on unit-norm columns (the same cone, lambda_i = mu_i / ||x_i||)
    and scipy's linprog for separability (sigma_i <x_i, v> >= 1 feasible)."""
    rng = np.random.default_rng(3)
    mans = geometry_clouds(rng, 4, 20, 64, 5, 1.0).copy()
    mans[0, 0] *= outlier
    t = rng.standard_normal((30, 64))
    y = rng.choice([-1.0, 1.0], size=(30, 4))
    res = glue(
        torch.from_numpy(mans),
        probes=torch.from_numpy(t),
        dichotomies=torch.from_numpy(y),
        return_anchors=True,
        eigen_cutoff=cutoff,
    )
    assert res.converged and res.kkt_violation < 1e-9
    pts = mans.reshape(-1, 64)
    owner = np.repeat(np.arange(4), 20)
    norms = np.linalg.norm(pts, axis=1)
    for k in range(t.shape[0]):
        g = y[k][owner][:, None] * pts
        mu, _ = nnls((g / norms[:, None]).T, t[k], maxiter=5000)
        lam = mu / norms
        for man in range(4):
            w = lam[owner == man]
            assert bool(res.active[k, man]) == (w.sum() > 0)
            if w.sum() > 0:
                anchor = w @ mans[man] / w.sum()
                np.testing.assert_allclose(
                    res.anchors[k, man].numpy(), anchor, rtol=1e-8, atol=1e-8 * norms.min()
                )
    separable = [
        linprog(
            np.zeros(64), A_ub=-(y[k][owner][:, None] * pts), b_ub=-np.ones(80), bounds=(None, None)
        ).status
        == 0
        for k in range(t.shape[0])
    ]
    assert res.n_degenerate == separable.count(False) == 0
    # The markers against the reference. The cut-off is 1e-12 at 1e5: the default (1e-9 x the mean squared
    # norm) is then dominated by the outlier and lies among the other anchors' eigenvalues, where two
    # exact computations may keep different eigenvalues (see docs/markers.md, "Outliers").
    ref = reference_glue(list(mans), t, y, eigen_cutoff=cutoff)
    for name in ("capacity", "dimension", "radius", "utility"):
        assert float(getattr(res, name)) == pytest.approx(ref[name], rel=1e-7), name


@pytest.mark.parametrize("outlier", [1.0, 1e5])
@pytest.mark.parametrize("n_feat,dim,radius", [(10, 4, 1.0), (8, 3, 0.7)])
def test_separability_with_an_outlier_matches_linprog(n_feat, dim, radius, outlier):
    """All 16 dichotomies of 4 classes of 20 points in 8-10 dimensions (some separable, some not),
    with and without one point 1e5 x larger: the answer equals scipy's linprog feasibility of
    sigma_i <x_i, v> >= 1, whatever the outlier does to the scale."""
    rng = np.random.default_rng(5)
    mans = geometry_clouds(rng, 4, 20, n_feat, dim, radius).copy()
    mans[0, 0] *= outlier
    labels = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))
    pts, owner = mans.reshape(-1, n_feat), np.repeat(np.arange(4), 20)
    expected = [
        linprog(
            np.zeros(n_feat), A_ub=-(y[owner][:, None] * pts), b_ub=-np.ones(80), bounds=(None, None)
        ).status
        == 0
        for y in labels
    ]
    assert 0 < sum(expected) < len(expected)  # both kinds occur
    points = torch.from_numpy(mans)[None]
    gram = points.flatten(1, 2) @ points.flatten(1, 2).transpose(1, 2)
    gram = gram / gram.diagonal(dim1=-2, dim2=-1).mean()  # what the engine passes: mean squared norm 1
    got = _separable_probes(gram, torch.ones((1, 4, 20), dtype=torch.bool), torch.from_numpy(labels)[None])
    assert got.tolist() == expected


def test_device_agnostic_path_keeps_inputs_device_and_dtype():
    """Everything is allocated on the features' device (checked on CPU here; the GPU check script
    compares CUDA with CPU) and float32 input is solved in float64."""
    rng = np.random.default_rng(4)
    mans = torch.from_numpy(geometry_clouds(rng, 3, 10, 32, 4, 1.0)).float()
    res = glue(mans, n_t=10, generator=0, num_threads=None)
    for name in GLUE_MARKERS:
        value = getattr(res, name)
        assert value.device == mans.device and value.dtype == torch.float64
    assert res.a.device == mans.device and res.active.device == mans.device
    ref = glue(mans.double(), n_t=10, generator=0)
    assert float(res.capacity) == pytest.approx(float(ref.capacity), rel=1e-6)


def test_quad_pinv_cholesky_path_matches_numpy_eigendecomposition():
    """The certified Cholesky path of v^T G^+ v (and of v's kept part) equals the cut-off
    pseudo-inverse computed by numpy's eigh, on full-rank, rank-deficient, near-cut-off and partly
    inactive blocks (the last three go through the eigh fallback)."""
    rng = np.random.default_rng(5)
    n_man, cutoff = 6, 1e-9
    grams, vecs, actives = [], [], []
    for k in range(48):
        active = rng.random(n_man) < 0.75
        basis = rng.standard_normal((n_man, n_man))
        evals = rng.uniform(0.05, 3.0, n_man)
        if k % 4 == 1:
            evals[: k % 3 + 1] = 0.0  # rank-deficient
        elif k % 4 == 2:
            evals[0] = 2.5 * cutoff  # an eigenvalue just above the cut-off
        q = np.linalg.qr(basis)[0]
        g = (q * evals) @ q.T
        g[~active], g[:, ~active] = 0.0, 0.0
        v = rng.standard_normal(n_man) * active
        grams.append(g), vecs.append(v), actives.append(active)
    g_t, v_t = torch.from_numpy(np.stack(grams)), torch.from_numpy(np.stack(vecs))
    value, kept = glue_module._quad_pinv(
        g_t, v_t, cutoff, torch.from_numpy(np.stack(actives)), return_kept=True
    )
    for i, (g, v) in enumerate(zip(grams, vecs, strict=True)):
        w, vv = np.linalg.eigh(g)
        keep = w > cutoff
        proj = vv[:, keep].T @ v
        # Round-off in an eigenvalue near the cut-off is relative to the largest (u ||G|| / 2.5e-9).
        rel = 1e-8 if w[keep].min(initial=1.0) > 1e-3 else 1e-5
        assert float(value[i]) == pytest.approx(float((proj**2 / w[keep]).sum()), rel=rel, abs=1e-12), i
        np.testing.assert_allclose(kept[i].numpy(), vv[:, keep] @ proj, atol=1e-8)


@pytest.mark.parametrize("scale", [1e160, 1e200, 1e-170, 1e-200])
def test_extreme_scales_give_the_same_markers(scale):
    """Every GLUE marker is scale invariant; squaring unscaled float64 points overflowed (capacity inf,
    every probe 'degenerate') at 1e160 and underflowed to 'all points are zero' at 1e-170."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 40, generator=g, dtype=torch.float64)
    ref = glue(x, n_t=40, generator=0)
    res = glue(x * scale, n_t=40, generator=0)
    assert res.n_degenerate == 0 and res.converged
    for name in ("capacity", "dimension", "radius", "utility"):
        assert float(getattr(res, name)) == pytest.approx(float(getattr(ref, name)), rel=1e-9), name
    anchors = glue(x * scale, n_t=5, generator=0, return_anchors=True).anchors
    assert torch.isfinite(anchors).all()  # returned in the input's units


def test_failed_factorization_inside_the_inner_loop_keeps_the_iterate(monkeypatch):
    """A Cholesky failure while a row is inside the inner loop (no point added) must not step to the
    zero solution of the failed factorization and drop the whole passive set: the row keeps its previous
    feasible iterate and goes on. Forced here by reporting every factorization of three iterations as
    failed; the passive sets survive them (dropping them shrinks the total from ~440 to ~20 points) and
    the result is still scipy's NNLS optimum."""
    rng = np.random.default_rng(7)
    x, t, sigma, gram, h, group = _nnls_problem(rng, 6, 20, 128, 20, 2.0, 24)
    kwargs = dict(block_size=20, add_per_iteration=16)
    real_solve, real_solve_passive = nnls_module._solve_spd, nnls_module._WorkingSet.solve_passive
    failing = (4, 5, 6)
    calls, passive, inner_rows_hit = [0], {}, [0]

    def failing_solve(blocks, rhs):
        sol, singular, broken = real_solve(blocks, rhs)
        calls[0] += 1
        if calls[0] in failing:
            broken = torch.ones_like(broken)
            return torch.zeros_like(sol), broken, broken
        return sol, singular, broken

    def recording_solve_passive(self, gram_ext):
        passive[calls[0] + 1] = int(self.valid.sum())  # passive points entering this solve
        if calls[0] + 1 in failing:
            inner_rows_hit[0] += int(self.pending.sum())
        return real_solve_passive(self, gram_ext)

    monkeypatch.setattr(nnls_module, "_solve_spd", failing_solve)
    monkeypatch.setattr(nnls_module._WorkingSet, "solve_passive", recording_solve_passive)
    sol = batched_nnls(gram, group, h, sigma, t.norm(dim=1), **kwargs)
    assert inner_rows_hit[0] > 0  # the forced failures did reach rows inside the inner loop
    assert min(passive[k] for k in (5, 6, 7)) >= passive[4] // 2
    assert bool(sol.converged.all()) and float(sol.kkt_violation.max()) < 1e-9
    for q in range(t.shape[0]):
        g = (sigma[q, :, None] * x).numpy()
        lam, _ = nnls(g.T, t[q].numpy(), maxiter=50 * g.shape[0])
        np.testing.assert_allclose(sol.lam[q].numpy(), lam, atol=1e-7)


@pytest.mark.parametrize("size", [12, nnls_module._TRIANGULAR_SOLVES_FROM + 16])
def test_passive_solves_match_scipy_on_both_paths(size):
    """``_solve_spd`` (cholesky_solve below ``_TRIANGULAR_SOLVES_FROM``, two triangular solves from
    there on) against scipy's ``cho_factor``/``cho_solve`` per block, with the flags: a block with a
    dependent column is singular (not broken), an indefinite one broken and solved as 0."""
    from scipy.linalg import cho_factor, cho_solve

    rng = np.random.default_rng(size)
    feats = rng.standard_normal((5, size, size + 7))
    blocks = feats @ feats.transpose(0, 2, 1)
    feats[3, -1] = feats[3, 0] + 1e-7 * rng.standard_normal(size + 7)  # nearly dependent: tiny pivot
    blocks[3] = feats[3] @ feats[3].T
    blocks[4] = -np.eye(size)  # indefinite: the factorization fails
    rhs = rng.standard_normal((5, size))
    sol, singular, broken = nnls_module._solve_spd(torch.from_numpy(blocks), torch.from_numpy(rhs))
    for b in range(3):
        ref = cho_solve(cho_factor(blocks[b], lower=True), rhs[b])
        np.testing.assert_allclose(sol[b].numpy(), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    assert singular.tolist() == [False, False, False, True, True]
    assert broken.tolist() == [False, False, False, False, True]
    assert bool((sol[4] == 0).all())


def test_passive_solves_off_the_cpu_never_call_cholesky_solve(monkeypatch):
    """On CUDA a batched ``cholesky_solve`` goes to MAGMA where torch is built with it, whose batched
    potrs allocates and frees device memory (a host synchronisation) on every call: off the CPU the
    passive blocks are always solved by triangular solves. The device is emulated by the meta device
    (shapes only); on the CPU small blocks keep ``cholesky_solve``."""
    calls = []
    original = torch.cholesky_solve
    monkeypatch.setattr(torch, "cholesky_solve", lambda *a, **k: calls.append(1) or original(*a, **k))
    blocks = torch.eye(12, dtype=torch.float64).expand(4, 12, 12).contiguous()
    rhs = torch.ones(4, 12, dtype=torch.float64)
    sol, _, _ = nnls_module._solve_spd(blocks.to("meta"), rhs.to("meta"))
    assert calls == [] and sol.shape == (4, 12) and sol.device.type == "meta"
    nnls_module._solve_spd(blocks, rhs)
    assert calls == [1]


def _linprog_separable(mans: np.ndarray, labels: np.ndarray) -> list[bool]:
    n_man, m, n_feat = mans.shape
    pts, owner = mans.reshape(-1, n_feat), np.repeat(np.arange(n_man), m)
    return [
        linprog(
            np.zeros(n_feat), A_ub=-(y[owner][:, None] * pts), b_ub=-np.ones(len(pts)), bounds=(None, None)
        ).status
        == 0
        for y in labels
    ]


def _count_exact_tests(monkeypatch) -> list[int]:
    """Count the dichotomies that reach the exact LDP test (one entry per call): the cheap
    certificates settled everything else."""
    calls: list[int] = []
    real_exact = glue_module.separable_dichotomies

    def counting_exact(*args, **kwargs):
        calls.append(args[2].shape[0])
        return real_exact(*args, **kwargs)

    monkeypatch.setattr(glue_module, "separable_dichotomies", counting_exact)
    return calls


@pytest.mark.parametrize("n_man,m,n_feat,spread", [(30, 50, 128, 1.0), (24, 10, 32, 1.5)])
def test_many_classes_are_certified_without_the_exact_test(monkeypatch, n_man, m, n_feat, spread):
    """Many classes of many points (P M = 11.7 N and 7.5 N), every dichotomy checked against scipy's
    linprog. 30 classes of 50 points around centers 3x their spread are certified by the class means'
    interpolant: the exact LDP test never runs (before, 7 of these 12 dichotomies went to it; at P = 100,
    M = 50, N = 512 it took 118 of 130 s). The looser 24 classes are partly non-separable and must still
    come out exactly as linprog says."""
    rng = np.random.default_rng(8)
    centers = 3 * rng.standard_normal((n_man, 1, n_feat)) / np.sqrt(n_feat)
    mans = centers + spread * rng.standard_normal((n_man, m, n_feat)) / np.sqrt(n_feat)
    labels = rng.choice([-1.0, 1.0], size=(12, n_man))
    expected = _linprog_separable(mans, labels)
    points = torch.from_numpy(mans)[None]
    mask = torch.ones(points.shape[:3], dtype=torch.bool)
    gram, _ = _normalised_gram(points, mask)
    exact_calls = _count_exact_tests(monkeypatch)
    got = _separable_probes(gram, mask, torch.from_numpy(labels)[None])
    assert got.tolist() == expected
    if spread == 1.0:
        assert all(expected) and exact_calls == []
    else:
        assert 0 < sum(expected) < len(expected) and exact_calls  # both kinds occur


def test_independence_test_deferred_until_the_class_means_leave_rows_open(monkeypatch):
    """Without the caller's Cholesky factor, the independence test (a T x T factorization per group) runs
    only for groups that the class-mean certificates leave open and that have at most N points; the
    answers are linprog's either way, with or without the factor, on a batch mixing independent
    separable points, dependent clouds with non-separable dichotomies, and more points than features."""
    rng = np.random.default_rng(5)
    n_feat = 24
    tight = 3.0 * rng.standard_normal((4, 1, n_feat)) + 0.1 * rng.standard_normal((4, 5, n_feat))
    loose = rng.standard_normal((4, 5, n_feat))  # 20 independent points: every sign pattern separable
    flat = rng.standard_normal((4, 5, 2)) @ rng.standard_normal((2, n_feat))  # rank 2: many are not
    groups = np.stack([tight, loose, flat])
    labels = rng.choice([-1.0, 1.0], size=(3, 16, 4))
    expected = [_linprog_separable(groups[b], labels[b]) for b in range(3)]
    assert all(expected[1]) and not all(expected[2])
    mask = torch.ones(3, 4, 5, dtype=torch.bool)
    gram, _ = _normalised_gram(torch.from_numpy(groups), mask)
    y = torch.from_numpy(labels)
    factorized: list[int] = []
    real_factor = glue_module._padded_cholesky

    def counting_factor(g, mk):
        factorized.append(g.shape[0])
        return real_factor(g, mk)

    monkeypatch.setattr(glue_module, "_padded_cholesky", counting_factor)
    with_factor = _separable_probes(gram, mask, y, real_factor(gram, mask))
    assert with_factor.view(3, 16).tolist() == expected
    deferred = _separable_probes(gram, mask, y)
    assert deferred.view(3, 16).tolist() == expected
    # The tight classes are certified by their means; the two others are factorized.
    assert factorized == [2]
    factorized.clear()
    # Told that the points have fewer features than the 20 points of a group, no group is factorized.
    assert _separable_probes(gram, mask, y, n_feat=19).view(3, 16).tolist() == expected
    assert factorized == []


def test_products_through_the_points_when_points_outnumber_twice_the_dimensions(monkeypatch):
    """12 classes of 20 points in 48 dimensions (T = 240 > 2 N): the solver's products K u go through
    the points, (u X) X^T. The multipliers equal those of the Gram path, and the markers scipy's
    per-probe reference."""
    rng = np.random.default_rng(12)
    n_man, m, n_feat = 12, 20, 48
    mans = geometry_clouds(rng, n_man, m, n_feat, 4, 0.5)
    t = rng.standard_normal((30, n_feat))
    y = rng.choice([-1.0, 1.0], size=(30, n_man))
    through_points = []
    real_times_gram = nnls_module._times_gram

    def spy(block, gram, points, minus_from=None):
        if minus_from is not None:  # the solver loop's dual (not the separability certificate's products)
            through_points.append(points is not None)
        return real_times_gram(block, gram, points, minus_from)

    monkeypatch.setattr(nnls_module, "_times_gram", spy)
    monkeypatch.setattr(nnls_module, "_SPARSE_PRODUCT_FRACTION", (0.0, 0.0))  # dense products (as on CUDA)
    res = glue(
        torch.from_numpy(mans), probes=torch.from_numpy(t), dichotomies=torch.from_numpy(y), warn=False
    )
    assert through_points and all(through_points)
    ref = reference_glue(list(mans), t, y)
    assert res.converged and res.kkt_violation < 1e-9
    for name in GLUE_MARKERS:
        assert float(getattr(res, name)) == pytest.approx(ref[name], rel=1e-7, abs=1e-12), name
    # The same NNLS through the Gram alone: the same multipliers.
    x = torch.from_numpy(mans.reshape(1, n_man * m, n_feat))
    x = x / x.square().sum(-1).mean().sqrt()
    gram = x @ x.mT
    h = (torch.from_numpy(t) @ x[0].T).contiguous()
    sigma = torch.from_numpy(y).repeat_interleave(m, dim=1)
    group = torch.zeros(30, dtype=torch.long)
    t_norm = torch.from_numpy(t).norm(dim=1)
    by_points = batched_nnls(gram, group, h, sigma, t_norm, block_size=m, points=x)
    by_gram = batched_nnls(gram, group, h, sigma, t_norm, block_size=m)
    torch.testing.assert_close(by_points.lam, by_gram.lam, rtol=1e-9, atol=1e-12)
    assert torch.equal(by_points.lam > 0, by_gram.lam > 0)


def _relu_classes(n_classes, m, n_feat, spread, seed=0):
    """Centred ReLU features of Gaussian classes in an 8-dimensional latent space (float64): barely
    separable or not at all, depending on ``spread`` and the number of classes."""
    g = torch.Generator().manual_seed(seed)
    lift = torch.randn(8, n_feat, generator=g, dtype=torch.float64) / 8**0.5
    means = spread * torch.randn(n_classes, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n_classes).repeat_interleave(m)
    x = torch.relu((means[y] + torch.randn(n_classes * m, 8, generator=g, dtype=torch.float64)) @ lift)
    return (x - x.mean(0)).view(n_classes, m, n_feat), g


@pytest.mark.parametrize("spread", [1.5, 0.5])
def test_glue_solutions_certify_separability_before_the_exact_test(monkeypatch, spread):
    """12 classes of 20 ReLU points in 48 dimensions (T = 5 N): with spread 1.5, 22 of 24 dichotomies are
    separable (linprog) but the class-mean certificates leave them to the exact test; the probes' own
    GLUE solutions (-r plus a lift of the support) certify them, and only the 2 non-separable ones reach
    it. With spread 0.5 none is separable and none may be certified. Either way the answer is linprog's."""
    mans, g = _relu_classes(12, 20, 48, spread)
    labels = (torch.randint(0, 2, (1, 24, 12), generator=g) * 2 - 1).double()
    probes = torch.randn(24, 48, generator=g, dtype=torch.float64)
    expected = _linprog_separable(mans.numpy(), labels[0].numpy())
    mask = torch.ones(1, 12, 20, dtype=torch.bool)
    gram, scale = _normalised_gram(mans[None], mask)
    h = (probes @ mans.reshape(-1, 48).T / scale).contiguous()
    sigma = labels[0].repeat_interleave(20, dim=1)
    sol = batched_nnls(gram, torch.zeros(24, dtype=torch.long), h, sigma, probes.norm(dim=1), block_size=20)
    exact_calls = _count_exact_tests(monkeypatch)
    assert _separable_probes(gram, mask, labels).tolist() == expected
    without = sum(exact_calls)
    exact_calls.clear()
    got = _separable_probes(gram, mask, labels, None, (sol.lam, h, probes.norm(dim=1)))
    assert got.tolist() == expected
    if spread == 1.5:
        assert sum(expected) == 22 and sum(exact_calls) == 2 < without
    else:
        assert not any(expected) and sum(exact_calls) == without
    monkeypatch.setattr(glue_module, "_ALGEBRA_ELEMENTS", 1)  # one probe's support block at a time
    assert torch.equal(_separable_probes(gram, mask, labels, None, (sol.lam, h, probes.norm(dim=1))), got)


def test_residual_certificate_never_certifies_a_non_separable_dichotomy():
    """The certificate checks the margins of the direction it builds, so even arbitrary (non-optimal)
    multipliers can only fail to certify, never certify wrongly: on classes where linprog finds no
    dichotomy separable, nothing is certified, for the optimal and for random multipliers."""
    mans, g = _relu_classes(12, 20, 48, 0.5, seed=1)
    labels = (torch.randint(0, 2, (24, 12), generator=g) * 2 - 1).double()
    assert not any(_linprog_separable(mans.numpy(), labels.numpy()))
    x = mans.reshape(-1, 48)
    gram = (x @ x.T)[None]
    probes = torch.randn(24, 48, generator=g, dtype=torch.float64)
    h = probes @ x.T
    sigma = labels.repeat_interleave(20, dim=1)
    group = torch.zeros(24, dtype=torch.long)
    optimal = batched_nnls(gram, group, h, sigma, probes.norm(dim=1), block_size=20).lam
    sparse_random = torch.rand(24, 240, generator=g, dtype=torch.float64) * (
        torch.rand(24, 240, generator=g) < 0.05
    )
    norms = x.norm(dim=1).expand(24, -1)
    for lam in (optimal, sparse_random):
        certified = glue_module._residual_certificate(
            gram, group, sigma, torch.ones(24, 240, dtype=torch.bool), norms, lam, h, probes.norm(dim=1)
        )
        assert not certified.any()


def test_passive_blocks_in_row_chunks_give_the_same_solution(monkeypatch):
    """The (rows, S, S) passive blocks are formed in row chunks when large: one row at a time gives the
    same iterations, supports and answers, and multipliers equal to round-off (LAPACK's batched and
    single factorizations may round differently), for the GLUE solve and for the exact separability test
    (rank-one term)."""
    rng = np.random.default_rng(21)
    x, t, sigma, gram, h, group = _nnls_problem(rng, 6, 20, 64, 10, 2.0, 12)
    t_norm = t.norm(dim=1)
    unit = gram / gram.diagonal(dim1=-2, dim2=-1).mean()
    whole = batched_nnls(gram, group, h, sigma, t_norm, block_size=20)
    whole_sep = separable_dichotomies(unit, group, sigma)
    monkeypatch.setattr(nnls_module, "_PASSIVE_ELEMENTS", 1)
    chunked = batched_nnls(gram, group, h, sigma, t_norm, block_size=20)
    assert whole.iterations > 5 and chunked.iterations == whole.iterations
    assert torch.equal(chunked.lam > 0, whole.lam > 0) and bool(chunked.converged.all())
    torch.testing.assert_close(chunked.lam, whole.lam, rtol=1e-12, atol=1e-14)
    assert torch.equal(separable_dichotomies(unit, group, sigma), whole_sep)


@pytest.mark.parametrize("fraction", [(0.0, 0.0), (1.0, 1.0)], ids=["dense-products", "sparse-products"])
def test_separability_with_glue_solutions_matches_linprog_on_random_small_sets(monkeypatch, fraction):
    """60 random small sets (2-4 classes of 2-8 points in 2-8 dimensions, clustered or not, some with a
    zero point or a duplicated one), 6 dichotomies each: the separability answer, with the probes' GLUE
    solutions offered as certificates, equals scipy's linprog on every dichotomy, and the residual
    certificate does settle some of them (this seed: 33 of the 208 it is offered). On both routes of the
    products K u (the residual certificate's and the solver's)."""
    monkeypatch.setattr(nnls_module, "_SPARSE_PRODUCT_FRACTION", fraction)
    rng = np.random.default_rng(0)
    offered, certified = [], []
    real_certificate = glue_module._residual_certificate

    def spy(*args):
        out = real_certificate(*args)
        offered.append(out.numel())
        certified.append(int(out.sum()))
        return out

    for trial in range(60):
        n_man, m, n_feat = (int(v) for v in rng.integers((2, 2, 2), (5, 9, 9)))
        spread = rng.uniform(0, 3)
        mans = spread * rng.standard_normal((n_man, 1, n_feat)) + rng.uniform(0.1, 1.5) * rng.standard_normal(
            (n_man, m, n_feat)
        )
        if trial % 5 == 0:
            mans[0, 0] = 0.0  # never strictly separable
        if trial % 7 == 0:
            mans[1, 1] = mans[1, 0]
        labels = rng.choice([-1.0, 1.0], size=(6, n_man))
        probes = torch.from_numpy(rng.standard_normal((6, n_feat)))
        points = torch.from_numpy(mans)[None]
        mask = torch.ones(1, n_man, m, dtype=torch.bool)
        gram, scale = _normalised_gram(points, mask)
        h = (probes @ points.reshape(-1, n_feat).T / scale).contiguous()
        sigma = torch.from_numpy(labels).repeat_interleave(m, dim=1)
        lam = batched_nnls(
            gram, torch.zeros(6, dtype=torch.long), h, sigma, probes.norm(dim=1), block_size=m
        ).lam
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(glue_module, "_residual_certificate", spy)
            got = _separable_probes(
                gram, mask, torch.from_numpy(labels)[None], None, (lam, h, probes.norm(dim=1))
            )
        assert got.tolist() == _linprog_separable(mans, labels), trial
    assert sum(certified) > 0 and sum(offered) > sum(certified)


def _nnls_case(case: str, rng: np.random.Generator):
    """Inputs of ``batched_nnls`` (gram, group, h, sigma, t_norm, block size, points) and the signed
    constraint matrices G_q (T, N) of each row, for the product-route tests."""
    if case == "pairs":  # several groups: 4 class pairs of 2 x 15 points in 40 dimensions
        x = torch.from_numpy(geometry_clouds(rng, 8, 15, 40, 6, 1.5).reshape(4, 30, 40))
        n_t, m = 12, 15
    elif case == "joint":  # one group: 6 classes of 20 points in 150 dimensions
        x = torch.from_numpy(geometry_clouds(rng, 6, 20, 150, 10, 2.0).reshape(1, 120, 150))
        n_t, m = 40, 20
    else:  # "points": 12 classes of 20 points in 48 dimensions, T = 240 > 2 N
        x = torch.from_numpy(geometry_clouds(rng, 12, 20, 48, 4, 0.5).reshape(1, 240, 48))
        n_t, m = 30, 20
    n_groups, n_points, n_feat = x.shape
    x = x / x.square().sum(-1).mean().sqrt()
    t = torch.from_numpy(rng.standard_normal((n_groups, n_t, n_feat)))
    y = torch.from_numpy(rng.choice([-1.0, 1.0], size=(n_groups * n_t, n_points // m)))
    sigma = y.repeat_interleave(m, dim=1)
    group = torch.arange(n_groups).repeat_interleave(n_t)
    h = torch.einsum("btn,bqn->bqt", x, t).reshape(-1, n_points)
    signed = sigma[:, :, None] * x[group]  # (Q, T, N)
    return (x @ x.mT, group, h, sigma, t.norm(dim=-1).reshape(-1), m, x), signed, t.reshape(-1, n_feat)


@pytest.mark.parametrize("case", ["pairs", "joint", "points"])
def test_sparse_and_dense_products_give_scipys_solution(monkeypatch, case):
    """The products K u (each iteration's dual and the final certificate) go through a sparse matrix of
    the multipliers on the CPU when the supports are small, through dense GEMMs otherwise (and always
    on CUDA). Forced either way, on several groups, one group and the route through the points
    (T > 2 N), the solver gives scipy's NNLS solution, and the two routes the same multipliers."""
    (gram, group, h, sigma, t_norm, m, x), signed, t = _nnls_case(case, np.random.default_rng(3))
    calls = []
    real_sparse = nnls_module._sparse_times

    def spy(*args, **kwargs):
        calls.append(1)
        return real_sparse(*args, **kwargs)

    monkeypatch.setattr(nnls_module, "_sparse_times", spy)
    solutions = {}
    for route, fraction in (("dense", (0.0, 0.0)), ("sparse", (1.0, 1.0))):
        monkeypatch.setattr(nnls_module, "_SPARSE_PRODUCT_FRACTION", fraction)
        calls.clear()
        sol = batched_nnls(
            gram, group, h, sigma, t_norm, block_size=m, points=x if case == "points" else None
        )
        assert bool(sol.converged.all()) and float(sol.kkt_violation.max()) < 1e-10
        assert (len(calls) > 0) == (route == "sparse")  # the route really taken
        solutions[route] = sol
    torch.testing.assert_close(solutions["sparse"].lam, solutions["dense"].lam, rtol=1e-9, atol=1e-12)
    for q in range(0, h.shape[0], 7):
        lam_ref = nnls(signed[q].numpy().T, t[q].numpy())[0]
        g = signed[q].numpy()
        np.testing.assert_allclose(g.T @ solutions["sparse"].lam[q].numpy(), g.T @ lam_ref, atol=1e-9)
        if case != "points":  # with more points than dimensions only the projection is unique
            np.testing.assert_allclose(solutions["sparse"].lam[q].numpy(), lam_ref, atol=1e-7)


def test_sparse_products_in_the_separability_test(monkeypatch):
    """The exact separability test (the solver with a rank-one term) gives the same answers on both
    routes of the products, and they agree with a linear program."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(geometry_clouds(rng, 6, 10, 6, 6, 2.0).reshape(3, 20, 6))
    x = x / x.norm(dim=-1, keepdim=True)
    sigma = torch.from_numpy(rng.choice([-1.0, 1.0], size=(3 * 8, 2))).repeat_interleave(10, dim=1)
    group = torch.arange(3).repeat_interleave(8)
    flags = {}
    for fraction in (0.0, 1.0):
        monkeypatch.setattr(nnls_module, "_SPARSE_PRODUCT_FRACTION", (fraction, fraction))
        flags[fraction] = separable_dichotomies(x @ x.mT, group, sigma)
    assert torch.equal(flags[0.0], flags[1.0])
    assert 0 < int(flags[1.0].sum()) < len(group)  # both answers occur
    for q in range(len(group)):  # sigma_i <v, x_i> >= 1 feasible?
        a = -(sigma[q, :, None] * x[group[q]]).numpy()
        lp = linprog(np.zeros(6), A_ub=a, b_ub=-np.ones(20), bounds=[(None, None)] * 6, method="highs")
        assert bool(flags[1.0][q]) == (lp.status == 0), q


def test_sparse_products_only_on_the_cpu_and_for_small_supports():
    """The route of the products: sparse on the CPU up to an eighth of the dense product's inner size
    (T, or 2 N through the points) with one group (divided by the threads), a quarter with several;
    never on CUDA (a sparse product there reads its size on the host)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    route = nnls_module._sparse_products
    with limit_threads(1):
        assert route(cpu, 62, 500, None, 1) and not route(cpu, 63, 500, None, 1)
        assert route(cpu, 25, 100, None, 45) and not route(cpu, 26, 100, None, 45)
        assert route(cpu, 10, 500, 40, 1) and not route(cpu, 11, 500, 40, 1)  # through the points: 80
        assert not route(cuda, 1, 1000, None, 1)
    with limit_threads(2):  # one group's GEMM has two threads, the sparse product one: half the fraction
        assert route(cpu, 31, 500, None, 1) and not route(cpu, 32, 500, None, 1)
        assert route(cpu, 25, 100, None, 45) and not route(cpu, 26, 100, None, 45)


@pytest.mark.parametrize("n_groups,n_man,radius", [(6, 2, 1.0), (2, 3, 1.0), (2, 4, 0.5)])
def test_class_mean_certificates_once_per_sign_pattern(monkeypatch, n_groups, n_man, radius):
    """With fewer sign patterns (2^(P-1), up to a global sign) than probes, the class-mean certificates
    run once per pattern and are read off per probe: the same answers as running them per probe, and
    the exact test's. On these clouds the class means certify some patterns and not others, and some
    dichotomies are not separable, so a probe read off the wrong pattern would be caught."""
    rng = np.random.default_rng(8)
    m, n_feat, n_t = 12, 6, 40  # T = P M > N: dependent points, so the certificates decide
    mans = geometry_clouds(rng, n_groups * n_man, m, n_feat, 6, radius)
    points = torch.from_numpy(mans.reshape(n_groups, n_man, m, n_feat))
    mask = torch.ones(points.shape[:3], dtype=torch.bool)
    gram, _ = _normalised_gram(points, mask)
    labels = torch.from_numpy(rng.choice([-1.0, 1.0], size=(n_groups, n_t, n_man)))
    real_patterns = glue_module._sign_patterns
    calls = []

    def spy(y):
        calls.append(y.shape)
        return real_patterns(y)

    monkeypatch.setattr(glue_module, "_sign_patterns", spy)
    by_pattern = _separable_probes(gram, mask, labels)
    assert calls  # the pattern path ran
    monkeypatch.setattr(glue_module, "_sign_patterns", lambda y: (y, None))  # per probe
    per_probe = _separable_probes(gram, mask, labels)
    assert torch.equal(by_pattern, per_probe)
    sigma = labels.repeat_interleave(m, dim=2).reshape(n_groups * n_t, -1)
    exact = separable_dichotomies(gram, torch.arange(n_groups).repeat_interleave(n_t), sigma)
    assert torch.equal(by_pattern, exact)
    assert 0 < int(exact.sum()) < exact.numel()  # both answers occur


@pytest.mark.parametrize("rank_one", [False, True], ids=["plain", "rank-one"])
@pytest.mark.parametrize("fraction", [(0.0, 0.0), (1.0, 1.0)], ids=["dense-products", "sparse-products"])
@pytest.mark.parametrize("case", ["pairs", "joint"])
def test_kkt_certificate_matches_the_direct_formula_for_any_multipliers(
    monkeypatch, case, fraction, rank_one
):
    """The solver's certificate, for arbitrary non-negative multipliers (sparse, random: neither
    stationary on their support nor feasible off it), equals the formulas computed directly in numpy:
    with the signed constraint rows g_i and r = t - G^T lambda, w_i = g_i . r / ||g_i||, the violation
    max_i (|w_i| if lambda_i > 0 else max(w_i, 0)) / ||t||, and the projection lambda . (G t). With a
    rank-one term each row g_i gains the coordinate sigma_i v_i (and t the coordinate t0), as in the
    separability test. Both product routes."""
    monkeypatch.setattr(nnls_module, "_SPARSE_PRODUCT_FRACTION", fraction)
    rng = np.random.default_rng(7)
    (gram, group, h, sigma, t_norm, _, x), signed, t = _nnls_case(case, rng)
    n_rows, n_points = h.shape
    lam = torch.from_numpy(rng.exponential(size=(n_rows, n_points)) * (rng.random((n_rows, n_points)) < 0.1))
    v, t0 = None, np.zeros(n_rows)
    if rank_one:
        v = torch.from_numpy(rng.standard_normal((n_rows, n_points)))
        t0 = rng.standard_normal(n_rows)
        h = h + v * torch.from_numpy(t0)[:, None]
        t_norm = (t_norm.square() + torch.from_numpy(t0).square()).sqrt()
    col2 = gram.diagonal(dim1=-2, dim2=-1)[group] + (0.0 if v is None else v.square())
    sig_inv = sigma / col2.sqrt()
    layout = nnls_module._layout(group, gram.shape[0])
    kkt, proj = nnls_module._certificate(gram, lam, h, sigma, sig_inv, t_norm, layout, v, None)
    support_decides = 0
    for q in range(n_rows):
        g, lam_q, t_q = signed[q].numpy(), lam[q].numpy(), t[q].numpy()
        if rank_one:
            g = np.concatenate([g, (sigma[q] * v[q]).numpy()[:, None]], axis=1)
            t_q = np.append(t_q, t0[q])
        w = g @ (t_q - g.T @ lam_q) / np.linalg.norm(g, axis=1)
        on, off = np.abs(w[lam_q > 0]).max(initial=0.0), np.maximum(w[lam_q <= 0], 0.0).max(initial=0.0)
        np.testing.assert_allclose(float(kkt[q]), max(on, off) / np.linalg.norm(t_q), rtol=1e-9)
        np.testing.assert_allclose(float(proj[q]), lam_q @ (g @ t_q), rtol=1e-9, atol=1e-12)
        support_decides += bool(-w[lam_q > 0].min(initial=0.0) > max(w.max(), 0.0))
    # Not vacuous: for many rows the largest violation is a negative w_i on the support (feasible off
    # it), which a certificate that skipped stationarity there would miss.
    assert support_decides > n_rows // 10


def test_a_chunk_owner_interrupted_before_its_turn_releases_the_threads_waiting_for_later_turns(monkeypatch):
    """glue_pairs' chunks draw their randoms in turn. An owner interrupted while waiting for its turn
    never advanced the turn, so with three or more threads a helper holding a later chunk waited forever
    (and the caller with it). Now the interrupt is raised and no thread is left waiting."""

    class Interrupt(BaseException):  # stands for KeyboardInterrupt (which pytest would act on itself)
        pass

    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat_interleave(20)
    x = 2 * torch.randn(6, 48, generator=g)[y] + torch.randn(120, 48, generator=g)
    per_pair = 30 * (48 + 16 * 2 * 15) + 2 * 15 * (48 + 2 * 15)
    monkeypatch.setattr(protocols_module, "_CHUNK_ELEMENTS", per_pair)  # 15 chunks of one pair
    monkeypatch.setattr(protocols_module, "available_cpus", lambda: 3)
    main = threading.main_thread()

    helper_waiting, raised = threading.Event(), []

    class InterruptedCondition(threading.Condition):
        enters = 0

        def wait_for(self, predicate, timeout=None):
            if threading.current_thread() is not main and not predicate():
                helper_waiting.set()  # a helper holds a later chunk and waits for its turn
            return super().wait_for(predicate, timeout)

        def __enter__(self):
            if threading.current_thread() is main and not raised:
                InterruptedCondition.enters += 1
                if InterruptedCondition.enters >= 2:  # the caller, before it drew its second chunk...
                    deadline = time.monotonic() + 10
                    while not helper_waiting.is_set() and time.monotonic() < deadline:
                        time.sleep(0.005)
                    raised.append(True)  # ...is interrupted while a helper waits for a later turn
                    raise Interrupt
            return super().__enter__()

    class Shim:  # protocols' view of the threading module, with the interrupting condition
        Condition = InterruptedCondition

        def __getattr__(self, name):
            return getattr(threading, name)

    monkeypatch.setattr(protocols_module, "threading", Shim())
    outcome: list[object] = []

    def call():
        try:
            glue_pairs(x, y, points_per_class=15, n_pairs=None, n_t=30, generator=4, workers=3, warn=False)
            outcome.append("finished")
        except Interrupt:
            outcome.append("interrupted")

    before = set(threading.enumerate())
    call()  # on the main thread: the interrupt is raised there
    assert helper_waiting.is_set() and outcome == ["interrupted"]
    deadline = time.monotonic() + 30
    while set(threading.enumerate()) - before and time.monotonic() < deadline:  # the pool winds down
        time.sleep(0.05)
    assert not set(threading.enumerate()) - before


def test_pairs_drawn_by_index_are_those_of_the_combinations_order():
    """glue_pairs decodes the drawn pairs from their indices instead of listing every pair (a list of
    C(C-1)/2 tuples: 2.4 GB at 8000 classes for 100 pairs): the same pairs as itertools', so the same
    draws and results as before."""
    for n in (2, 3, 4, 7, 50, 301):
        every = list(itertools.combinations(range(n), 2))
        assert _pairs_at(torch.arange(len(every)), n) == every
        pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(n))[: max(1, n // 2)]
        assert _pairs_at(pick.sort().values, n) == [every[k] for k in pick.sort().values.tolist()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probes_of_one_dichotomy_get_one_separability_verdict(seed):
    """All probes share the dichotomy (+1, +1), separable with a unit margin of 9.4e-6 (scipy's linprog
    finds a separating direction). Some probes' own solutions certified it and the others went to the
    exact test, whose threshold calls margins below ~3e-5 non-separable: 9, 10 or 14 of the 20 probes
    were counted degenerate, with a NonSeparableWarning."""
    rng = np.random.default_rng(1)
    x1, x2, x3 = rng.standard_normal((3, 6))
    mans = [np.stack([x1, x2]), np.stack([-(x1 + x2) + 1e-4 * x3, x3])]
    signed = np.concatenate(mans)
    signed /= np.linalg.norm(signed, axis=1, keepdims=True)
    lp = linprog(np.zeros(6), A_ub=-signed, b_ub=-np.ones(4), bounds=[(None, None)] * 6, method="highs")
    assert lp.status == 0  # separable
    probes = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonSeparableWarning)
        result = glue(
            [torch.tensor(m) for m in mans], probes=probes, dichotomies=torch.ones(20, 2, dtype=torch.float64)
        )
    assert result.n_degenerate == 0


def test_marker_algebra_in_probe_chunks_equals_one_pass(monkeypatch):
    """The algebra after the NNLS (a, b, c and the alignments' sums) runs a bounded number of probes at a
    time: the (probes, P, P) arrays grew as n_t P^2 (+1.5 GB at P = 300, M = 2). One probe per chunk,
    across the pairs' groups and within one joint group, gives the same markers."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(6).repeat_interleave(20)
    x = 2 * torch.randn(6, 48, generator=g)[y] + torch.randn(120, 48, generator=g)
    pairs = glue_pairs(x, y, points_per_class=15, n_pairs=None, n_t=30, generator=4)
    joint = glue(x.reshape(6, 20, 48), n_t=40, generator=4)
    monkeypatch.setattr(glue_module, "_ALGEBRA_ELEMENTS", 1)  # one probe at a time, the pairs in one chunk
    chunked_pairs = glue_pairs(x, y, points_per_class=15, n_pairs=None, n_t=30, generator=4)
    chunked_joint = glue(x.reshape(6, 20, 48), n_t=40, generator=4)
    for name in GLUE_MARKERS:
        np.testing.assert_allclose(
            chunked_pairs.per_pair[name].numpy(), pairs.per_pair[name].numpy(), rtol=1e-12
        )
        assert float(getattr(chunked_joint, name)) == pytest.approx(float(getattr(joint, name)), rel=1e-12)
