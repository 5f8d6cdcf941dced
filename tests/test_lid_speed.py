"""The faster LID paths against independent references and against the paths they replace.

* cached working blocks (``_candidates``): any cache budget gives the same candidates, and each block is
  made once when the cache holds them all (at most once per panel otherwise);
* the pruned exact recomputation (float32 certificate): only candidates that can be among the k nearest
  are recomputed, each unordered pair once, and the distances equal a brute-force float64 and a cKDTree
  reference;
* a log-ratio that overflows (a denormal distance next to 1) stays finite.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

import lightning_geomarkers.functional.intrinsic_dimension as lid_module
import lightning_geomarkers.functional.preprocessing as prep
from lightning_geomarkers.functional import local_intrinsic_dimension
from lightning_geomarkers.functional.preprocessing import _Blocks


def clouds(seed: int, n_rows: int = 240, n_cols: int = 24) -> np.ndarray:
    """Anisotropic clusters with an offset (centring matters) and a ReLU (ties at zero coordinates)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, n_cols)) * 3.0
    x = centres[rng.integers(0, 6, n_rows)] + rng.normal(size=(n_rows, n_cols)) * np.linspace(0.1, 1, n_cols)
    return np.maximum(x, 0.0) + 5.0


def brute_force_knn(x: np.ndarray, k: int) -> np.ndarray:
    d = cdist(x, x)  # from differences, float64
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidates_equal_for_every_cache_budget(monkeypatch, dtype):
    x = torch.from_numpy(clouds(0)).to(dtype)
    monkeypatch.setattr(prep, "_BLOCK_ELEMENTS", 960)  # blocks of isqrt(960) = 30 rows: 8 blocks
    blocks = _Blocks(x, centered=True)
    sq = lid_module._squared_norms(blocks)
    made = []
    original = _Blocks.block
    monkeypatch.setattr(_Blocks, "block", lambda self, *a: made.append(1) or original(self, *a))
    results = {}
    block_bytes = 30 * 24 * torch.empty((), dtype=dtype).element_size()
    for n_cached in (1, 3, 8, 100):
        monkeypatch.setattr(lid_module, "_CACHE_BYTES", n_cached * block_bytes)
        made.clear()
        results[n_cached] = lid_module._candidates(blocks, 12, sq, dtype)
        panels = math.ceil(8 / n_cached)
        # each panel's blocks once, then every later block once per panel
        expected = 8 + sum(max(0, 8 - (p + 1) * n_cached) for p in range(panels))
        assert len(made) == expected, (n_cached, len(made))
    assert results[100][0].shape == (240, 12)
    for n_cached in (1, 3, 8):
        torch.testing.assert_close(results[n_cached][0], results[100][0], rtol=0, atol=0)
        assert torch.equal(results[n_cached][1].sort(dim=1).values, results[100][1].sort(dim=1).values)
    # the candidates' values are the Gram proxies ||w_j||^2 - 2 <w_i, w_j> of the nearest points
    w = x.double().numpy() - x.double().numpy().mean(axis=0)
    proxy = (w**2).sum(axis=1)[None, :] - 2 * w @ w.T
    np.fill_diagonal(proxy, np.inf)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(
        results[100][0].numpy(),
        np.sort(proxy, axis=1)[:, :12],
        atol=tol * np.abs(proxy[np.isfinite(proxy)]).max(),
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_pruned_exact_distances_equal_brute_force(monkeypatch, seed):
    x = clouds(seed)
    k = 10
    monkeypatch.setattr(lid_module, "_FLOAT32_MIN_WORK", 0)  # the float32 path with the certificate
    monkeypatch.setattr(prep, "_BLOCK_ELEMENTS", 24 * 40)
    pairs = []
    original = _Blocks.raw_difference
    monkeypatch.setattr(
        _Blocks, "raw_difference", lambda self, a, b: pairs.append(a.numel()) or original(self, a, b)
    )
    got = lid_module._neighbour_distances(_Blocks(torch.from_numpy(x), centered=True), k).numpy()
    np.testing.assert_allclose(got, brute_force_knn(x, k), rtol=1e-13, atol=0)
    ref, _ = cKDTree(x).query(x, k=k + 1)
    np.testing.assert_allclose(got, ref[:, 1:], rtol=1e-12, atol=0)
    n_candidates = k + lid_module._EXTRA_CANDIDATES
    # fewer differences than one per (row, candidate): pruning and shared (i, j) / (j, i) pairs
    assert k * len(x) / 2 <= sum(pairs) < 0.8 * n_candidates * len(x)


def test_pruned_path_gives_the_float64_paths_estimate(monkeypatch):
    x = clouds(3, n_rows=300, n_cols=16)
    full = float(local_intrinsic_dimension(x, k=12))  # small problem: float64 Gram, every candidate exact
    monkeypatch.setattr(lid_module, "_FLOAT32_MIN_WORK", 0)
    pruned = float(local_intrinsic_dimension(x, k=12))
    d = brute_force_knn(x, 12)
    ref = np.mean(1.0 / (np.log(d[:, -1:] / d[:, :-1]).sum(axis=1) / 11))
    np.testing.assert_allclose(pruned, full, rtol=1e-13)
    np.testing.assert_allclose(pruned, ref, rtol=1e-12)


def test_exact_distances_of_all_candidates_equal_cdist():
    x = clouds(4, n_rows=60, n_cols=7)
    blocks = _Blocks(torch.from_numpy(x), centered=True)
    rng = np.random.default_rng(4)
    neighbours = torch.from_numpy(rng.integers(0, 60, size=(60, 9)))
    rows = torch.arange(60)
    got = lid_module._exact_distances(blocks, rows, neighbours).numpy()
    np.testing.assert_allclose(
        got, cdist(x, x)[np.arange(60)[:, None], neighbours.numpy()], rtol=1e-14, atol=0
    )
    keep = torch.from_numpy(rng.random((60, 9)) < 0.5)
    masked = lid_module._exact_distances(blocks, rows, neighbours, keep=keep).numpy()
    assert np.array_equal(masked[keep.numpy()], got[keep.numpy()])
    assert np.isinf(masked[~keep.numpy()]).all()


def test_overflowing_distance_ratio_stays_finite():
    # distances 5e-324 and 1: their ratio overflows float64; log(1) - log(5e-324) does not
    x = np.array([[1.0], [5e-324], [0.0]])
    expected = 3.0 / (2.0 * -math.log(5e-324))
    np.testing.assert_allclose(float(local_intrinsic_dimension(x, k=2, method="twonn")), expected, rtol=1e-12)


def test_tight_cluster_at_the_centre_is_redone_in_float64(monkeypatch):
    # A tight cluster at the centre (|w_i| tiny) among far points (sq_max large): float32 proxies cannot
    # rank the tight points' neighbours against the far points' scale, so the certificate (Gram term and
    # proxy rounding) must send those rows to the float64 redo; every distance matches the reference.
    rng = np.random.default_rng(14)
    far = rng.normal(size=(150, 8)) * 100.0
    far -= far.mean(axis=0)
    tight = rng.normal(size=(60, 8)) * 1e-4
    x = np.concatenate([far, tight - tight.mean(axis=0)])
    monkeypatch.setattr(lid_module, "_FLOAT32_MIN_WORK", 0)
    redone = []
    original = lid_module._candidates_of
    monkeypatch.setattr(
        lid_module, "_candidates_of", lambda b, rows, *a: redone.append(rows.numel()) or original(b, rows, *a)
    )
    got = lid_module._neighbour_distances(_Blocks(torch.from_numpy(x), centered=True), 6).numpy()
    np.testing.assert_allclose(got, brute_force_knn(x, 6), rtol=1e-12, atol=0)
    assert redone and redone[0] >= 60  # at least the tight cluster


@pytest.mark.parametrize(
    ("scale", "dtype"),
    [
        (1e50, np.float64),
        (1e30, np.float64),
        (1e-30, np.float64),
        (1e-50, np.float64),
        (1e36, np.float32),
        (1e-30, np.float32),
    ],
)
def test_float32_candidates_at_extreme_scales(monkeypatch, scale, dtype):
    # Working values far outside float32's comfortable range (squares overflow or underflow it) are
    # rescaled by a power of two before the float32 Gram: the estimate equals the reference at any scale.
    base = np.random.default_rng(15).normal(size=(200, 10)) @ np.diag(np.linspace(0.2, 2, 10))
    x = (base * scale).astype(dtype)
    monkeypatch.setattr(lid_module, "_FLOAT32_MIN_WORK", 0)
    x64 = x.astype(np.float64)
    dist, _ = cKDTree(x64).query(x64, k=11)
    t = dist[:, 1:]
    ref = np.mean(1.0 / (np.log(t[:, -1:] / t[:, :-1]).sum(axis=1) / 9))
    np.testing.assert_allclose(float(local_intrinsic_dimension(x, k=10)), ref, rtol=1e-12)
