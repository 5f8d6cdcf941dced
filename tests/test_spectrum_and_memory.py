"""The shared spectrum, block-bounded markers and GLUE standard errors, against independent references.

* ``feature_spectrum`` (eigenvalues of the smaller Gram side) against ``numpy.linalg.svd`` in float64, also
  on ill-conditioned inputs, and the three spectral markers fed with it against direct SVD formulas;
* ``geometry_markers`` decomposes once and returns that spectrum;
* every blocked computation gives the same result with tiny blocks (chunked == unchunked);
* peak memory of the non-GLUE markers stays bounded (maxrss in a subprocess);
* standard errors against a direct numpy jackknife loop and a Monte-Carlo spread over seeds.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

import lightning_geomarkers.functional.intrinsic_dimension as lid_module
import lightning_geomarkers.functional.preprocessing as prep
import lightning_geomarkers.functional.suite as suite_module
from lightning_geomarkers.errors import GeomarkersWarning
from lightning_geomarkers.functional import (
    MARKERS,
    center,
    effective_rank,
    feature_spectrum,
    geometry_markers,
    glue,
    glue_pairs,
    glue_standard_errors,
    jackknife_standard_errors,
    local_intrinsic_dimension,
    neural_collapse,
    numerical_rank,
    pairs_standard_errors,
    participation_ratio,
    random_projection,
    within_class_distance,
)
from lightning_geomarkers.functional.preprocessing import _center_project
from lightning_geomarkers.utilities import SharedWork, limit_threads, torch_thread_pool

EPS = np.finfo(np.float64).eps


def ref_singular_values(x, centered=True):
    x = np.asarray(x, dtype=np.float64)
    return np.linalg.svd(x - x.mean(axis=0) if centered else x, compute_uv=False)


def ref_markers_from_svd(s, rtol=1e-3):
    lam = s**2
    pr = lam.sum() ** 2 / (lam**2).sum()
    rank = int((s >= rtol * s[0]).sum())
    p = s / s.sum()
    p = p[p > 0]
    return pr, rank, float(np.exp(-(p * np.log(p)).sum()))


def with_spectrum(rng, n_rows, n_cols, singular_values):
    """Centred ``(n_rows, n_cols)`` matrix with the given singular values (random orthonormal factors)."""
    r = len(singular_values)
    u, _ = np.linalg.qr(rng.normal(size=(n_rows, r)))
    u -= u.mean(axis=0)  # centred columns (then re-orthonormalised)
    u, _ = np.linalg.qr(u)
    v, _ = np.linalg.qr(rng.normal(size=(n_cols, r)))
    return (u * singular_values) @ v.T + rng.normal(size=n_cols) * 10.0  # plus an offset: centring matters


# ----------------------------------------------------------------------------------------------------
# The spectrum
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_rows", "n_cols"), [(300, 40), (40, 300), (64, 64), (1, 5), (7, 1)])
@pytest.mark.parametrize("centered", [True, False])
def test_feature_spectrum_matches_numpy_svd(n_rows, n_cols, centered):
    x = np.random.default_rng(n_rows * n_cols).normal(size=(n_rows, n_cols)) * 3.0 + 1.0
    got = feature_spectrum(x, centered=centered).numpy()
    ref = ref_singular_values(x, centered)
    assert got.shape == (min(n_rows, n_cols),) and np.all(np.diff(got) <= 0)
    resolved = ref > np.sqrt(10 * min(x.shape) * EPS) * ref.max()
    np.testing.assert_allclose(got[resolved], ref[resolved], rtol=1e-9)
    # Below the Gram route's resolution everything is round-off: zero or tiny.
    assert np.all(got[~resolved] <= np.sqrt(10 * min(x.shape) * EPS) * ref.max())


@pytest.mark.parametrize(("n_rows", "n_cols"), [(400, 60), (60, 400)])
def test_spectrum_on_ill_conditioned_input(n_rows, n_cols):
    # Singular values spread over 12 decades, one group straddling rtol = 1e-3.
    rng = np.random.default_rng(1)
    sv = np.concatenate([np.logspace(0, -12, 40), [1.0001e-3, 0.9999e-3]])
    x = with_spectrum(rng, n_rows, n_cols, sv)
    ref = ref_singular_values(x)
    got = feature_spectrum(x).numpy()
    n = min(x.shape)
    # The precision claim: values above 1e-3 sigma_max (eigenvalues above 1e-6 lambda_max) to 1e-6 relative.
    big = ref >= 1e-3 * ref[0]
    np.testing.assert_allclose(got[big], ref[big], rtol=1e-6)
    # Absolute error of every value bounded by the Gram floor sqrt(n eps) sigma_max (up to a small factor).
    assert np.max(np.abs(got - ref)) <= 4 * np.sqrt(n * EPS) * ref[0]
    pr, rank, erank = ref_markers_from_svd(ref)
    spectrum = torch.from_numpy(got)
    assert int(numerical_rank(x, spectrum=spectrum)) == rank == int(numerical_rank(x))
    np.testing.assert_allclose(float(participation_ratio(x, spectrum=spectrum)), pr, rtol=1e-9)
    # Effective rank: the unresolved tail moves it by at most k sqrt(n eps) (1 + log(1 / sqrt(n eps))).
    tail = np.sqrt(n * EPS)
    bound = n * tail * (1 + np.log(1 / tail))
    assert abs(float(effective_rank(x, spectrum=spectrum)) - erank) <= bound * erank
    assert abs(float(effective_rank(x)) - erank) <= 1e-4 * erank


@pytest.mark.parametrize(("n_rows", "n_cols"), [(200, 30), (30, 200)])
def test_shared_spectrum_equals_direct_marker_formulas(n_rows, n_cols):
    x = np.random.default_rng(2).normal(size=(n_rows, n_cols)) @ np.diag(np.linspace(0.1, 3, n_cols))
    ref = ref_singular_values(x)
    pr, rank, erank = ref_markers_from_svd(ref)
    spectrum = feature_spectrum(x)
    for value, expected in [
        (participation_ratio(x, spectrum=spectrum), pr),
        (participation_ratio(x), pr),
        (effective_rank(x, spectrum=spectrum), erank),
        (effective_rank(x), erank),
    ]:
        np.testing.assert_allclose(float(value), expected, rtol=1e-9)
    assert int(numerical_rank(x, spectrum=spectrum)) == rank == int(numerical_rank(x))
    raw = feature_spectrum(x, centered=False)
    _, _, rankme = ref_markers_from_svd(ref_singular_values(x, centered=False))
    np.testing.assert_allclose(float(effective_rank(x, centered=False, spectrum=raw)), rankme, rtol=1e-9)


@pytest.mark.parametrize(("n_rows", "n_cols"), [(90, 37), (37, 90)])
def test_gram_strips_equal_the_direct_gram(monkeypatch, n_rows, n_cols):
    # Strips of 5 rows (the n > 3 * tile path, taken at n > 768 by default) and blocks of a few rows.
    rng = np.random.default_rng(12)
    x = rng.normal(size=(n_rows, n_cols)) @ np.diag(np.linspace(0.1, 3, n_cols)) + 7.0
    monkeypatch.setattr(prep, "_GRAM_TILE", 5)
    monkeypatch.setattr(prep, "_BLOCK_ELEMENTS", 4 * max(n_rows, n_cols))
    gram = prep._gram64(prep._Blocks(torch.from_numpy(x), centered=True)).numpy()
    w = x - x.mean(axis=0)
    ref = w.T @ w if n_rows > n_cols else w @ w.T
    np.testing.assert_allclose(gram, ref, rtol=0, atol=1e-13 * np.abs(ref).max())
    assert np.array_equal(gram, gram.T)
    sv = ref_singular_values(x)  # the last is round-off when S < N (centring removes a dimension)
    np.testing.assert_allclose(feature_spectrum(x).numpy(), sv, rtol=1e-9, atol=1e-9 * sv[0])


def test_numerical_rank_tiny_rtol_falls_back_to_exact_svd():
    rng = np.random.default_rng(3)
    x = with_spectrum(rng, 300, 50, np.array([1.0, 1e-5, 1e-7, 1e-9]))
    # 1e-7 and 1e-9 are below the Gram route's resolution; with rtol = 1e-8 the exact SVD must decide.
    assert int(numerical_rank(x, rtol=1e-8)) == int((ref_singular_values(x) >= 1e-8 * 1.0).sum()) == 3
    assert int(numerical_rank(x, rtol=1e-3)) == 1


def test_spectrum_argument_is_validated():
    x = np.random.default_rng(4).normal(size=(20, 5))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        participation_ratio(x, spectrum=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(x, spectrum=-torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="feature_spectrum"):
        numerical_rank(x, spectrum=[1.0] * 5)


def test_spectrum_scale_and_overflow():
    x = np.random.default_rng(5).normal(size=(30, 4))
    np.testing.assert_allclose(
        feature_spectrum(x * 1e-200).numpy(), ref_singular_values(x) * 1e-200, rtol=1e-9
    )
    huge = x / np.abs(x).max() * 1.7e308  # sigma_max ~ sqrt(S) * 1e308: beyond float64
    with pytest.raises(ValueError, match="overflow"):
        feature_spectrum(huge)
    # Markers never unscale, so they work where the spectrum itself would overflow.
    np.testing.assert_allclose(float(participation_ratio(huge)), float(participation_ratio(x)), rtol=1e-9)


def test_geometry_markers_decomposes_once_and_returns_the_spectrum(monkeypatch):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(25)
    x = 3 * torch.randn(4, 40, generator=g)[y] + torch.randn(100, 40, generator=g)
    calls = {"eigvalsh": 0, "svdvals": 0, "svd": 0}
    for name in calls:
        original = getattr(torch.linalg, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counting)
    spectral = ["participation_ratio", "numerical_rank", "effective_rank"]
    report = geometry_markers(x, y, markers=spectral)
    assert calls == {"eigvalsh": 1, "svdvals": 0, "svd": 0}
    torch.testing.assert_close(report.spectrum, feature_spectrum(x), rtol=0, atol=0)
    np.testing.assert_allclose(report.spectrum.numpy(), ref_singular_values(x.double().numpy()), rtol=1e-9)
    assert geometry_markers(x, y, markers=["nc1"]).spectrum is None
    calls.update(eigvalsh=0)
    withspec = geometry_markers(x, y, markers=["nc1"], return_spectrum=True)
    assert calls["eigvalsh"] == 1 and withspec.spectrum is not None
    assert set(report.seconds) == {"spectrum", *spectral}


# ----------------------------------------------------------------------------------------------------
# Concurrent markers (workers) == one after the other
# ----------------------------------------------------------------------------------------------------


def _labelled_clouds(n_classes=5, per_class=30, n_feat=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = 3 * torch.randn(n_classes, n_feat, generator=g)[y] + torch.randn(y.numel(), n_feat, generator=g)
    return x.float(), y


def _mkl_max_threads():
    """MKL's thread count for the calling thread (per thread, unlike torch.get_num_threads()), or None
    where torch is not built with MKL."""
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return int(ctypes.CDLL(lib).mkl_get_max_threads())
    except (OSError, AttributeError):
        return None


def _recording(monkeypatch, name, record, fail=None):
    """Wrap suite's ``name`` to record the thread, thread count and inference mode it runs with (and to
    raise ``fail`` instead, when given)."""
    original = getattr(suite_module, name)

    def wrapper(*args, **kwargs):
        record.append(
            (
                threading.current_thread().name,
                torch.get_num_threads(),
                torch.is_inference_mode_enabled(),
                _mkl_max_threads(),
            )
        )
        if fail is not None:
            raise ValueError(fail)
        return original(*args, **kwargs)

    monkeypatch.setattr(suite_module, name, wrapper)


@pytest.fixture(autouse=True)
def _four_cpus(monkeypatch):
    """``workers`` is capped at the CPUs available: pretend there are 4, so the thread tests do not
    depend on the machine."""
    monkeypatch.setattr(suite_module, "available_cpus", lambda: 4)


def test_workers_give_the_same_report_and_run_lid_on_another_thread(monkeypatch):
    x, y = _labelled_clouds()
    names = [*MARKERS]  # every marker, TwoNN included
    lid_calls, nc1_calls = [], []
    _recording(monkeypatch, "_local_intrinsic_dimension", lid_calls)
    _recording(monkeypatch, "_neural_collapse", nc1_calls)
    one = geometry_markers(x, y, markers=names, n_t=20, generator=3, workers=1)
    assert {c[0] for c in lid_calls + nc1_calls} == {threading.current_thread().name}
    lid_calls.clear(), nc1_calls.clear()
    many = geometry_markers(x, y, markers=names, n_t=20, generator=3, workers=3)
    # LID and TwoNN ran on the helper threads; NC1 (like GLUE and the spectrum) on the calling thread.
    assert len(lid_calls) == 2 and all(c[0].startswith("geomarkers") for c in lid_calls)
    assert [c[0] for c in nc1_calls] == [threading.current_thread().name]
    assert list(many.values) == list(one.values) == [n for n in names if n in one.values]
    assert len(one.values) == len(names)
    for name in names:  # bit for bit: the same computations, only on other threads
        assert torch.equal(many.values[name], one.values[name]), name
    assert many.skipped == one.skipped and many.standard_errors == one.standard_errors
    assert torch.equal(many.spectrum, one.spectrum)
    assert set(many.seconds) == set(one.seconds)


def test_workers_keep_the_callers_thread_count_and_inference_mode(monkeypatch):
    x, y = _labelled_clouds()
    calls = []
    _recording(monkeypatch, "_local_intrinsic_dimension", calls)
    with torch.inference_mode():
        geometry_markers(x, y, markers=["lid", "nc1"], num_threads=3, workers=2)
    # The helper thread sees the caller's inference mode and thread counts, torch's and MKL's (MKL's is
    # per thread; its process default is every core or MKL_NUM_THREADS, never 3 here).
    assert calls and all(c[0].startswith("geomarkers") for c in calls)
    mkl = calls[0][3]
    assert {c[1:] for c in calls} == {(3, True, mkl)} and mkl in (3, None)
    calls.clear()
    geometry_markers(x, y, markers=["lid", "nc1"], num_threads=1, workers=2)
    assert {c[1:3] for c in calls} == {(1, False)} and {c[3] for c in calls} <= {1, None}


def test_workers_errors_are_raised_in_task_order_and_skipped_alike(monkeypatch):
    x, y = _labelled_clouds()
    names = ["glue_capacity", "nc1", "lid", "within_class_distance"]
    _recording(monkeypatch, "_local_intrinsic_dimension", [], fail="lid failed")
    reports = [
        geometry_markers(x, y, markers=names, n_t=20, strict=False, workers=w, generator=0) for w in (1, 2)
    ]
    assert reports[0].skipped == reports[1].skipped == {"lid": "lid failed"}
    assert (
        list(reports[0].values)
        == list(reports[1].values)
        == ["glue_capacity", "nc1", "within_class_distance"]
    )
    for workers in (1, 2):  # only LID fails: its error comes through from the helper thread
        with pytest.raises(ValueError, match="lid failed"):
            geometry_markers(x, y, markers=names, n_t=20, strict=True, workers=workers)
    # NC1 (on the calling thread) comes before LID in task order: its error is the one raised, whichever
    # finishes first.
    _recording(monkeypatch, "_neural_collapse", [], fail="nc1 failed")
    for workers in (1, 2):
        with pytest.raises(ValueError, match="nc1 failed"):
            geometry_markers(x, y, markers=names, n_t=20, strict=True, workers=workers)
    # An interrupt on the calling thread (the within-class distance, last in task order) wins over an
    # earlier task's error on a helper thread (LID).
    monkeypatch.undo()
    _recording(monkeypatch, "_local_intrinsic_dimension", [], fail="lid failed")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(suite_module, "_within_class_distance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        geometry_markers(x, y, markers=names, n_t=20, strict=True, workers=2)


def test_thread_pool_waits_for_every_call_and_try_submit_refuses_when_busy():
    gate, started = threading.Event(), threading.Event()

    def blocking():
        started.set()
        return gate.wait(timeout=30)

    with limit_threads(1), torch_thread_pool(1) as pool:
        head = pool.submit(blocking)  # occupies the only thread until the gate opens
        assert started.wait(timeout=30)
        assert pool.try_submit(torch.get_num_threads) is None  # busy: the caller must run it itself
        tail = [pool.submit(torch.get_num_threads) for _ in range(3)]  # queued behind the head
        gate.set()  # leaving the block right after: the tail is (almost always) still queued
    # Leaving the block waited for every call, the queued ones too (none was cancelled), each run with
    # the caller's thread count.
    assert head.result(timeout=0) is True
    assert [f.result(timeout=0) for f in tail] == [1, 1, 1]
    with torch_thread_pool(1) as pool:
        assert pool.try_submit(torch.get_num_threads) is not None  # idle: taken
    gate.clear()
    with pytest.raises(RuntimeError, match="boom"), torch_thread_pool(1) as pool:
        pool.submit(gate.wait, 1.0)
        queued = pool.submit(torch.get_num_threads)
        raise RuntimeError("boom")
    assert queued.cancelled()  # a raising block cancels what has not started


def test_shared_work_runs_each_item_once_and_reraises_the_first_error():
    # Two threads take items from one SharedWork: every item runs exactly once, setup once and first.
    log, lock = [], threading.Lock()
    helper_took, owner_took = threading.Event(), threading.Event()

    def item(i):  # each thread's first item waits until the other thread has taken one
        with lock:
            log.append((i, threading.current_thread().name))
        if threading.current_thread().name.startswith("geomarkers"):
            helper_took.set()
            owner_took.wait(timeout=30)
        else:
            owner_took.set()
            helper_took.wait(timeout=30)

    setups = []
    work = SharedWork(6, item, setup=lambda: setups.append(len(log)))
    with torch_thread_pool(1) as pool:
        pool.submit(work.help)
        work.finish()
    assert setups == [0]  # once, before any item
    assert sorted(i for i, _ in log) == list(range(6))
    assert {name.startswith("geomarkers") for _, name in log} == {True, False}  # both threads took items
    # A helper's error: help() keeps it, no further item starts, finish() re-raises it.
    started = []

    def failing(i):
        started.append(i)
        if i == 0:
            raise ValueError("item 0 failed")

    work = SharedWork(4, failing)
    work.help()  # never raises
    assert started == [0]
    with pytest.raises(ValueError, match="item 0 failed"):
        work.finish()
    assert started == [0]
    work = SharedWork(2, started.append, setup=lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        work.finish()
    assert started == [0]  # a failed setup runs no item
    SharedWork(0, started.append).finish()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="non-negative int"):
            SharedWork(bad, started.append)


def test_glue_projection_is_shared_with_an_idle_helper_and_gives_the_same_report(monkeypatch):
    # N = 24 > projection_dim = 8: GLUE's input is projected in row blocks (of 5 rows here, so 30 blocks
    # for 150 rows); with workers=2 the idle helper takes blocks too, with the same numbers.
    x, y = _labelled_clouds()
    monkeypatch.setattr(prep, "_BLOCK_ELEMENTS", 5 * 24)
    threads, helper_took, caller_took = [], threading.Event(), threading.Event()
    original = prep._CenterProjection._block

    def block(self, i):  # each thread's blocks wait until the other thread has taken one
        name = threading.current_thread().name
        threads.append(name)
        mine, other = (
            (helper_took, caller_took) if name.startswith("geomarkers") else (caller_took, helper_took)
        )
        mine.set()
        other.wait(timeout=30)
        return original(self, i)

    monkeypatch.setattr(prep._CenterProjection, "_block", block)
    names = ["glue_capacity", "glue_dimension", "nc1"]
    kwargs = dict(markers=names, n_t=20, generator=3, projection_dim=8)
    helper_took.set()  # workers=1: nobody to wait for
    one = geometry_markers(x, y, workers=1, **kwargs)
    assert len(threads) == 30 and set(threads) == {threading.current_thread().name}
    threads.clear(), helper_took.clear(), caller_took.clear()
    many = geometry_markers(x, y, workers=2, **kwargs)
    assert len(threads) == 30 and {t.startswith("geomarkers") for t in threads} == {True, False}
    for name in names:
        assert torch.equal(many.values[name], one.values[name]), name
    # The blocks equal the one-piece projection of the centred features (random_projection's draws).
    z = _center_project(x, 8, centered=True, generator=7)
    ref = random_projection(center(x), 8, generator=7)
    torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-6)


def test_workers_are_capped_at_the_available_cpus(monkeypatch):
    x, y = _labelled_clouds()
    calls = []
    _recording(monkeypatch, "_local_intrinsic_dimension", calls)
    monkeypatch.setattr(
        suite_module, "available_cpus", lambda: 1
    )  # one CPU: a second thread only takes turns
    geometry_markers(x, y, markers=["lid", "nc1"], workers=2)
    assert [c[0] for c in calls] == [threading.current_thread().name]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_workers_must_be_a_positive_int(bad):
    x, y = _labelled_clouds()
    with pytest.raises((TypeError, ValueError), match="workers"):
        geometry_markers(x, y, markers=["nc1"], workers=bad)


# ----------------------------------------------------------------------------------------------------
# Chunked == unchunked
# ----------------------------------------------------------------------------------------------------


def _all_non_glue(x, y):
    return {
        "spectrum": feature_spectrum(x),
        "rankme": feature_spectrum(x, centered=False),
        "pr": participation_ratio(x),
        "erank": effective_rank(x),
        "nrank": numerical_rank(x),
        "nc1": neural_collapse(x, y),
        "lid": local_intrinsic_dimension(x, k=6),
        "twonn": local_intrinsic_dimension(x, method="twonn"),
        "wcd": within_class_distance(x, y),
        "center": center(x),
        "project": _center_project(x, 7, centered=True, generator=3),
    }


def test_reused_blocks_equal_fresh_ones_and_stay_per_thread():
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(30, 8)) * 1e200)  # shifted: huge values
    blocks = prep._Blocks(x, centered=True)
    assert blocks.shift != 0
    first = blocks.block(slice(0, 10), reuse=True)
    assert torch.equal(first, blocks.block(slice(0, 10)))
    again = blocks.block(slice(10, 25), reuse=True)  # larger: the buffer grows
    assert torch.equal(again, blocks.block(slice(10, 25)))
    third = blocks.block(slice(25, 30), slice(2, 6), reuse=True)  # a column slice too
    assert torch.equal(third, blocks.block(slice(25, 30), slice(2, 6)))
    assert third.data_ptr() == again.data_ptr()  # the same memory: the next reuse overwrites it
    other = []
    worker = threading.Thread(target=lambda: other.append(blocks.block(slice(0, 10), reuse=True)))
    worker.start(), worker.join()
    assert torch.equal(other[0], blocks.block(slice(0, 10)))
    assert other[0].data_ptr() != third.data_ptr()  # another thread: its own buffer
    assert torch.equal(third, blocks.block(slice(25, 30), slice(2, 6)))  # untouched by that thread
    # The Gram's upper triangle without the mirror is the mirrored Gram's.
    full = prep._gram64(blocks)
    upper = prep._gram64(blocks, mirror=False)
    assert torch.equal(upper.triu(), full.triu()) and torch.equal(full, full.T)


@pytest.mark.parametrize(
    ("offset", "spread", "second_pass"),
    [(3.0, 1.0, False), (1e-80, 1e-92, True), (1e-80, 1e-89, False), (0.0, 0.0, False)],
)
def test_blocks_measure_the_centred_peak_only_when_it_may_need_rescaling(
    monkeypatch, offset, spread, second_pass
):
    # The centred peak lies in [spread / 2, 2 spread] (spread = max |x - x[0]|): the pass that measures
    # it runs only where that range crosses the rescaling limits (2**-300 ~ 4.9e-91 here).
    x = offset + spread * np.random.default_rng(13).normal(size=(50, 4))
    monkeypatch.setattr(prep, "_BLOCK_ELEMENTS", 40)  # blocks of 10 rows: 5 per pass
    calls = []
    original = prep._Blocks._raw
    monkeypatch.setattr(
        prep._Blocks, "_raw", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    blocks = prep._Blocks(torch.from_numpy(x), centered=True)
    assert len(calls) == 1 + 5 + (5 if second_pass else 0)
    shifted = x - x[:1]
    centred = shifted - shifted.mean(axis=0)
    peak = np.abs(centred).max()
    expected = 0 if peak == 0 or 2.0**-300 <= peak <= 2.0**300 else -math.frexp(peak)[1]
    assert blocks.shift2 == expected and (expected != 0) == second_pass
    np.testing.assert_allclose(
        blocks.block(slice(None)).numpy(),
        centred * 2.0**expected,
        rtol=0,
        atol=1e-14 * max(1.0, 2.0**expected * peak),
    )


def test_tiny_blocks_give_the_same_results(monkeypatch):
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(3), [40, 25, 35])
    x = torch.from_numpy(rng.normal(size=(100, 12)) + rng.normal(size=(3, 12))[y] * 2 + 50.0)
    x[7] = x[3]  # a duplicate row for LID
    y = torch.from_numpy(y)
    big = _all_non_glue(x, y)
    monkeypatch.setattr(prep, "_BLOCK_ELEMENTS", 30)  # blocks of 2 rows: every loop runs many times
    small = _all_non_glue(x, y)
    for key in big:
        torch.testing.assert_close(small[key], big[key], rtol=1e-10, atol=1e-12, msg=key)
    # and the blocked GLUE input equals center-then-project
    torch.testing.assert_close(
        big["project"], random_projection(center(x), 7, generator=3), rtol=1e-12, atol=1e-12
    )
    dup_free = x[torch.arange(100) != 7].numpy()
    dist, _ = cKDTree(dup_free).query(dup_free, k=7)
    ref = np.mean(1.0 / (np.log(dist[:, -1:] / dist[:, 1:-1]).sum(axis=1) / 5))
    np.testing.assert_allclose(float(small["lid"]), ref, rtol=1e-9)


def test_within_class_distance_blocked_for_large_classes(monkeypatch):
    from scipy.spatial.distance import pdist

    x = np.random.default_rng(7).normal(size=(90, 6))
    y = np.repeat([0, 1], [70, 20])
    ref = np.mean([pdist(x[y == c]).mean() for c in (0, 1)])
    monkeypatch.setattr(prep, "_BLOCK_ELEMENTS", 200)  # class 0 has 2415 pairs: the cdist path
    np.testing.assert_allclose(float(within_class_distance(x, y)), ref, rtol=1e-12)


def test_duplicate_detection_survives_hash_collisions(monkeypatch):
    # All multipliers 1: the hash is the sum of the bit patterns, so permuted rows collide.
    monkeypatch.setattr(lid_module, "_row_hash_multipliers", lambda n: torch.ones((n, 2), dtype=torch.int64))
    x = np.random.default_rng(8).normal(size=(40, 3))
    x[10] = x[4][::-1]  # same multiset of values, different row: a collision
    x[11] = x[4]  # a real duplicate
    distinct = lid_module._distinct_rows(torch.from_numpy(x))
    assert distinct.tolist() == [i for i in range(40) if i != 11]


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch
    from lightning_geomarkers.functional import geometry_markers
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(80).repeat_interleave(50)  # S = 4000 rows
    x = torch.randn(4000, 256, generator=g) + torch.randn(80, 256, generator=g)[y]
    names = ["participation_ratio", "numerical_rank", "effective_rank", "nc1", "lid", "within_class_distance"]
    geometry_markers(x[:400], y[:400], markers=names)  # warm-up: allocator, kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = geometry_markers(x, y, markers=names)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mb": (peak - base) / 1024, "values": sorted(report.values)}))
    """
)


def test_non_glue_markers_memory_is_bounded():
    # An S x S float64 matrix alone would be 128 MB here; the features are 4 MB (float32). The blocks
    # are 16 MiB each (a few alive at once).
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["values"]) == 6
    assert result["extra_mb"] < 100, result


# ----------------------------------------------------------------------------------------------------
# Standard errors
# ----------------------------------------------------------------------------------------------------


def ref_jackknife(a, b, c, p, groups):
    """Direct delete-a-group jackknife: a loop recomputing every marker from scratch."""
    n = len(a)
    label = np.arange(n) * groups // n
    thetas = []
    for g in range(groups):
        keep = label != g
        ea, eb, ec = a[keep].mean(), b[keep].mean(), c[keep].mean()
        thetas.append([p / ea, eb / p, np.sqrt(ec / (eb - ec)), ec / ea])
    thetas = np.array(thetas)
    return np.sqrt((groups - 1) / groups * ((thetas - thetas.mean(axis=0)) ** 2).sum(axis=0))


@pytest.mark.parametrize("groups", [None, 7])
def test_jackknife_matches_direct_loop(groups):
    rng = np.random.default_rng(9)
    a = rng.uniform(1, 3, 50)
    b = rng.uniform(0.5, 1.5, 50)
    c = b * rng.uniform(0.1, 0.6, 50)
    se = jackknife_standard_errors(
        torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c), 4, n_groups=groups
    )
    ref = ref_jackknife(a, b, c, 4, 50 if groups is None else groups)
    got = [float(se[n]) for n in ("capacity", "dimension", "radius", "utility")]
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_standard_error_input_checks():
    with pytest.raises(ValueError, match="1-D"):
        jackknife_standard_errors(torch.ones(1), torch.ones(1), torch.ones(1), 2)
    with pytest.raises(ValueError, match="n_groups"):
        jackknife_standard_errors(torch.ones(5), torch.ones(5), torch.ones(5), 2, n_groups=6)
    with pytest.raises(TypeError, match="GlueResult"):
        glue_standard_errors({"capacity": 1.0})
    se = pairs_standard_errors({"x": torch.tensor([1.0, float("nan")]), "y": torch.tensor([1.0, 2.0, 4.0])})
    assert "x" not in se
    np.testing.assert_allclose(float(se["y"]), np.std([1, 2, 4], ddof=1) / np.sqrt(3), rtol=1e-12)


def _clouds(seed, n_classes=4, points=12, dim=48):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, 1, dim, generator=g, dtype=torch.float64)
    return centers + 0.5 * torch.randn(n_classes, points, dim, generator=g, dtype=torch.float64)


@pytest.mark.slow
def test_jackknife_se_matches_spread_over_probe_seeds():
    clouds = _clouds(0)
    runs = [glue(clouds, n_t=60, generator=s, warn=False) for s in range(30)]
    for name in ("capacity", "dimension", "radius", "utility"):
        spread = np.std([float(getattr(r, name)) for r in runs], ddof=1)
        se = np.mean([float(glue_standard_errors(r)[name]) for r in runs])
        assert 0.6 < se / spread < 1.6, (name, se, spread)


@pytest.mark.slow
def test_pairs_se_matches_spread_over_seeds():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(20).repeat_interleave(15)
    x = 2 * torch.randn(20, 40, generator=g, dtype=torch.float64)[y] + torch.randn(
        300, 40, generator=g, dtype=torch.float64
    )
    runs = [
        glue_pairs(x, y, points_per_class=10, n_pairs=15, n_t=30, generator=s, warn=False) for s in range(25)
    ]
    for name in ("capacity", "dimension", "utility"):
        spread = np.std([float(getattr(r, name)) for r in runs], ddof=1)
        se = np.mean([float(glue_standard_errors(r)[name]) for r in runs])
        assert 0.6 < se / spread < 1.6, (name, se, spread)


def test_geometry_markers_attaches_standard_errors():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(4).repeat_interleave(20)
    x = 3 * torch.randn(4, 32, generator=g)[y] + torch.randn(80, 32, generator=g)
    pairs = geometry_markers(x, y, markers="glue", n_t=30, generator=0, strict=False)
    assert set(pairs.standard_errors) == set(pairs.values)  # every pairs marker that was computed
    ref = pairs_standard_errors(pairs.glue.per_pair)
    for name, value in pairs.standard_errors.items():
        assert isinstance(value, float)
        np.testing.assert_allclose(value, float(ref[name.removeprefix("glue_")]), rtol=1e-12)
    joint = geometry_markers(  # 4 classes x 16 points: within the joint protocol's 2 N = 64
        x,
        y,
        markers=["glue_dimension", "glue_center_alignment"],
        glue_protocol="joint",
        points_per_class=16,
        n_t=30,
        generator=0,
    )
    assert set(joint.standard_errors) == {"glue_dimension"}  # alignments have no jackknife SE
    assert geometry_markers(x, y, markers=["lid"]).standard_errors == {}


def test_joint_protocol_caps_the_classes_at_twice_the_dimension():
    """12 classes x 20 points in 48 dimensions (P M = 5 N): the suite's joint protocol uses a seeded
    subset of 2 N / M = 4 classes and says so; the values equal an explicit ``max_classes=4`` (the same
    subset, no warning), and within the limit nothing is capped."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(12).repeat_interleave(20)
    x = 3 * torch.randn(12, 48, generator=g)[y] + torch.randn(240, 48, generator=g)
    kwargs = dict(markers="glue", glue_protocol="joint", points_per_class=20, n_t=30, generator=0)
    with pytest.warns(
        GeomarkersWarning, match=r"12 classes x 20 points = 240 exceed 2 x N = 96.*subset of 4 classes"
    ):
        capped = geometry_markers(x, y, **kwargs)
    assert capped.glue.active.shape == (30, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explicit = geometry_markers(x, y, max_classes=4, **kwargs)
        within = geometry_markers(x[y < 4], y[y < 4], **kwargs)  # 80 points <= 96: all 4 classes
    assert not [w for w in caught if "subset of" in str(w.message)]
    assert explicit.values.keys() == capped.values.keys()
    for name, value in capped.values.items():
        assert torch.equal(value, explicit.values[name]), name
    assert within.glue.active.shape == (30, 4)


def ref_mle(x, k):
    dist, _ = cKDTree(x).query(x, k=k + 1)
    t = dist[:, 1:]
    return np.mean(1.0 / (np.log(t[:, -1:] / t[:, :-1]).sum(axis=1) / (k - 1)))


@pytest.mark.parametrize("case", ["gaussian", "far_tight_clusters"])
def test_lid_float32_candidates_are_certified_or_redone(monkeypatch, case):
    rng = np.random.default_rng(10)
    if case == "gaussian":
        x = rng.normal(size=(300, 40)) @ np.diag(np.linspace(0.2, 2, 40))
    else:  # distances ~1e-3 between points ~1e3 from the centre: float32 cannot rank them, rows are redone
        x = np.concatenate([rng.normal(size=(150, 6)) * 1e-3 + 1e3, rng.normal(size=(150, 6)) * 1e-3 - 1e3])
    redone = []
    original = lid_module._candidates_of
    monkeypatch.setattr(
        lid_module, "_candidates_of", lambda b, rows, *a: redone.append(rows.numel()) or original(b, rows, *a)
    )
    monkeypatch.setattr(lid_module, "_FLOAT32_MIN_WORK", 0)
    np.testing.assert_allclose(float(local_intrinsic_dimension(x, k=10)), ref_mle(x, 10), rtol=1e-9)
    if case == "far_tight_clusters":
        assert redone and redone[0] == 300
    else:
        assert sum(redone) < 30  # almost every row certified from the float32 Gram


def test_lid_float32_path_needs_ieee_float32_matmul(monkeypatch):
    # With TF32/bf16 shortcuts allowed the error bound does not hold: the float64 Gram is used instead.
    monkeypatch.setattr(lid_module, "_FLOAT32_MIN_WORK", 0)
    used = []
    original = lid_module._candidates
    monkeypatch.setattr(
        lid_module, "_candidates", lambda b, kc, sq, dtype: used.append(dtype) or original(b, kc, sq, dtype)
    )
    x = np.random.default_rng(11).normal(size=(120, 8))
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        high = float(local_intrinsic_dimension(x, k=5))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert used == [torch.float64]
    np.testing.assert_allclose(high, ref_mle(x, 5), rtol=1e-9)


@pytest.mark.parametrize(
    "setting",
    [
        "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'",  # the CPU's bf16 shortcut
        "torch.backends.fp32_precision = 'tf32'",
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'",  # CUDA only: the CPU stays IEEE
    ],
)
def test_lid_with_torchs_newer_fp32_precision_interface(setting):
    """Once torch's newer ``fp32_precision`` attributes are set, every read of the legacy
    ``get_float32_matmul_precision`` raises ("mix of the legacy and new APIs"): LID raised, and inside
    the monitor (strict=False) was skipped every epoch. Now the newer interface is read instead
    (in a subprocess: the setting is global and sticky)."""
    code = textwrap.dedent(
        f"""
        import json, numpy as np, torch
        import lightning_geomarkers.functional.intrinsic_dimension as lid
        from lightning_geomarkers.utilities import ieee_float32_matmul
        lid._FLOAT32_MIN_WORK = 0
        used = []
        original = lid._candidates
        lid._candidates = lambda b, kc, sq, dtype: used.append(str(dtype)) or original(b, kc, sq, dtype)
        x = np.random.default_rng(11).normal(size=(120, 8))
        {setting}
        value = float(lid.local_intrinsic_dimension(x, k=5))
        print(json.dumps({{"value": value, "used": used, "cpu_ieee": ieee_float32_matmul(torch.device("cpu")),
                          "cuda_ieee": ieee_float32_matmul(torch.device("cuda"))}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    x = np.random.default_rng(11).normal(size=(120, 8))
    np.testing.assert_allclose(out["value"], ref_mle(x, 5), rtol=1e-9)
    cpu_shortcut = "cuda" not in setting
    assert out["cpu_ieee"] is (not cpu_shortcut)
    assert out["cuda_ieee"] is ("mkldnn" in setting)  # the CPU's own setting leaves CUDA's alone
    assert out["used"] == (["torch.float64"] if cpu_shortcut else ["torch.float32"])


def test_the_strict_error_does_not_depend_on_workers_when_glue_fails_too(monkeypatch):
    """GLUE is first in task order but runs last on the calling thread when helpers exist: a failing
    main task (the spectrum) used to stop the loop before GLUE ran, so workers=2 raised the spectrum's
    error and workers=1 GLUE's."""
    x, y = _labelled_clouds()

    def glue_fails(*args, **kwargs):
        raise ValueError("GLUE failed")

    def spectrum_fails(*args, **kwargs):
        raise RuntimeError("spectrum failed")

    monkeypatch.setattr(suite_module, "_glue_pairs", glue_fails)
    monkeypatch.setattr(suite_module, "_feature_spectrum", spectrum_fails)
    names = ["glue_capacity", "participation_ratio", "lid"]
    for workers in (1, 2):
        with pytest.raises(ValueError, match="GLUE failed"):
            geometry_markers(x, y, markers=names, n_t=20, generator=0, workers=workers)


def _flat(value):
    """Nested results (dataclasses, dicts, tensors) as plain Python values, for exact comparison (timings
    left out)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return {k: _flat(getattr(value, k)) for k in value.__dataclass_fields__ if k != "seconds"}
    if isinstance(value, dict):
        return {k: _flat(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_flat(v) for v in value]
    return value


def test_a_default_device_set_by_the_user_changes_nothing():
    """``torch.set_default_device("cuda")`` (or ``with torch.device(...)``) sends every factory call
    without ``device=`` there: the CPU draws from CPU generators then raised ("Expected a 'cuda' device
    type for generator"), and other helpers' tensors left the features' device. Emulated with the meta
    device (it holds no data, so any tensor that lands there fails or changes the result): every entry
    point gives exactly the results it gives without the default device."""
    from lightning_geomarkers import GeometryMonitor
    from lightning_geomarkers.functional import (
        glue,
        glue_joint,
        glue_pairs,
        per_class_subsample,
        random_projection,
    )
    from lightning_geomarkers.functional.per_class import per_class_glue
    from lightning_geomarkers.metrics import GeometryMarkers

    g = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat_interleave(30)
    x = (3 * torch.randn(5, 48, generator=g)[y] + torch.randn(150, 48, generator=g)).relu()
    mans = x.view(5, 30, 48)

    def metric():
        m = GeometryMarkers(n_t=20, n_pairs=4, lid_k=5)
        m.update(x, y)
        return m.compute()

    calls = {
        "glue random": lambda: glue(mans, n_t=20, generator=0),
        "glue balanced": lambda: glue(mans, n_t=20, dichotomies="balanced", generator=0),
        "glue one_vs_rest": lambda: glue(mans, n_t=20, dichotomies="one_vs_rest", generator=0),
        "glue_pairs": lambda: glue_pairs(x, y, n_pairs=4, n_t=20, generator=0),
        "glue_joint": lambda: glue_joint(x, y, n_t=20, generator=0),
        "random_projection": lambda: random_projection(x, 16, generator=0),
        "per_class_subsample": lambda: per_class_subsample(x, y, 10, generator=0),
        "per_class_glue": lambda: per_class_glue(glue_pairs(x, y, n_pairs=None, n_t=20, generator=0)),
        "suite, pairs": lambda: geometry_markers(
            x, y, n_pairs=4, n_t=20, projection_dim=32, lid_k=5, generator=0
        ),
        "suite, joint": lambda: geometry_markers(
            x, y, glue_protocol="joint", points_per_class=10, n_t=20, lid_k=5, generator=0, workers=1
        ),
        "GeometryMarkers": metric,
        "monitor": lambda: GeometryMonitor(n_t=20, n_pairs=4, lid_k=5).compute_markers(x, y).values,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, call in calls.items():
            expected = _flat(call())
            with torch.device("meta"):
                got = _flat(call())
            assert repr(got) == repr(expected), name


def test_a_two_class_sample_draws_class_against_class_dichotomies():
    """``dichotomies="random"`` draws i.i.d. signs: with only two classes in a centred sample, its same-sign
    dichotomies ask for the whole sample on one side of a hyperplane through its own mean, which cannot be
    done: half of the probes were degenerate and the capacity several times too low (0.063 against 0.68).
    There the suite draws opposite signs only, as "balanced"; with three classes "random" keeps its
    same-sign dichotomies (they are feasible: the pair is not the whole sample)."""
    g = torch.Generator().manual_seed(0)
    y2 = torch.arange(2).repeat_interleave(30)
    x2 = (2 * torch.randn(2, 64, generator=g)[y2] + torch.randn(60, 64, generator=g)).relu()
    args = dict(markers="glue", n_t=60, generator=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no degenerate probe, no warning
        binary = geometry_markers(x2, y2, **args)
    assert _flat(binary.values) == _flat(geometry_markers(x2, y2, dichotomies="balanced", **args).values)
    assert binary.glue.n_degenerate == 0 and float(binary.values["glue_capacity"]) > 0.3
    uncentred = geometry_markers(x2, y2, center_features=False, **args)  # not centred: left as asked
    assert _flat(uncentred.values) != _flat(
        geometry_markers(x2, y2, center_features=False, dichotomies="balanced", **args).values
    )
    y3 = torch.arange(3).repeat_interleave(20)
    x3 = (2 * torch.randn(3, 64, generator=g)[y3] + torch.randn(60, 64, generator=g)).relu()
    three = geometry_markers(x3, y3, **args)
    assert _flat(three.values) != _flat(geometry_markers(x3, y3, dichotomies="balanced", **args).values)


@pytest.mark.parametrize("error", [MemoryError(), TypeError("bad argument"), ZeroDivisionError()])
def test_any_error_of_one_marker_skips_that_marker_only_and_says_what_it_was(monkeypatch, error):
    """Only ValueError and RuntimeError were caught per marker: an out-of-memory error in LID dropped every
    marker of the call (the monitor skipped the whole layer), and a bare MemoryError() gave an empty
    reason."""
    x, y = _labelled_clouds()
    names = ["glue_capacity", "nc1", "lid", "within_class_distance"]
    clean = geometry_markers(x, y, markers=names, n_t=20, generator=0)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(suite_module, "_local_intrinsic_dimension", failing)
    for workers in (1, 2):
        report = geometry_markers(x, y, markers=names, n_t=20, generator=0, workers=workers, strict=False)
        expected = type(error).__name__ + (f": {error}" if str(error) else "")
        assert report.skipped == {"lid": expected}
        assert {k: float(v) for k, v in report.values.items()} == {
            k: float(v) for k, v in clean.values.items() if k != "lid"
        }
        with pytest.raises(type(error)):
            geometry_markers(x, y, markers=names, n_t=20, strict=True, workers=workers)


def test_a_warning_turned_into_an_error_still_raises_with_strict_false():
    """strict=False records a marker's failure; a warning the caller turned into an error (the route the
    troubleshooting page recommends) must still raise, not become a skip reason."""
    from lightning_geomarkers.errors import NonSeparableWarning

    x, y = _labelled_clouds()
    x[0] = 0  # a zero point: every GLUE dichotomy of its problems is degenerate (a NonSeparableWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonSeparableWarning)
        with pytest.raises(NonSeparableWarning):
            geometry_markers(x, y, markers=["glue_dimension"], n_t=20, strict=False, center_features=False)
