"""torchmetrics classes: the checks torchmetrics applies to its own metrics (pickle, clone, state_dict,
reset, a real 2-process gloo gather of uneven shards, higher_is_better), bounded memory, batching/order
invariance, and agreement with the functional layer on an independently selected sample."""

from __future__ import annotations

import io
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from lightning_geomarkers.errors import GeomarkersWarning
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
    PerClassSample,
    WithinClassDistance,
    class_priority,
    sample_keys,
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
    with pytest.raises(ValueError, match="must be 2-D"):
        metric.update(torch.randn(4, 3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="no columns"):
        metric.update(torch.randn(4, 0), torch.zeros(4))


def test_metric_accepts_an_empty_batch_like_its_sample():
    """A rank without data offers a (0, N) batch; it records N and changes nothing else."""
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(60) % 3
    metric = ParticipationRatio(samples_per_class=10, seed=0)
    metric.update(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    assert metric.feature_dim == 6 and metric.num_stored == 0 and metric.n_seen == {}
    metric.update(x.numpy(), y)  # array-likes are still converted
    fresh = ParticipationRatio(samples_per_class=10, seed=0)
    fresh.update(x, y)
    assert torch.equal(metric.compute(), fresh.compute())
    assert torch.equal(metric.compute(), participation_ratio(fresh.state()[0]))


SAMPLE = dict(samples_per_class=12, max_classes=3, seed=1)  # 4 classes of 30: both limits bite


def _make_metrics() -> dict[str, Metric]:
    """One instance of every Metric class of the package, with a bounded sample smaller than the data."""
    return {
        "PerClassSample": PerClassSample(**SAMPLE),
        "GeometryMarkers": GeometryMarkers(n_t=30, n_pairs=None, lid_k=5, **SAMPLE),
        "GlueMarkers": GlueMarkers(n_t=30, n_pairs=None, **SAMPLE),
        "ParticipationRatio": ParticipationRatio(**SAMPLE),
        "NumericalRank": NumericalRank(**SAMPLE),
        "EffectiveRank": EffectiveRank(**SAMPLE),
        "NeuralCollapse": NeuralCollapse(**SAMPLE),
        "LocalIntrinsicDimension": LocalIntrinsicDimension(k=5, **SAMPLE),
        "WithinClassDistance": WithinClassDistance(**SAMPLE),
    }


def _value(out) -> dict[str, torch.Tensor]:
    """A compute() result as a flat dict of tensors (the sample: its three tensors)."""
    if isinstance(out, tuple):
        return dict(zip(("features", "labels", "keys"), out, strict=True))
    if isinstance(out, dict):
        return dict(out)
    return {"value": out}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], context) -> None:
    assert got.keys() == expected.keys(), context
    for name, value in expected.items():
        if name in ("features", "labels", "keys"):  # the sample itself: exactly the same rows
            assert torch.equal(got[name].cpu(), value.cpu()), (context, name)
        else:  # a marker computed from it (thread counts may differ between processes)
            assert float(got[name]) == pytest.approx(float(value), rel=1e-9, abs=1e-12), (context, name)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = gaussian_classes(n_classes=4, per_class=30, dim=12)
        shard = torch.arange(0, 90) if rank == 0 else torch.arange(90, 120)  # uneven; rank 1 has one class
        results = {}
        for name, metric in _make_metrics().items():
            for part in shard.split(25):
                metric.update(x[part], y[part])
            results[name] = _value(metric.compute())  # compute() gathers (torchmetrics sync_context)
        lonely = PerClassSample(**SAMPLE)  # only rank 0 has data: rank 1 takes part with empty states
        if rank == 0:
            lonely.update(x, y)
        lonely.sync()
        results["lonely"] = _value(lonely.state())
        results["lonely_n_seen"] = lonely.n_seen
        lonely.unsync()
        results["lonely_local_rows"] = lonely.num_stored
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_metric_under_two_process_gloo_equals_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    x, y = gaussian_classes(n_classes=4, per_class=30, dim=12)
    expected = {}
    for name, metric in _make_metrics().items():
        metric.update(x, y)
        expected[name] = _value(metric.compute())
    lonely = PerClassSample(**SAMPLE)
    lonely.update(x, y)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, values in expected.items():
            _assert_same(got[name], values, (rank, name))
        _assert_same(got["lonely"], _value(lonely.state()), (rank, "lonely"))
        assert got["lonely_n_seen"] == {c: 30 for c in range(4)}
        assert got["lonely_local_rows"] == (36 if rank == 0 else 0)  # unsync() restored the local sample
    assert expected["PerClassSample"]["features"].shape == (36, 12)  # 3 classes x 12 of 4 x 30 rows


def test_unknown_protocol_argument_is_rejected_at_construction():
    with pytest.raises(TypeError, match="points_per_clas"):
        GeometryMarkers(points_per_clas=10)


# ------------------------------------------------------------------ the checks torchmetrics applies


@pytest.mark.parametrize("name", list(_make_metrics()))
def test_metric_pickle_clone_state_dict_and_reset(name):
    x, y = gaussian_classes(n_classes=4, per_class=30, dim=12)
    metric = _make_metrics()[name]
    for part in torch.arange(120).split(40):
        metric.update(x[part], y[part])
    pickled = pickle.loads(pickle.dumps(metric))
    cloned = metric.clone()
    metric.persistent(True)
    buffer = io.BytesIO()
    torch.save(metric.state_dict(), buffer)  # what a checkpoint does
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert {"features", "labels", "keys", "seen_classes", "seen_counts"} <= set(state)
    loaded = _make_metrics()[name]
    loaded.load_state_dict(state)

    expected = _value(metric.compute())
    for copy in (pickled, cloned, loaded):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torchmetrics' "compute before update"
            _assert_same(_value(copy.compute()), expected, (name, type(copy).__name__))
        assert copy.n_seen == {c: 30 for c in range(4)}
    cloned.update(x[:5] + 1, y[:5])  # a clone is independent of the original
    assert metric.n_seen == {c: 30 for c in range(4)}
    _assert_same(_value(metric.compute()), expected, (name, "after the clone's update"))

    metric.reset()
    assert metric.num_stored == 0 and metric.n_seen == {} and not metric.is_synced
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        if name == "PerClassSample":
            assert metric.compute()[0].shape == (0, 0)
        else:
            with pytest.raises(ValueError, match="before update"):
                metric.compute()
    for part in torch.arange(120).split(40):  # usable again after reset, with the same result
        metric.update(x[part], y[part])
    _assert_same(_value(metric.compute()), expected, (name, "after reset"))


def test_higher_is_better_follows_the_marker_table():
    from lightning_geomarkers.functional.suite import MARKERS

    singles = {
        ParticipationRatio: "participation_ratio",
        NumericalRank: "numerical_rank",
        EffectiveRank: "effective_rank",
        NeuralCollapse: "nc1",
        LocalIntrinsicDimension: "lid",
        WithinClassDistance: "within_class_distance",
    }
    for cls, marker in singles.items():
        assert cls.higher_is_better is MARKERS[marker].higher_is_better, cls
    assert LocalIntrinsicDimension.higher_is_better is MARKERS["lid_twonn"].higher_is_better
    assert ParticipationRatio.higher_is_better is True and LocalIntrinsicDimension.higher_is_better is False
    assert NeuralCollapse.higher_is_better is None  # the sign flips between settings
    suite = GeometryMarkers(markers="all")
    assert suite.higher_is_better is None  # mixed signs
    assert suite.higher_is_better_per_marker == {m: MARKERS[m].higher_is_better for m in suite.markers}
    glue = GlueMarkers()
    assert glue.higher_is_better is None
    assert glue.higher_is_better_per_marker["glue_dimension"] is True
    assert glue.higher_is_better_per_marker["glue_radius"] is False
    assert sorted(glue.higher_is_better_per_marker) == sorted(GLUE_MARKER_NAMES)
    with pytest.raises(RuntimeError, match="Can't change const"):
        suite.higher_is_better = True


# ----------------------------------------------------------------- bounded, partition-invariant state


def test_metric_memory_stays_bounded_at_100x_capacity():
    """k=4 per class x 5 kept classes = 20 rows; 100x that (2000 rows of 20 classes) is offered."""
    x, y = gaussian_classes(n_classes=20, per_class=100, dim=6)
    metric = GeometryMarkers(markers=["participation_ratio"], samples_per_class=4, max_classes=5)
    metric.compact_min_rows = 32
    peak = 0
    for part in torch.randperm(2000, generator=torch.Generator().manual_seed(0)).split(25):
        metric.update(x[part], y[part])
        peak = max(peak, sum(int(t.shape[0]) for t in metric.features))
        assert metric.num_stored <= 20
    assert peak <= 32 + 20 + 25, peak  # pending buffer + store + one batch
    assert metric.num_stored == 20 and len(metric.n_seen) == 20
    # The seen counts are summed lazily (amortised), so they hold at most the distinct classes plus
    # 1024 entries of batch chunks (and one batch) at any time.
    assert sum(int(c.numel()) for c in metric.seen_classes) <= 20 + 1024 + 25


def test_metric_state_is_independent_of_batch_split_and_order():
    x, y = gaussian_classes(n_classes=6, per_class=40, dim=10)
    results = []
    for seed, size in ((0, 240), (1, 17), (2, 1), (3, 64)):
        metric = GeometryMarkers(n_t=30, n_pairs=None, lid_k=5, samples_per_class=15, max_classes=4)
        perm = torch.randperm(240, generator=torch.Generator().manual_seed(seed))
        for part in perm.split(size):
            metric.update(x[part], y[part])
        results.append((metric.state(), metric.compute()))
    (f0, y0, k0), v0 = results[0]
    for (f, yy, k), v in results[1:]:
        assert torch.equal(f, f0) and torch.equal(yy, y0) and torch.equal(k, k0)
        assert v.keys() == v0.keys() and all(torch.equal(v[m], v0[m]) for m in v0)


def _reference_sample(x, y, k, max_classes, seed):
    """The bottom-k sample chosen independently: class subset by priority, per class the k smallest keys
    (the keys hash the features, as update() does by default), ordered by (label, key) by Python sorting."""
    keys = sample_keys(x, y, seed).tolist()
    classes = sorted(set(y.tolist()))
    priority = dict(zip(classes, class_priority(torch.tensor(classes), seed).tolist(), strict=True))
    kept = sorted(sorted(classes, key=lambda c: (priority[c], c))[:max_classes])
    rows = []
    for c in kept:
        members = [i for i in range(len(y)) if int(y[i]) == c]
        rows += sorted(members, key=lambda i: keys[i])[:k]
    rows_t = torch.tensor(rows)
    return x[rows_t], y[rows_t]


def test_metric_classes_equal_functional_on_an_independently_chosen_sample():
    x, y = gaussian_classes(n_classes=6, per_class=40, dim=10, seed=3)
    k, m, seed = 15, 4, 5
    xs, ys = _reference_sample(x, y, k, m, seed)
    assert xs.shape == (60, 10)
    cases = [
        (ParticipationRatio, {}, lambda: participation_ratio(xs)),
        (NumericalRank, {}, lambda: numerical_rank(xs)),
        (EffectiveRank, {"centered": False}, lambda: effective_rank(xs, centered=False)),
        (NeuralCollapse, {}, lambda: neural_collapse(xs, ys)),
        (LocalIntrinsicDimension, {"k": 6}, lambda: local_intrinsic_dimension(xs, k=6)),
        (WithinClassDistance, {}, lambda: within_class_distance(xs, ys)),
    ]
    for cls, kwargs, fn in cases:
        metric = cls(samples_per_class=k, max_classes=m, seed=seed, **kwargs)
        for part in torch.arange(240).flip(0).split(50):
            metric.update(x[part], y[part])
        assert float(metric.compute()) == pytest.approx(float(fn()), rel=1e-9), cls.__name__
    suite = GeometryMarkers(n_t=30, n_pairs=None, lid_k=5, samples_per_class=k, max_classes=m, seed=seed)
    for part in torch.arange(240).split(33):
        suite.update(x[part], y[part])
    direct = geometry_markers(
        xs, ys, generator=seed, n_t=30, n_pairs=None, lid_k=5, points_per_class=k
    ).values
    got = suite.compute()
    assert got.keys() == direct.keys() and len(got) == 13
    for name, value in direct.items():
        assert float(got[name]) == pytest.approx(float(value), rel=1e-9, abs=1e-12), name


def test_metric_uses_given_keys_to_pick_the_same_inputs_whatever_the_features():
    """With keys from the inputs (as the monitor passes), the kept samples do not move when the features do."""
    x, y = gaussian_classes(n_classes=3, per_class=30, dim=8)
    keys = sample_keys(x, y, 0)
    a = ParticipationRatio(samples_per_class=10)
    b = ParticipationRatio(samples_per_class=10)
    a.update(x, y, keys)
    b.update(x * 1.000001 + 1e-6, y, keys)  # perturbed "features" of the same inputs
    assert torch.equal(a.state()[2], b.state()[2])
    c = ParticipationRatio(samples_per_class=10)
    c.update(x * 1.000001 + 1e-6, y)  # keyed on the features: another subset
    assert not torch.equal(a.state()[2], c.state()[2])


def test_forward_and_merge_state_accumulate_like_update():
    """forward() (``metric(x, y)``) adds the batch like update() and returns None; merge_state()
    concatenates list states; the sample re-selects on the next read, so both equal plain updates."""
    x, y = gaussian_classes(n_classes=4, per_class=30, dim=8)
    plain = GeometryMarkers(markers=["participation_ratio", "nc1"], samples_per_class=10, max_classes=3)
    plain.update(x, y)
    stepped = GeometryMarkers(markers=["participation_ratio", "nc1"], samples_per_class=10, max_classes=3)
    for part in torch.arange(120).split(40):
        assert stepped(x[part], y[part]) is None
    halves = [PerClassSample(10, 3, seed=0), PerClassSample(10, 3, seed=0)]
    halves[0].update(x[::2], y[::2])
    halves[1].update(x[1::2], y[1::2])
    halves[0].merge_state(halves[1])
    for got in (stepped, halves[0]):
        for a, b in zip(got.state(), plain.state(), strict=True):
            assert torch.equal(a, b)
        assert got.n_seen == plain.n_seen == {c: 30 for c in range(4)}
    assert torch.equal(stepped.compute()["nc1"], plain.compute()["nc1"])


@pytest.mark.parametrize("cls", [LocalIntrinsicDimension, NeuralCollapse])
def test_forward_keeps_earlier_batches_where_one_batch_alone_has_no_value(cls):
    """A batch with too few points (LID's k) or a single class (NC1) has no marker value of its own.
    torchmetrics' default forward computed it on the batch alone and, when that raised, left only the
    batch in the state; forward now only accumulates, so the epoch's value is the one of every batch."""
    x, y = gaussian_classes(n_classes=3, per_class=40, dim=16)
    kwargs = dict(k=20) if cls is LocalIntrinsicDimension else {}
    reference = cls(samples_per_class=40, **kwargs)
    reference.update(x, y)
    stepped = cls(samples_per_class=40, **kwargs)
    for part in torch.arange(120).split(16):  # 16 < k + 1 points; the first batches hold one class
        stepped(x[part], y[part])
    assert stepped.num_stored == 120
    assert torch.equal(stepped.compute(), reference.compute())
    with pytest.raises(ValueError):  # what the old forward ran on the first batch (one class, 16 rows)
        alone = cls(samples_per_class=40, **kwargs)
        alone.update(x[:16], y[:16])
        alone.compute()
    stepped.sync(should_sync=True, distributed_available=lambda: True, dist_sync_fn=lambda t, group=None: [t])
    with pytest.raises(TorchMetricsUserError, match="unsync"):
        stepped(x[:4], y[:4])


def test_metric_collection_shares_a_sample_only_between_equal_configurations():
    """MetricCollection's compute groups share the states of metrics whose states are equal after the
    first update; the configuration state keeps samples with different arguments apart."""
    x, y = gaussian_classes(n_classes=4, per_class=400, dim=8)
    make = {
        "pr": lambda: ParticipationRatio(samples_per_class=10),
        "nc1": lambda: NeuralCollapse(samples_per_class=10),
        "wcd": lambda: WithinClassDistance(samples_per_class=20),
        "wcd_seed": lambda: WithinClassDistance(samples_per_class=20, seed=1),
    }
    collection = MetricCollection({name: fn() for name, fn in make.items()})
    # small batches: the first one (< 10 rows per class) leaves k=10 and k=20 with equal states; then
    # enough rows to force merges of the pending buffer
    for part in torch.randperm(1600, generator=torch.Generator().manual_seed(0)).split(8):
        collection.update(x[part], y[part])
    groups = sorted(sorted(g) for g in collection.compute_groups.values())
    assert groups == [["nc1", "pr"], ["wcd"], ["wcd_seed"]]
    out = collection.compute()
    for name, fn in make.items():
        alone = fn()
        alone.update(x, y)
        assert float(out[name]) == pytest.approx(float(alone.compute()), rel=1e-12), name


def test_loading_a_state_saved_with_other_arguments_is_refused():
    x, y = gaussian_classes(n_classes=3, per_class=20, dim=4)
    saved = PerClassSample(5, max_classes=None, seed=2)
    saved.update(x, y)
    saved.persistent(True)
    other = PerClassSample(8, max_classes=None, seed=2)
    with pytest.raises(ValueError, match=r"samples_per_class=5, max_classes=None, seed=2.*saved arguments"):
        other.load_state_dict(saved.state_dict())
    assert other.num_stored == 0 and other.samples_per_class == 8
    other.update(x, y)  # still usable with its own arguments
    assert other.num_stored == 24


# --------------------------------------------------------------- found by a review of the metric layer


def _batches(n_classes=4, per_class=30, dim=6, seed=0):
    x, y = gaussian_classes(n_classes=n_classes, per_class=per_class, dim=dim, seed=seed)
    keys = sample_keys(x, y, 0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order], keys[order]


def test_a_collection_never_shares_the_sample_of_metrics_with_close_large_seeds():
    """MetricCollection shares state between metrics whose states are allclose (rtol 1e-5): the
    configuration [k, max_classes, seed] made seeds 1_700_000_000 and 1_700_000_001 'equal', and the
    second metric read the first one's sample through its own class subset (one class, a wrong value)."""
    x, y, k = _batches(n_classes=8)
    first = torch.argsort(y, stable=True)  # a first batch of fewer classes than max_classes: equal states
    x, y, k = x[first], y[first], k[first]
    seeds = (1_700_000_000, 1_700_000_001)
    make = {
        f"s{i}": (lambda s=s: ParticipationRatio(samples_per_class=10, max_classes=3, seed=s))
        for i, s in enumerate(seeds)
    }
    collection = MetricCollection({name: fn() for name, fn in make.items()}, compute_groups=True)
    separate = {name: fn() for name, fn in make.items()}
    for part in torch.arange(len(y)).split(7):
        collection.update(x[part], y[part], k[part])
        for metric in separate.values():
            metric.update(x[part], y[part], k[part])
    assert all(len(group) == 1 for group in collection.compute_groups.values())
    got = collection.compute()
    for name, metric in separate.items():
        assert torch.equal(got[name], metric.compute())


def test_chunks_of_different_dtypes_are_merged_instead_of_crashing():
    """merge_state of a float32 and a float16 sample (and torchmetrics' forward of PerClassSample) joined
    chunks of two dtypes, and the compaction's copy raised until reset()."""
    x, y, k = _batches()
    a, b, whole = (ParticipationRatio(samples_per_class=10) for _ in range(3))
    a.update(x[:60], y[:60], k[:60])
    b.update(x[60:].half(), y[60:], k[60:])
    whole.update(x[:60], y[:60], k[:60])
    whole.update(x[60:].half(), y[60:], k[60:])
    a.merge_state(b)
    assert torch.equal(a.compute(), whole.compute())
    sample = PerClassSample(10)
    sample(x[:60], y[:60], k[:60])  # torchmetrics' own forward: the batch state, then a merge
    sample(x[60:].half(), y[60:], k[60:])
    assert sample.state()[0].dtype == torch.float32 and sample.num_stored == whole.num_stored


def test_set_dtype_applies_from_the_first_batch():
    x, y, k = _batches()
    one, two = ParticipationRatio(samples_per_class=10), ParticipationRatio(samples_per_class=10)
    for metric in (one, two):
        metric.set_dtype(torch.float16)
    one.update(x, y, k)
    two.update(x[:50], y[:50], k[:50])
    two.update(x[50:], y[50:], k[50:])
    assert one.state()[0].dtype == two.state()[0].dtype == torch.float16
    assert torch.equal(one.compute(), two.compute())


def test_collection_forward_after_update_counts_each_batch_once():
    """The members of a compute group share their list states; the collection's forward calls every
    member, so each batch was appended once per member (n_seen tripled)."""
    x, y, k = _batches()
    collection = MetricCollection(
        {"pr": ParticipationRatio(samples_per_class=10), "nc": NeuralCollapse(samples_per_class=10)},
        compute_groups=True,
    )
    collection.update(x[:30], y[:30], k[:30])
    for part in torch.arange(30, len(y)).split(30):
        collection(x[part], y[part], k[part])
    alone = ParticipationRatio(samples_per_class=10)
    alone.update(x, y, k)
    assert collection["pr"].n_seen == collection["nc"].n_seen == alone.n_seen
    assert torch.equal(collection.compute()["pr"], alone.compute())


def test_merge_state_refuses_a_sample_with_other_arguments():
    a, b = PerClassSample(6, max_classes=3, seed=0), PerClassSample(20, max_classes=None, seed=9)
    b.update(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"Cannot merge a sample with .*\(20, None, 9\).*\(6, 3, 0\)"):
        a.merge_state(b)


def test_a_state_saved_with_the_three_number_configuration_still_loads():
    sample = PerClassSample(5, max_classes=3, seed=7)
    sample.persistent(True)
    sample.update(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]))
    state = sample.state_dict()
    state["sample_config"] = torch.tensor([5, 3, 7])  # the form earlier versions wrote
    loaded = PerClassSample(5, max_classes=3, seed=7)
    loaded.persistent(True)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.state()[0], sample.state()[0])
    other = PerClassSample(5, max_classes=3, seed=8)
    other.persistent(True)
    with pytest.raises(ValueError, match="saved by a sample with samples_per_class=5, max_classes=3, seed=7"):
        other.load_state_dict(state)


def test_default_keys_that_repeat_and_negative_labels_are_warned_once():
    """Without `keys` a row's key hashes its features: all-zero ReLU rows were merged into one sample
    without a word (97 of 200 rows kept), and -100 labels became a class (NC1 24.1 against 14.5)."""
    x, y = gaussian_classes(n_classes=4, per_class=50, dim=6)
    x = x.relu() * (torch.arange(len(y)) % 2 == 0)[:, None]  # half the rows all zero
    metric = ParticipationRatio(samples_per_class=50)
    with pytest.warns(
        GeomarkersWarning, match=r"of 200 rows of a batch have the same features.*keys=sample_keys"
    ) as record:
        metric.update(x, y)
    assert record[0].filename == __file__  # pointed at the caller, not at torchmetrics or this package
    metric.update(x, y)  # once per metric
    labelled = NeuralCollapse(samples_per_class=50)
    with pytest.warns(GeomarkersWarning, match=r"negative labels \[-100\] are kept as classes"):
        labelled.update(torch.randn(4, 3), torch.tensor([0, 1, -100, 1]))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LocalIntrinsicDimension(method="two_nn"), "`method` must be one of"),
        (lambda: LocalIntrinsicDimension(k=0), "`k` must be"),
        (lambda: NumericalRank(rtol=-1), r"`rtol` must be in \(0, 1\]"),
        (lambda: NeuralCollapse(rtol=2.0), r"`rtol` must be in \(0, 1\]"),
        (lambda: EffectiveRank(centered="yes"), "`centered` must be a bool"),
        (lambda: GeometryMarkers(n_t=-5), "`n_t` must be"),
        (lambda: GlueMarkers(glue_protocol="bogus"), "`glue_protocol` must be 'pairs' or 'joint'"),
    ],
)
def test_bad_arguments_are_refused_at_construction(make, match):
    """They were accepted and failed only at compute(), at the end of the epoch."""
    with pytest.raises((ValueError, TypeError), match=match):
        make()


class _Counting(PerClassSample):
    """A subclass with a state of its own (rows offered, summed over ranks)."""

    def __init__(self) -> None:
        super().__init__(5, max_classes=None, seed=0)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, features, labels, keys=None):
        super().update(features, labels, keys)
        self.total += float(features.shape[0])


def test_a_subclass_state_is_still_gathered_by_the_sync():
    """The sample's own two-phase sync replaced torchmetrics' gather, so a state a subclass adds was no
    longer synced (each rank kept its own sum)."""
    from tests.test_sample_metric import _sync_as_ranks

    x, y, k = _batches()
    ranks = [_Counting(), _Counting()]
    ranks[0].update(x[:50], y[:50], k[:50])
    ranks[1].update(x[50:], y[50:], k[50:])
    _sync_as_ranks(ranks)
    assert [float(r.total) for r in ranks] == [float(len(y))] * 2


def test_merge_state_then_a_narrower_batch_keeps_the_widest_dtype():
    x, y, k = _batches()
    for first, second in ((torch.float16, torch.float64), (torch.float64, torch.float16)):
        a, b = PerClassSample(10), PerClassSample(10)
        a.update(x[:40].to(first), y[:40], k[:40])
        b.update(x[40:80].to(second), y[40:80], k[40:80])
        a.merge_state(b)  # chunks of both dtypes, in either order
        a.update(x[80:], y[80:], k[80:])  # float32
        assert a.state()[0].dtype == torch.float64


def test_set_dtype_by_name_holds_from_the_first_batch():
    x, y, k = _batches()
    sample = PerClassSample(10)
    sample.set_dtype("torch.HalfTensor")
    sample.update(x, y, k)
    assert sample.state()[0].dtype == torch.float16


def test_seeds_that_differ_in_the_top_bit_are_different_arguments():
    """The keys use all 64 bits of the seed; the stored configuration kept it modulo 2**63, so seeds 0 and
    2**63 (different samples) passed the merge and DDP checks as equal."""
    a, b = PerClassSample(5, seed=0), PerClassSample(5, seed=1 << 63)
    b.update(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="Cannot merge"):
        a.merge_state(b)


def test_forward_warnings_point_at_the_callers_line():
    x, y = gaussian_classes(n_classes=4, per_class=50, dim=6)
    x = x.relu() * (torch.arange(len(y)) % 2 == 0)[:, None]
    metric = ParticipationRatio(samples_per_class=50)
    with pytest.warns(GeomarkersWarning, match="have the same features") as record:
        metric(x, y)  # through nn.Module.__call__ and torchmetrics' wrappers
    assert record[0].filename == __file__


def test_a_refused_sync_leaves_a_subclass_state_as_it_was():
    """The subclass's states were gathered before the feature widths were compared: a sync refused for
    different widths left them holding the global values (counted again by a later compute)."""
    from tests.test_sample_metric import _sync_as_ranks

    ranks = [_Counting(), _Counting()]
    ranks[0].update(torch.randn(5, 4), torch.tensor([0, 0, 1, 1, 1]))
    ranks[1].update(torch.randn(5, 5), torch.tensor([0, 0, 1, 1, 1]))
    with pytest.raises(RuntimeError, match="Feature dimensions differ"):
        _sync_as_ranks(ranks)
    assert [float(r.total) for r in ranks] == [5.0, 5.0]
