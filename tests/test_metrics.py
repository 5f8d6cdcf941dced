"""torchmetrics classes: batching/order invariance, agreement with the functional layer, and a real
2-process (gloo) gather of uneven cat states."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_geomarkers.functional import (
    effective_rank,
    geometry_markers,
    local_intrinsic_dimension,
    neural_collapse,
    numerical_rank,
    participation_ratio,
    within_class_distance,
)
from lightning_geomarkers.functional.suite import GLUE_MARKER_NAMES
from lightning_geomarkers.metrics import (
    EffectiveRank,
    GeometryMarkers,
    GlueMarkers,
    LocalIntrinsicDimension,
    NeuralCollapse,
    NumericalRank,
    ParticipationRatio,
    WithinClassDistance,
)
from tests.lightning_helpers import free_port, gaussian_classes

SUITE = dict(n_t=30, n_pairs=None, points_per_class=50, lid_k=10)


def test_suite_metric_is_independent_of_batching_and_order():
    x, y = gaussian_classes(n_classes=4, per_class=30, dim=12)
    whole = GeometryMarkers(**SUITE)
    whole.update(x, y)
    parts = GeometryMarkers(**SUITE)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for chunk in perm.split(17):
        parts.update(x[chunk], y[chunk])
    a, b = whole.compute(), parts.compute()
    assert set(a) == set(b) and len(a) == 13
    for name in a:
        assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-9, abs=1e-12), name


def test_suite_metric_matches_functional_on_all_points():
    """With every point used (points_per_class >= class size) the markers do not depend on point order."""
    x, y = gaussian_classes(n_classes=3, per_class=25, dim=10)
    metric = GeometryMarkers(**SUITE)
    metric.update(x, y)
    direct = geometry_markers(x, y, generator=0, **SUITE).values
    for name, value in metric.compute().items():
        assert float(value) == pytest.approx(float(direct[name]), rel=1e-9, abs=1e-12), name


def test_glue_metric_is_the_glue_subset():
    x, y = gaussian_classes(n_classes=3, per_class=25, dim=10)
    metric = GlueMarkers(**SUITE)
    metric.update(x, y)
    out = metric.compute()
    assert sorted(out) == sorted(GLUE_MARKER_NAMES)


@pytest.mark.parametrize(
    "metric,fn",
    [
        (ParticipationRatio(), lambda x, y: participation_ratio(x)),
        (NumericalRank(), lambda x, y: numerical_rank(x)),
        (EffectiveRank(centered=False), lambda x, y: effective_rank(x, centered=False)),
        (NeuralCollapse(), neural_collapse),
        (LocalIntrinsicDimension(k=8), lambda x, y: local_intrinsic_dimension(x, k=8)),
        (WithinClassDistance(), within_class_distance),
    ],
)
def test_single_marker_metrics_match_functional(metric, fn):
    x, y = gaussian_classes(n_classes=4, per_class=20, dim=8)
    metric.update(x[:33], y[:33])
    metric.update(x[33:], y[33:])
    assert float(metric.compute()) == pytest.approx(float(fn(x, y)), rel=1e-9)
    metric.reset()
    with pytest.raises(ValueError, match="before update"):
        metric.compute()


def test_metric_rejects_bad_input():
    metric = GeometryMarkers()
    with pytest.raises(ValueError, match="rows but `labels` has"):
        metric.update(torch.randn(5, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        metric.update(torch.full((2, 3), float("nan")), torch.zeros(2))
    with pytest.raises(ValueError, match="Unknown marker"):
        GeometryMarkers(markers=["capacity"])


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = gaussian_classes(n_classes=4, per_class=30, dim=12)
        shard = torch.arange(0, 90) if rank == 0 else torch.arange(90, 120)  # uneven; rank 1 has one class
        metric = GeometryMarkers(**SUITE)
        metric.update(x[shard], y[shard])
        values = {k: float(v) for k, v in metric.compute().items()}
        torch.save(values, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metric_under_two_process_gloo_equals_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    x, y = gaussian_classes(n_classes=4, per_class=30, dim=12)
    single = GeometryMarkers(**SUITE)
    single.update(x, y)
    expected = {k: float(v) for k, v in single.compute().items()}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (rank, name)


def test_unknown_protocol_argument_is_rejected_at_construction():
    with pytest.raises(TypeError, match="points_per_clas"):
        GeometryMarkers(points_per_clas=10)
