"""The one validation layer (``utilities/checks.py``): one rule set for labels and protocol arguments,
used by the functional API, the monitor's batch labels, the sampler's hashing and the metric classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_geomarkers import GeometryMonitor
from lightning_geomarkers.callbacks._labels import extract_labels
from lightning_geomarkers.functional import (
    geometry_markers,
    glue,
    glue_joint,
    glue_pairs,
    make_dichotomies,
    neural_collapse,
)
from lightning_geomarkers.functional._hashing import class_priority, sample_keys
from lightning_geomarkers.metrics import ParticipationRatio
from lightning_geomarkers.utilities import as_generator, check_labels, check_protocol, check_seed


def test_check_labels_accepts_class_ids_in_every_container() -> None:
    want = torch.tensor([0, 2, 1, 2])
    for labels in (
        want,
        want.int(),
        want.float(),
        want.numpy(),
        [0, 2, 1, 2],
        (0, 2, 1, 2),
        np.array([0.0, 2.0, 1.0, 2.0]),
    ):
        got = check_labels(labels, 4)
        assert got.dtype == torch.int64 and torch.equal(got, want), labels
    assert torch.equal(check_labels(torch.tensor([True, False])), torch.tensor([1, 0]))
    assert torch.equal(check_labels(np.int64(3)), torch.tensor([3]))
    assert torch.equal(check_labels(torch.tensor([-1, 5])), torch.tensor([-1, 5]))  # ids, any sign
    # A (S, 1) column only where asked for (batches collate targets so); the functional API says how.
    assert torch.equal(check_labels(want[:, None], 4, allow_column=True), want)
    with pytest.raises(ValueError, match=r"must be 1-D .*labels.reshape\(-1\)"):
        check_labels(want[:, None], 4)


@pytest.mark.parametrize(
    ("labels", "error", "fix"),
    [
        (torch.eye(4), ValueError, "argmax(1)"),
        (np.array(["cat", "dog", "cat", "dog"]), TypeError, "never per batch: a class must keep its id"),
        (["cat", "dog", "cat", "dog"], TypeError, "CLASSES.index"),
        (torch.tensor([0.5, 1.0, 0.0, 1.0]), ValueError, "non-integer floats"),
        (torch.tensor([0.0, float("nan"), 1.0, 1.0]), ValueError, "non-integer floats"),
        (torch.zeros(4, 2, 2), ValueError, "1-D"),
        (torch.zeros(4, dtype=torch.complex64), TypeError, "complex"),
        (torch.zeros(3), ValueError, "4 rows but `labels` has 3 entries"),
        ("cat", TypeError, "integer class ids"),
        # Class ids beyond the float dtype's exact integers have been rounded together (600 classes cast
        # to bfloat16 left 407, and NC1 was 9x off): refused.
        (
            torch.tensor([300.0, 1.0, 2.0, 3.0], dtype=torch.bfloat16),
            ValueError,
            "tells integers apart only below 256",
        ),
        (torch.tensor([2.0**25, 1.0, 2.0, 3.0]), ValueError, "tells integers apart only below 16777216"),
    ],
)
def test_check_labels_rejects_with_the_fix(labels, error, fix) -> None:
    with pytest.raises(error) as info:
        check_labels(labels, 4)
    assert fix in str(info.value)


def test_every_entry_point_applies_the_same_label_rules() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g) + 4 * torch.arange(2).repeat_interleave(20)[:, None]
    one_hot = torch.nn.functional.one_hot(torch.arange(2).repeat_interleave(20)).float()
    for call in (
        lambda: neural_collapse(x, one_hot),
        lambda: geometry_markers(x, one_hot, markers=["nc1"]),
        lambda: ParticipationRatio().update(x, one_hot),
        lambda: sample_keys(x, one_hot, seed=0),
        lambda: class_priority(one_hot, seed=0),
        lambda: extract_labels((x, one_hot)),
    ):
        with pytest.raises(ValueError, match=r"one-hot.*argmax\(1\)"):
            call()
    # The monitor's batch labels add their own fix (label_fn) to the shared message.
    with pytest.raises(ValueError, match="label_fn"):
        extract_labels((x, one_hot))
    # Whole-number float labels are class ids everywhere (the rule used to differ between entry points).
    y_float = torch.arange(2).repeat_interleave(20).float()
    y_int = y_float.long()
    assert torch.equal(sample_keys(x, y_float, seed=1), sample_keys(x, y_int, seed=1))
    assert torch.equal(neural_collapse(x, y_float), neural_collapse(x, y_int))


def test_check_protocol_normalises_and_rejects() -> None:
    kwargs = check_protocol("joint", points_per_class=np.int64(10), n_pairs=None, projection_dim=None)
    assert kwargs == {
        "glue_protocol": "joint",
        "points_per_class": 10,
        "n_pairs": None,
        "n_t": 200,
        "dichotomies": "random",
        "max_classes": None,
        "center_features": True,
        "projection_dim": None,
        "lid_k": 20,
    }
    assert type(kwargs["points_per_class"]) is int
    with pytest.raises(ValueError, match="'pairs' or 'joint'"):
        check_protocol("pair")
    with pytest.raises(ValueError, match="Unknown dichotomies"):
        check_protocol(dichotomies="balancd")
    with pytest.raises(ValueError, match="`points_per_class` must be >= 2"):
        check_protocol(points_per_class=1)
    with pytest.raises(TypeError, match="`n_t` must be an integer"):
        check_protocol(n_t=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"glue_protocol": "pair"}, ValueError, "'pairs' or 'joint'"),
        ({"dichotomies": "balancd"}, ValueError, "Unknown dichotomies"),
        ({"points_per_class": 1}, ValueError, "`points_per_class` must be >= 2"),
        ({"lid_k": 1}, ValueError, "`lid_k` must be >= 2"),
        ({"n_t": 1}, ValueError, "`n_t` must be >= 2"),  # one probe: D, R, Psi would be 0
    ],
)
def test_monitor_and_functional_reject_the_same_protocol_arguments(kwargs, error, match) -> None:
    x = torch.randn(20, 4)
    y = torch.arange(2).repeat_interleave(10)
    with pytest.raises(error, match=match):
        GeometryMonitor(**kwargs)
    with pytest.raises(error, match=match):
        geometry_markers(x, y, markers=["participation_ratio"], **kwargs)


def test_alert_integer_arguments_follow_the_shared_integer_rule() -> None:
    from lightning_geomarkers import MarkerAlert

    with pytest.raises(ValueError, match="`patience` must be >= 1, got 0"):
        MarkerAlert("glue_dimension", relative_drop=0.2, patience=0)
    with pytest.raises(TypeError, match="`window` must be an integer >= 1"):
        MarkerAlert("glue_dimension", relative_drop=0.2, window=1.5)
    with pytest.raises(TypeError, match="`warmup` must be an integer >= 0"):
        MarkerAlert("glue_dimension", relative_drop=0.2, warmup=True)
    assert MarkerAlert("glue_dimension", relative_drop=0.2, warmup=np.int64(0)).warmup == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_finite_finds_every_nan_and_infinity(dtype) -> None:
    """The one-pass (aminmax) check agrees with ``torch.isfinite`` wherever the bad value sits, in
    contiguous and transposed tensors; empty and all-finite tensors pass. ``all_finite`` (the same test
    as a bool) likewise."""
    from lightning_geomarkers.utilities.checks import all_finite, check_finite

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(37, 53, generator=gen).to(dtype)
    check_finite(base, "x")
    check_finite(base[:0], "x")
    assert all_finite(base) and all_finite(base[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for row, col in ((0, 0), (17, 40), (36, 52)):
            for x in (base.clone(), base.clone().T.contiguous().T):
                x[row, col] = bad
                assert not bool(torch.isfinite(x).all())
                assert all_finite(x) is False
                with pytest.raises(ValueError, match="1 NaN/Inf value"):
                    check_finite(x, "x")


def test_as_manifolds_stack_without_copy_and_errors_that_name_the_manifold() -> None:
    """A float32/float64 (P, M, N) stack comes back as it is (one finiteness pass, no copy); other dtypes
    are promoted to a floating copy, ragged lists padded, and bad input still names the manifold."""
    from lightning_geomarkers.utilities.checks import as_manifolds

    stack = torch.randn(3, 4, 5, dtype=torch.float64)
    points, mask = as_manifolds(stack)
    assert points.data_ptr() == stack.data_ptr() and bool(mask.all()) and mask.shape == (3, 4)
    half, _ = as_manifolds(stack.half())
    assert half.dtype == torch.float32 and torch.equal(half, stack.half().float())
    ragged, mask = as_manifolds([stack[0], stack[1, :2]])
    assert torch.equal(ragged[1, :2], stack[1, :2]) and not bool(ragged[1, 2:].any())
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    bad = stack.clone()
    bad[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`manifolds\[2\]` contains 1 NaN/Inf"):
        as_manifolds(bad)
    with pytest.raises(ValueError, match="at least 2 manifolds"):
        as_manifolds(stack[:1])
    with pytest.raises(ValueError, match="Manifold 0 has 0 point"):
        as_manifolds(stack[:, :0])


def test_seeds_outside_the_64_bit_range_are_refused_everywhere_with_the_fix() -> None:
    """A seed torch cannot take (2**64 and more, below -2**63) was accepted, and every later draw failed
    (the monitor then skipped every computation with a warning). The edges of the range work."""
    x, y = torch.randn(20, 4), torch.arange(2).repeat_interleave(10)
    for edge in (2**64 - 1, -(2**63)):
        assert check_seed(edge) == edge
        assert as_generator(edge).initial_seed() == edge % 2**64
        assert sample_keys(x, y, seed=edge).shape == (20,)
    for bad in (2**64, -(2**63) - 1):
        for make in (
            check_seed,
            as_generator,
            lambda s: GeometryMonitor(seed=s),
            lambda s: ParticipationRatio(seed=s),
        ):
            with pytest.raises(ValueError, match=r"64-bit integer.*% 2\*\*64"):
                make(bad)


@pytest.mark.parametrize("cutoff", [-1.0, 0, float("nan"), float("inf"), True, "abc"])
def test_every_glue_entry_point_refuses_a_bad_eigen_cutoff(cutoff) -> None:
    """glue checked eigen_cutoff (but let inf and True through); glue_pairs used whatever it got, e.g. a
    negative cut-off changed the alignments silently and NaN gave an infinite capacity."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 12, generator=g), torch.arange(3).repeat_interleave(10)
    for call in (
        lambda: glue(x.reshape(3, 10, 12), n_t=5, generator=0, eigen_cutoff=cutoff),
        lambda: glue_pairs(x, y, points_per_class=5, n_t=5, generator=0, eigen_cutoff=cutoff),
        lambda: glue_joint(x, y, points_per_class=5, n_t=5, generator=0, eigen_cutoff=cutoff),
    ):
        with pytest.raises((ValueError, TypeError), match="eigen_cutoff"):
            call()


def test_glue_solver_and_dichotomy_arguments_are_validated() -> None:
    """max_iter 0, negative or fractional returned an infinite capacity with only a SolverWarning; probes
    without rows and make_dichotomies' n_t / n_manifolds failed inside torch."""
    points = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for max_iter, error in ((0, ValueError), (-5, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="max_iter"):
            glue(points, n_t=5, generator=0, max_iter=max_iter)
    assert glue(points, n_t=5, generator=0, max_iter=200).converged  # a positive cap is fine
    with pytest.raises(ValueError, match=r"`probes` must have shape .* n_t >= 2, got \(0, 10\)"):
        glue(points, probes=torch.zeros(0, 10))
    with pytest.raises(ValueError, match=r"n_t >= 2, got \(1, 10\) \(with one probe"):
        glue(points, probes=torch.zeros(1, 10))
    for args, error, name in (
        (("random", -1, 3), ValueError, "n_t"),
        (("random", 2.0, 3), TypeError, "n_t"),
        (("one_vs_rest", 3, 0), ValueError, "n_manifolds"),
    ):
        with pytest.raises(error, match=name):
            make_dichotomies(*args, generator=0)


def test_whole_number_float_labels_within_the_exact_range_are_accepted() -> None:
    got = check_labels(torch.tensor([255.0, 3.0], dtype=torch.bfloat16))
    assert got.tolist() == [255, 3]
    assert check_labels(torch.tensor([2047.0, 0.0], dtype=torch.float16)).tolist() == [2047, 0]
    # 2049 in float16 is stored as 2048: the largest whole number is already ambiguous, so it is refused
    with pytest.raises(ValueError, match="tells integers apart only below 2048"):
        check_labels(torch.tensor([2048.0, 2049.0], dtype=torch.float16))


def test_integer_features_are_measured_exactly() -> None:
    """Integer features were cast to float32 (torch's default dtype): around 2**25, 31 of 120 distinct rows
    merged and NC1 came out 2.5x off the value of the exact integers. They are float64 now (exact to 2**53)."""
    from lightning_geomarkers.functional import neural_collapse, participation_ratio

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    x = (2**25 + rng.integers(0, 4, size=(4, 1, 6)) * 8 + rng.integers(0, 8, size=(120, 6))[None]).reshape(
        -1, 6
    )[:120]
    x = x + 40 * y[:, None]
    xf = x.astype(np.float64)
    mu = xf.mean(0)
    means = np.stack([xf[y == c].mean(0) for c in range(4)])
    sw = sum(((xf[y == c] - means[c]).T @ (xf[y == c] - means[c])) for c in range(4)) / len(xf)
    sb = (means - mu).T @ (means - mu) / 4
    ev, vec = np.linalg.eigh(sb)
    keep = ev > 1e-3 * ev.max()
    sb_pinv = (vec[:, keep] / ev[keep]) @ vec[:, keep].T
    nc1_ref = np.trace(sw @ sb_pinv) / 4
    cov = np.cov(xf.T, bias=True)
    lam = np.linalg.eigvalsh(cov)
    pr_ref = lam.sum() ** 2 / (lam**2).sum()
    xt = torch.from_numpy(x)  # int64
    assert float(neural_collapse(xt, torch.from_numpy(y))) == pytest.approx(nc1_ref, rel=1e-9)
    assert float(participation_ratio(xt)) == pytest.approx(pr_ref, rel=1e-9)
