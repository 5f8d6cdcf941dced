"""Offline evaluation (``GeometryMonitor.evaluate``) equals the live values, works on plain modules and
leaves no trace; the per-class view equals a direct loop and reaches TensorBoard as an image."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomarkers import GeometryMonitor, MonitorWarning
from lightning_geomarkers.callbacks._heatmap import colormap, render_heatmap
from lightning_geomarkers.callbacks.offline import evaluate_model
from lightning_geomarkers.functional import geometry_markers, glue_pairs
from lightning_geomarkers.functional.per_class import pairwise_matrix, per_class_glue
from tests.lightning_helpers import TinyMLP, gaussian_classes, loaders, read_events, trainer

SMALL = dict(n_t=30, n_pairs=None, lid_k=10)


def fit_with_checkpoints(tmp_path: Path, monitor: GeometryMonitor, epochs: int = 3, per_class: int = 40):
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=per_class)
    train, val = loaders(x, y)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    tr = trainer(tmp_path, [monitor, ckpt], max_epochs=epochs, logger=False)
    tr.fit(TinyMLP(), train, val)
    return sorted((tmp_path / "ckpt").glob("*.ckpt")), val


@pytest.mark.parametrize(
    "settings",
    [
        dict(samples_per_class=20, **SMALL),  # bottom-k sampling keeps 20 of 32 validation samples per class
        dict(
            layers=["body.1", "fc:input"], samples_per_class=6, max_classes=3, glue_protocol="joint", **SMALL
        ),
    ],
    ids=["default-layer", "two-layers-class-subset-joint"],
)
def test_checkpoint_evaluated_offline_equals_the_values_logged_live(tmp_path, settings):
    monitor = GeometryMonitor(**settings)
    paths, val = fit_with_checkpoints(tmp_path, monitor)
    assert len(paths) == 3
    live: dict[int, dict[str, float]] = {}
    for entry in monitor.history:
        for marker, value in entry.items():
            if marker in monitor.markers:  # (the history also keeps standard errors, which are not logged)
                layer = entry["layer"].replace(":", "_")
                key = f"geometry/{marker}" if "layers" not in settings else f"geometry/{layer}/{marker}"
                live.setdefault(entry["epoch"], {})[key] = value
    assert sorted(live) == [0, 1, 2]
    fresh = GeometryMonitor(**settings)  # a monitor with the same settings that never saw a Trainer
    for path in paths:
        epoch = torch.load(path, map_location="cpu", weights_only=False)["epoch"]
        model = TinyMLP.load_from_checkpoint(path)
        offline = monitor.evaluate(model, val)
        assert set(offline) == set(live[epoch])
        for key, value in live[epoch].items():
            assert offline[key] == pytest.approx(value, rel=1e-5, abs=1e-8), (path.name, key)
        assert fresh.evaluate(model, val) == offline
    if "layers" in settings:  # the class subset: only 3 of the 5 classes, as live
        assert "geometry/body.1/glue_dimension" in offline and "geometry/fc_input/nc1" in offline


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_a_true_precision_run_is_reproduced_offline(tmp_path, precision):
    """Lightning's 64-true / bf16-true runs convert every batch's floating tensors to the model's dtype
    before the loop sees them; evaluate() ran the model on the loader's float32 batches and crashed
    ("mat1 and mat2 must have the same dtype"). It converts them the same way now, and reproduces the
    logged values."""
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=20)
    train, val = loaders(x, y)
    monitor = GeometryMonitor(**SMALL)
    tr = trainer(tmp_path, [monitor], max_epochs=1, logger=False, precision=precision)
    model = TinyMLP()
    tr.fit(model, train, val)
    logged = monitor.history[-1]
    offline = monitor.evaluate(model, val)
    assert offline["geometry/glue_dimension"] == pytest.approx(logged["glue_dimension"], rel=1e-9)
    assert offline["geometry/nc1"] == pytest.approx(logged["nc1"], rel=1e-9)


class Net(nn.Module):
    def __init__(self, dim: int = 16, width: int = 24, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Dropout(0.5))
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def test_plain_module_equals_a_direct_computation_and_leaves_no_trace():
    torch.manual_seed(0)
    x, y = gaussian_classes(per_class=30)
    model = Net()
    model.train()
    model.norm.eval()  # a mixed mode that must come back as it was
    with torch.no_grad():
        model(x)  # give the BatchNorm running statistics something (it stays in eval mode)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = GeometryMonitor(
        markers=["glue_dimension", "glue_utility", "participation_ratio", "nc1"], seed=3, **SMALL
    )
    values = monitor.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=17))

    # The monitored layer is the head's input (layers=None), in eval mode: no dropout.
    model.eval()
    with torch.no_grad():
        feats = model.norm(model.body(x))
    report = geometry_markers(
        feats, y, markers=monitor.markers, generator=3, n_t=30, n_pairs=None, points_per_class=50, lid_k=10
    )
    assert set(values) == {f"geometry/{m}" for m in report.values}
    for name, value in report.values.items():
        assert values[f"geometry/{name}"] == pytest.approx(float(value), rel=1e-5), name
    # No trace: modes restored per module, hooks removed, weights and running statistics untouched.
    model.train()
    model.norm.eval()
    values_again = monitor.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=64))
    assert values_again == pytest.approx(values, rel=1e-9)  # batching does not matter
    assert model.training and model.body.training and not model.norm.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert monitor.history == [] and monitor._hooks == {}


def test_dict_batches_forward_fn_and_clear_errors():
    x, y = gaussian_classes(per_class=20)
    model = Net()
    monitor = GeometryMonitor(markers=["participation_ratio"], **SMALL)
    dict_batches = [{"x": x[i : i + 25], "label": y[i : i + 25]} for i in range(0, len(y), 25)]
    by_key = monitor.evaluate(model, dict_batches)
    assert set(by_key) == {"geometry/participation_ratio"}
    # Inputs the monitor cannot find: the error names forward_fn, and forward_fn fixes it.
    odd = [{"features": b["x"], "label": b["label"]} for b in dict_batches]
    with pytest.raises(TypeError, match="forward_fn"):
        monitor.evaluate(model, odd)
    assert monitor.evaluate(model, odd, forward_fn=lambda m, b: m(b["features"])) == pytest.approx(by_key)
    with pytest.raises(ValueError, match="no batch"):
        monitor.evaluate(model, [])
    with pytest.raises(ValueError, match="no submodule named 'body.l'. Did you mean"):
        GeometryMonitor(layers="body.l").evaluate(model, dict_batches)
    with pytest.raises(TypeError, match="iterable of batches"):
        monitor.evaluate(model, 3)
    # A list of DataLoaders: the monitor's dataloader_idx picks one.
    loaders_ = [DataLoader(TensorDataset(x[:10], y[:10])), DataLoader(TensorDataset(x, y), batch_size=25)]
    second = GeometryMonitor(markers=["participation_ratio"], dataloader_idx=1, **SMALL)
    assert second.evaluate(model, loaders_) == pytest.approx(by_key)


def test_hooks_removed_and_mode_restored_when_the_forward_raises():
    model = Net()
    model.train()
    x, y = gaussian_classes(per_class=10)

    def broken(m, batch):
        m(batch[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        GeometryMonitor(**SMALL).evaluate(
            model, DataLoader(TensorDataset(x, y), batch_size=8), forward_fn=broken
        )
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_layer_that_never_runs_warns_and_no_value_raises():
    model = Net()
    x, y = gaussian_classes(per_class=10)
    monitor = GeometryMonitor(layers="body.2", **SMALL)  # Dropout: runs
    ok = monitor.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=25))
    assert ok
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="computed no marker.*never ran"):
            monitor.evaluate(
                model, DataLoader(TensorDataset(x, y), batch_size=25), forward_fn=lambda m, b: None
            )
    assert any(issubclass(w.category, MonitorWarning) for w in caught)


def test_transfer_hooks_get_the_monitored_dataloader_idx():
    class RecordsTransfer(TinyMLP):
        seen: list[int] = []

        def on_before_batch_transfer(self, batch, dataloader_idx):
            self.seen.append(dataloader_idx)
            return batch

    x, y = gaussian_classes(per_class=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=25)
    model = RecordsTransfer()
    monitor = GeometryMonitor(markers=["participation_ratio"], dataloader_idx=1)
    assert monitor.evaluate(model, [loader, loader])
    assert model.seen == [1, 1]  # was 0: the hooks saw the batches as those of another loader


def test_live_and_offline_share_the_empty_sample_checks():
    from lightning_geomarkers.callbacks._layers import FeatureHook
    from lightning_geomarkers.metrics.sample import PerClassSample

    monitor = GeometryMonitor(markers=["participation_ratio"])
    hook = FeatureHook(nn.Linear(2, 2), "output", "auto", name="fc")
    empty = PerClassSample(5, None, seed=0)
    with pytest.raises(RuntimeError, match=r"layer 'fc' was never called during validation.*layers="):
        monitor._sample_for("fc", hook, empty)
    hook.error = ValueError("boom")
    with pytest.raises(RuntimeError, match=r"feature capture failed: boom"):
        monitor._sample_for("fc", hook, empty)


class EvaluateDuringFit(L.Callback):
    """Calls monitor.evaluate on another loader in the middle of the live capture."""

    def __init__(self, monitor, loader):
        self.monitor, self.loader, self.calls = monitor, loader, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.monitor.evaluate(pl_module, self.loader)
            self.calls += 1


def test_evaluate_during_a_live_fit_does_not_disturb_it(tmp_path):
    x, y = gaussian_classes()
    other_x, other_y = gaussian_classes(seed=5)
    results = []
    for interfere in (False, True):
        L.seed_everything(0, verbose=False)
        monitor = GeometryMonitor(samples_per_class=20, **SMALL)
        extra = [EvaluateDuringFit(monitor, DataLoader(TensorDataset(other_x, other_y), batch_size=50))]
        # The interfering callback runs before the monitor's own batch-end capture.
        tr = trainer(
            tmp_path / str(interfere),
            [*extra, monitor] if interfere else [monitor],
            max_epochs=1,
            logger=False,
        )
        train, val = loaders(x, y)
        tr.fit(TinyMLP(), train, val)
        results.append(monitor.history)
        if interfere:
            assert extra[0].calls > 0
    assert len(results[0]) == len(results[1]) == 1
    assert results[1][0] == results[0][0]


# ------------------------------------------------------------------------------------- per-class view


def direct_per_class(res, marker):
    classes = sorted({int(c) for c in res.pairs.flatten().tolist()})
    out = {}
    for c in classes:
        vals = [
            float(res.per_pair[marker][i])
            for i, (a, b) in enumerate(res.pairs.tolist())
            if c in (a, b) and not math.isnan(float(res.per_pair[marker][i]))
        ]
        out[c] = sum(vals) / len(vals) if vals else math.nan
    return out


def test_per_class_view_equals_a_direct_loop():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([2, 5, 7, 9, 11, 13]).repeat_interleave(15)
    x = 3 * torch.randn(14, 24, generator=g)[y] + torch.randn(len(y), 24, generator=g)
    res = glue_pairs(x, y, points_per_class=10, n_pairs=9, n_t=20, generator=0)  # 9 of the 15 pairs
    view = per_class_glue(res)
    assert view.classes.tolist() == sorted({int(c) for c in res.pairs.flatten()})
    for marker in ("capacity", "dimension", "radius", "utility"):
        expected = direct_per_class(res, marker)
        got = dict(zip(view.classes.tolist(), view.values[marker].tolist(), strict=True))
        assert got == pytest.approx(expected, rel=1e-12, nan_ok=True), marker
    counts = {c: sum(c in p for p in res.pairs.tolist()) for c in view.classes.tolist()}
    assert dict(zip(view.classes.tolist(), view.n_pairs.tolist(), strict=True)) == counts
    # The matrix: symmetric, one entry per sampled pair, NaN elsewhere (and on the diagonal).
    classes, m = pairwise_matrix(res, "capacity")
    index = {c: i for i, c in enumerate(classes.tolist())}
    expected = torch.full_like(m, math.nan)
    for (a, b), v in zip(res.pairs.tolist(), res.per_pair["capacity"].tolist(), strict=True):
        expected[index[a], index[b]] = expected[index[b], index[a]] = v
    assert torch.equal(m.isnan(), expected.isnan())
    assert torch.allclose(m[~m.isnan()], expected[~expected.isnan()])
    assert int((~m.isnan()).sum()) == 2 * 9
    as_dict = view.to_dict()
    assert set(as_dict) == set(view.classes.tolist())
    assert as_dict[2]["glue_dimension"] == pytest.approx(
        expected_dim := direct_per_class(res, "dimension")[2]
    )
    assert expected_dim > 0 and as_dict[2]["n_pairs"] == counts[2]


def test_per_class_view_rejects_the_joint_protocol_and_bad_pairs():
    from types import SimpleNamespace

    from lightning_geomarkers.functional import glue_joint

    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(10)
    x = 3 * torch.randn(3, 16, generator=g)[y] + torch.randn(30, 16, generator=g)
    with pytest.raises(TypeError, match="joint protocol has no per-class"):
        per_class_glue(glue_joint(x, y, n_t=10, generator=0))
    with pytest.raises(ValueError, match="paired with itself"):
        pairwise_matrix(SimpleNamespace(pairs=torch.tensor([[1, 1]]), per_pair={"capacity": torch.ones(1)}))
    with pytest.raises(ValueError, match="Unknown GLUE marker"):
        per_class_glue(SimpleNamespace(pairs=torch.tensor([[0, 1]]), per_pair={}), markers=["dim"])


def test_heatmap_rendering_colours_and_shape():
    assert colormap(np.array([0.0, 1.0])).round().astype(int).tolist() == [[68, 1, 84], [253, 231, 37]]
    mid = colormap(np.array([0.125]))[0]  # halfway between the first two anchors
    assert mid == pytest.approx((np.array([68, 1, 84]) + np.array([59, 82, 139])) / 2)
    m = np.array([[np.nan, 1.0, 3.0], [1.0, np.nan, np.nan], [3.0, np.nan, np.nan]])
    img = render_heatmap(m, cell=5, colorbar=False)
    assert img.shape == (15, 15, 3) and img.dtype == np.uint8
    assert img[0, 5].tolist() == [68, 1, 84] and img[0, 10].tolist() == [253, 231, 37]  # min, max
    assert img[5, 10].tolist() == [128, 128, 128]  # not sampled
    assert render_heatmap(m, cell=5).shape == (15, 15 + 4 + 6, 3)


def test_monitor_per_class_history_and_heatmap_image_in_tensorboard(tmp_path):
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=30)
    monitor = GeometryMonitor(samples_per_class=20, **SMALL)
    tr = trainer(tmp_path, [monitor], max_epochs=2)
    train, val = loaders(x, y)
    tr.fit(TinyMLP(), train, val)
    assert [h["epoch"] for h in monitor.per_class_history] == [0, 1]
    entry = monitor.per_class_history[-1]
    assert entry["layer"] == "fc" and entry["step"] == monitor.history[-1]["step"]
    assert sorted(entry["per_class"]) == [0, 1, 2, 3, 4]
    assert entry["per_class"][0]["n_pairs"] == 4  # n_pairs=None: every pair, 4 per class
    mean_dim = np.mean([v["glue_dimension"] for v in entry["per_class"].values()])
    # Every pair is counted twice in the class averages, so their mean is the mean over pairs.
    assert mean_dim == pytest.approx(monitor.history[-1]["glue_dimension"], rel=1e-9)
    events = read_events(tr.logger.log_dir)
    assert "geometry/pairwise_capacity" in events.Tags()["images"]
    images = events.Images("geometry/pairwise_capacity")
    assert len(images) == 2 and images[0].width > 5 * 2 and images[0].height >= 5 * 2
    assert "geometry/pairwise_capacity_legend/text_summary" in events.Tags()["tensors"]
    # saved and restored with the monitor's state
    restored = GeometryMonitor(samples_per_class=20, **SMALL)
    restored.load_state_dict(monitor.state_dict())
    assert restored.per_class_history == monitor.per_class_history
    # a new fit with the same monitor starts a new per-class history, as it does the marker history
    trainer(tmp_path / "again", [monitor], max_epochs=1, logger=False).fit(TinyMLP(), train, val)
    assert [h["epoch"] for h in monitor.per_class_history] == [0] and len(monitor.history) == 1


def test_a_failing_tensorboard_extra_warns_and_keeps_the_markers(tmp_path, monkeypatch):
    import sys

    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=30)
    monitor = GeometryMonitor(samples_per_class=20, markers=["glue_capacity"], **SMALL)
    tr = trainer(tmp_path, [monitor], max_epochs=1)

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(type(tr.logger.experiment), "add_histogram", full_disk)
    monkeypatch.setitem(sys.modules, "PIL", None)  # the writer's add_image imports Pillow: as if missing
    train, val = loaders(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(TinyMLP(), train, val)
    tb = [
        str(w.message)
        for w in caught
        if issubclass(w.category, MonitorWarning) and "TensorBoard" in str(w.message)
    ]
    assert len(tb) == 1, tb
    assert "feature spectrum: OSError" in tb[0] and "pip install pillow" in tb[0]
    assert [h["epoch"] for h in monitor.history] == [0] and monitor.last_computed_step is not None
    assert len(monitor.per_class_history) == 1
    assert "geometry/glue_capacity" in tr.callback_metrics


def test_joint_protocol_and_switch_off_write_no_heatmap(tmp_path):
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=30)
    # 5 classes x 12 points stay within the joint protocol's 2 N = 64 (no cap, no warning).
    joint = dict(glue_protocol="joint", points_per_class=12)
    for name, kwargs in {"joint": joint, "off": dict(log_class_heatmap=False)}.items():
        monitor = GeometryMonitor(samples_per_class=20, markers="glue", **SMALL, **kwargs)
        tr = trainer(tmp_path / name, [monitor], max_epochs=1)
        train, val = loaders(x, y)
        tr.fit(TinyMLP(), train, val)
        events = read_events(tr.logger.log_dir)
        assert not events.Tags()["images"]
        assert (monitor.per_class_history == []) == (name == "joint")


def test_evaluate_model_reports_per_layer_details():
    x, y = gaussian_classes(per_class=25)
    model = Net()
    out = evaluate_model(GeometryMonitor(markers="glue", samples_per_class=10, **SMALL), model, [(x, y)])
    assert out.n_batches == 1 and out.n_sampled == {"head": 50}
    assert out.reports["head"].glue is not None
    assert per_class_glue(out.reports["head"].glue).classes.tolist() == [0, 1, 2, 3, 4]


def test_docstring_examples_of_the_offline_and_per_class_code_run():
    import doctest

    import lightning_geomarkers.callbacks._heatmap as heatmap
    import lightning_geomarkers.cli.rank as rank
    import lightning_geomarkers.cli.selection as selection
    import lightning_geomarkers.functional.per_class as per_class

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for m in (per_class, heatmap, selection, rank) for t in finder.find(m)]
    tests += finder.find(
        GeometryMonitor.evaluate, "GeometryMonitor.evaluate", globs={"GeometryMonitor": GeometryMonitor}
    )
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.tries >= 9 and runner.failures == 0, "".join(report)


def test_per_class_view_builds_the_capacity_matrix_only_for_a_heat_map(tmp_path, monkeypatch):
    """The (C, C) matrix is quadratic in the classes (+5 GB at 12,500 classes in the sampled pairs) and the
    monitor only draws it as a heat map (at most 50 classes): it is built only then."""
    import lightning_geomarkers.functional.per_class as per_class_module

    x, y = gaussian_classes(per_class=20)
    res = glue_pairs(x, y, points_per_class=10, n_t=20, generator=0)
    full, lean = per_class_glue(res), per_class_glue(res, max_matrix_classes=2)
    assert full.capacity_matrix is not None and lean.capacity_matrix is None
    assert lean.to_dict() == full.to_dict()
    built = []
    original = per_class_module._pair_matrix
    monkeypatch.setattr(per_class_module, "_pair_matrix", lambda *a: built.append(1) or original(*a))
    monitor = GeometryMonitor(**SMALL)
    tr = trainer(tmp_path, [monitor], max_epochs=1, logger=False)  # no TensorBoard: no heat map
    tr.fit(TinyMLP(), *loaders(x, y))
    assert monitor.per_class_history and not built


def test_an_error_without_a_message_is_named_in_the_skip_reason(monkeypatch):
    import lightning_geomarkers.callbacks.offline as offline_module

    def failing(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(offline_module, "_compute", failing)
    x, y = gaussian_classes()
    monitor = GeometryMonitor(markers=["participation_ratio"], samples_per_class=50)
    with pytest.warns(MonitorWarning, match=r"evaluate skipped layer 'fc': MemoryError"):
        with pytest.raises(ValueError, match=r"\(fc: MemoryError\)"):
            monitor.evaluate(TinyMLP(), loaders(x, y)[1])
