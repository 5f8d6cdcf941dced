"""GeometryMonitor in single-process Lightning runs: logged values, TensorBoard files, alerts,
checkpoints, resume, layer detection, and bad input that must warn without crashing the run."""

from __future__ import annotations

import pickle
import warnings

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomarkers import (
    GeomarkersWarning,
    GeometryMonitor,
    GeometryWarning,
    MarkerAlert,
    MarkerCheckpoint,
    MonitorWarning,
    NonSeparableWarning,
)
from lightning_geomarkers.functional import geometry_markers
from tests.lightning_helpers import TinyMLP, gaussian_classes, loaders, penultimate, read_events, trainer

FAST = dict(n_t=40, n_pairs=None, samples_per_class=50, lid_k=10)


def fit(tmp_path, monitor, *, model=None, max_epochs=2, data=None, callbacks=(), **kwargs):
    L.seed_everything(0, verbose=False)
    x, y = data if data is not None else gaussian_classes()
    model = model or TinyMLP()
    tr = trainer(tmp_path, [monitor, *callbacks], max_epochs=max_epochs, **kwargs)
    train, val = loaders(x, y)
    tr.fit(model, train, val)
    return tr, model


def test_logged_markers_equal_a_direct_computation(tmp_path):
    x, y = gaussian_classes()
    monitor = GeometryMonitor(**FAST)
    tr, model = fit(tmp_path, monitor, data=(x, y))
    report = geometry_markers(
        penultimate(model, x), y, generator=0, n_t=40, n_pairs=None, points_per_class=50, lid_k=10
    )
    assert len(report.values) == 13
    for name, value in report.values.items():
        logged = tr.callback_metrics[f"geometry/{name}"]
        assert float(logged) == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
    assert [h["epoch"] for h in monitor.history] == [0, 1]


def test_tensorboard_event_file_has_markers_spectrum_and_layout(tmp_path):
    tr, _ = fit(tmp_path, GeometryMonitor(**FAST), max_epochs=3)
    acc = read_events(tr.logger.log_dir)
    scalars = set(acc.Tags()["scalars"])
    for name in ("glue_dimension", "glue_utility", "glue_capacity", "participation_ratio", "nc1", "lid"):
        assert f"geometry/{name}" in scalars
        assert len(acc.Scalars(f"geometry/{name}")) == 3  # logged at every validation epoch
    assert "geometry/feature_spectrum" in acc.Tags()["histograms"]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    tags = {t for cat in layout.category for chart in cat.chart for t in chart.multiline.tag}
    assert "geometry/glue_dimension$" in tags and "geometry/participation_ratio$" in tags  # exact regexes


def test_sanity_check_and_every_n_epochs_with_a_plain_model_checkpoint(tmp_path):
    """Epochs without a fresh value must not break a ModelCheckpoint on a marker (its key must exist),
    and nothing but measured values may reach the logger."""
    monitor = GeometryMonitor(every_n_epochs=2, **FAST)
    ckpt = ModelCheckpoint(monitor="geometry/glue_dimension", mode="max", dirpath=tmp_path / "ck")
    tr, _ = fit(tmp_path, monitor, max_epochs=4, num_sanity_val_steps=2, callbacks=[ckpt])
    assert [h["epoch"] for h in monitor.history] == [1, 3]
    acc = read_events(tr.logger.log_dir)
    values = [e.value for e in acc.Scalars("geometry/glue_dimension")]
    assert values == pytest.approx([h["glue_dimension"] for h in monitor.history])
    best = max(monitor.history, key=lambda h: h["glue_dimension"])
    assert f"epoch={best['epoch']}" in ckpt.best_model_path


def test_histogram_and_history_steps_match_the_scalar_steps(tmp_path):
    monitor = GeometryMonitor(**FAST)
    tr, _ = fit(tmp_path, monitor, max_epochs=2)
    acc = read_events(tr.logger.log_dir)
    scalar_steps = [e.step for e in acc.Scalars("geometry/glue_dimension")]
    assert [e.step for e in acc.Histograms("geometry/feature_spectrum")] == scalar_steps
    assert [h["step"] for h in monitor.history] == scalar_steps


def test_alert_fires_when_features_collapse(tmp_path):
    alert = MarkerAlert("glue_dimension", relative_drop=0.5, patience=1)
    monitor = GeometryMonitor(alerts=[alert], markers=["glue_dimension", "glue_utility"], **FAST)
    with pytest.warns(GeometryWarning, match=r"epoch 3 .*glue_dimension") as record:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonSeparableWarning)  # 4-dim features: expected
            tr, _ = fit(tmp_path, monitor, model=TinyMLP(collapse_at=3), max_epochs=5)
    assert len([w for w in record if issubclass(w.category, GeometryWarning)]) == 1
    assert [a["epoch"] for a in monitor.alert_history] == [3]
    dims = [h["glue_dimension"] for h in monitor.history]
    assert dims[3] < 0.5 * max(dims[:3])
    acc = read_events(tr.logger.log_dir)
    fired = [e.value for e in acc.Scalars("geometry/alert/glue_dimension")]
    assert fired == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_stop_action_stops_training_and_callable_action_is_called(tmp_path):
    events = []
    alerts = [
        MarkerAlert("glue_dimension", relative_drop=0.5, action="stop"),
        MarkerAlert("glue_utility", threshold=10.0, action=events.append),  # utility <= 1: fires at once
    ]
    monitor = GeometryMonitor(alerts=alerts, markers="glue", **FAST)
    with pytest.warns(GeometryWarning):
        tr, _ = fit(tmp_path, monitor, model=TinyMLP(collapse_at=2), max_epochs=6)
    assert tr.current_epoch == 3  # stopped after the epoch-2 validation
    assert len(events) == 1 and events[0].marker == "glue_utility" and events[0].epoch == 0


def test_warmup_and_moving_average_reference():
    alert = MarkerAlert("glue_dimension", relative_drop=0.1, reference="moving_average", window=2, warmup=2)
    fired = [
        alert.update(v, epoch=i, step=i) is not None for i, v in enumerate([1.0, 9.0, 5.0, 5.0, 4.0, 5.0])
    ]
    # warm-up ignores 1.0 and 9.0; 4.0 is 20% below mean(5, 5); 5.0 is back above 0.9 * mean(5, 4).
    assert fired == [False, False, False, False, True, False]
    rising = MarkerAlert("glue_radius", threshold=2.0)  # radius: lower is better, so mode "min"
    assert rising.mode == "min"
    assert rising.update(2.5, epoch=0, step=0) is not None


def test_checkpoint_on_marker_and_marker_checkpoint_rules(tmp_path):
    best_dim = ModelCheckpoint(monitor="geometry/glue_dimension", mode="max", dirpath=tmp_path / "dim")
    floors = MarkerCheckpoint(
        monitor="val_acc", mode="max", floors={"geometry/glue_dimension": 1e9}, dirpath=tmp_path / "floors"
    )
    pareto = MarkerCheckpoint(
        prefer_higher=["geometry/glue_dimension", "geometry/glue_utility"], dirpath=tmp_path / "pareto"
    )
    monitor = GeometryMonitor(**FAST)
    fit(tmp_path, monitor, model=TinyMLP(collapse_at=2), max_epochs=4, callbacks=[best_dim, floors, pareto])
    dims = [h["glue_dimension"] for h in monitor.history]
    assert float(best_dim.best_model_score) == pytest.approx(max(dims), rel=1e-6)
    assert f"epoch={dims.index(max(dims))}" in best_dim.best_model_path
    assert floors.best_model_path == ""  # no epoch reached the floor: nothing kept
    kept = pareto.kept_marker_values
    hist = [(h["epoch"], h["glue_dimension"], h["glue_utility"]) for h in monitor.history]
    # replay the rule: keep an epoch whose two markers are both higher than the kept one's
    expected = None
    for epoch, d, u in hist:
        if expected is None or (d > expected[1] and u > expected[2]):
            expected = (epoch, d, u)
    assert kept == pytest.approx(
        {"geometry/glue_dimension": expected[1], "geometry/glue_utility": expected[2]}
    )
    assert f"epoch={expected[0]}" in pareto.best_model_path


def test_resume_continues_history_and_alert_state(tmp_path):
    alert_kwargs = dict(relative_drop=0.5, patience=1)
    full = GeometryMonitor(alerts=[MarkerAlert("glue_dimension", **alert_kwargs)], **FAST)
    torch.manual_seed(1)  # both runs start from the same weights, whatever earlier tests drew
    fit(tmp_path / "full", full, model=TinyMLP(collapse_at=3), max_epochs=4)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = GeometryMonitor(alerts=[MarkerAlert("glue_dimension", **alert_kwargs)], **FAST)
    torch.manual_seed(1)
    fit(tmp_path / "a", first, model=TinyMLP(collapse_at=3), max_epochs=2, callbacks=[ckpt])
    resumed = GeometryMonitor(alerts=[MarkerAlert("glue_dimension", **alert_kwargs)], **FAST)
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes()
    tr = trainer(tmp_path / "b", [resumed], max_epochs=4)
    with pytest.warns(GeometryWarning):
        tr.fit(TinyMLP(collapse_at=3), *loaders(x, y), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(resumed.history, full.history, strict=True):
        assert a["glue_dimension"] == pytest.approx(b["glue_dimension"], rel=1e-6)
    # The best value from before the interruption was restored: the collapse at epoch 3 fires.
    assert [e["epoch"] for e in resumed.alert_history] == [3] == [e["epoch"] for e in full.alert_history]
    assert resumed.alerts[0].best == pytest.approx(full.alerts[0].best)


class SmallCNN(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TinyTransformer(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.classifier = nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(self.encoder(self.embed(x)).mean(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize(
    "make_model,shape,expected_layer",
    [
        (lambda: TinyMLP(n_classes=4), (16,), "fc"),
        (SmallCNN, (1, 6, 6), "head"),
        (TinyTransformer, (5, 4), "classifier"),
    ],
    ids=["mlp", "cnn", "transformer"],
)
def test_layer_autodetection_on_mlp_cnn_transformer(tmp_path, make_model, shape, expected_layer):
    # Built inside the test (after the suite's seed), not at collection time: the initial weights, and so
    # the markers and warnings, must not depend on which other test modules were collected first.
    model = make_model()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    x = torch.randn(len(y), *shape, generator=g) + y.view(-1, *[1] * len(shape)).float()
    monitor = GeometryMonitor(markers=["glue_dimension", "participation_ratio"], **FAST)
    tr, _ = fit(tmp_path, monitor, model=model, data=(x, y), max_epochs=1, logger=False)
    assert list(monitor.history[0]) == [
        "epoch",
        "step",
        "layer",
        "glue_dimension",
        "participation_ratio",
        "glue_dimension_se",  # the standard error over pairs (noise-aware alerts)
    ]
    assert monitor.history[0]["layer"] == expected_layer
    assert torch.isfinite(tr.callback_metrics["geometry/glue_dimension"])


def test_several_layers_and_explicit_token_pooling(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    x = torch.randn(len(y), 5, 4, generator=g) + y.view(-1, 1, 1).float()
    monitor = GeometryMonitor(
        layers=["encoder", "classifier:input"], pooling="cls", markers=["glue_dimension"], **FAST
    )
    tr, _ = fit(tmp_path, monitor, model=TinyTransformer(), data=(x, y), max_epochs=1, logger=False)
    assert "geometry/encoder/glue_dimension" in tr.callback_metrics
    # ":" in a layer name becomes "_" in keys (MLflow renames keys with ":")
    assert "geometry/classifier_input/glue_dimension" in tr.callback_metrics


def test_hooks_removed_after_fit_and_model_picklable(tmp_path):
    model = TinyMLP()
    monitor = GeometryMonitor(**FAST)
    fit(tmp_path, monitor, model=model, max_epochs=1, logger=False)
    assert not model.fc._forward_pre_hooks and not model.fc._forward_hooks
    pickle.dumps(model)
    pickle.dumps(monitor)


def test_memory_is_bounded_and_class_subset_fixed(tmp_path):
    x, y = gaussian_classes(n_classes=20, per_class=60, dim=16)
    seen = {}

    class Probe(L.Callback):
        def __init__(self, watched):
            self.watched = watched

        def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs):
            sampler = next(iter(self.watched._samplers.values()))
            seen["max_stored"] = max(seen.get("max_stored", 0), sampler.num_stored)
            seen["classes"] = sampler.classes

    monitor = GeometryMonitor(samples_per_class=10, max_classes=6, markers=["participation_ratio"])
    fit(
        tmp_path,
        monitor,
        model=TinyMLP(n_classes=20),
        data=(x, y),
        max_epochs=1,
        logger=False,
        callbacks=[Probe(monitor)],
    )
    assert seen["max_stored"] <= 6 * 10
    first_epoch_classes = seen["classes"]
    other = GeometryMonitor(samples_per_class=10, max_classes=6, markers=["participation_ratio"], seed=1)
    fit(
        tmp_path,
        other,
        model=TinyMLP(n_classes=20),
        data=(x, y),
        max_epochs=1,
        logger=False,
        callbacks=[Probe(other)],
    )
    assert len(first_epoch_classes) == 6
    assert seen["classes"] != first_epoch_classes  # another seed, another fixed subset


def test_second_validation_dataloader_can_be_monitored(tmp_path):
    x, y = gaussian_classes()
    other_x, other_y = gaussian_classes(seed=7)
    monitor = GeometryMonitor(dataloader_idx=1, markers=["participation_ratio"], **FAST)
    L.seed_everything(0, verbose=False)
    model = TinyMLP()
    tr = trainer(tmp_path, [monitor], max_epochs=1, logger=False)
    val0 = DataLoader(TensorDataset(x, y), batch_size=32)
    val1 = DataLoader(TensorDataset(other_x, other_y), batch_size=32)
    tr.fit(model, DataLoader(TensorDataset(x, y), batch_size=32), [val0, val1])
    expected = geometry_markers(penultimate(model, other_x), other_y, markers=["participation_ratio"]).values
    assert monitor.history[0]["participation_ratio"] == pytest.approx(
        float(expected["participation_ratio"]), rel=1e-5
    )


# ------------------------------------------------------------------------ bad input: warn, never crash


class NaNAfter(TinyMLP):
    def __init__(self, epoch: int):
        super().__init__()
        self.nan_epoch = epoch

    def features(self, x):
        h = super().features(x)
        return h * float("nan") if self.current_epoch >= self.nan_epoch else h


def test_nan_features_skip_the_computation_and_keep_earlier_values(tmp_path):
    monitor = GeometryMonitor(markers=["glue_dimension"], **FAST)
    with pytest.warns(MonitorWarning, match="NaN/Inf"):
        tr, _ = fit(tmp_path, monitor, model=NaNAfter(2), max_epochs=3)
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    acc = read_events(tr.logger.log_dir)
    values = [e.value for e in acc.Scalars("geometry/glue_dimension")]
    assert len(values) == 2 and all(v == v for v in values)  # nothing NaN was written
    assert tr.current_epoch == 3  # training went on


def test_single_class_validation_warns(tmp_path):
    x, y = gaussian_classes()
    monitor = GeometryMonitor(markers=["glue_dimension"], **FAST)
    L.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [monitor], max_epochs=1, logger=False)
    with pytest.warns(MonitorWarning, match="at least 2 classes"):
        tr.fit(TinyMLP(), *loaders(x, y, val=(x[y == 0], y[y == 0])))
    assert monitor.history == []


def test_labels_not_found_warns_with_the_fix(tmp_path):
    x, y = gaussian_classes()

    class DictModel(TinyMLP):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["inputs"], batch["cls"]), batch_idx)

        def validation_step(self, batch, batch_idx):
            self(batch["inputs"])

    data = DataLoader([{"inputs": x[i], "cls": y[i]} for i in range(200)], batch_size=40)
    monitor = GeometryMonitor(markers=["glue_dimension"], **FAST)
    L.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [monitor], max_epochs=1, logger=False)
    with pytest.warns(MonitorWarning, match="label_fn"):
        tr.fit(DictModel(), data, data)
    fixed = GeometryMonitor(markers=["glue_dimension"], label_fn=lambda b: b["cls"], **FAST)
    tr = trainer(tmp_path, [fixed], max_epochs=1, logger=False)
    tr.fit(DictModel(), data, data)
    assert len(fixed.history) == 1


def test_layer_never_called_warns(tmp_path):
    class WithUnused(TinyMLP):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(32, 32)

    monitor = GeometryMonitor(layers="unused", markers=["glue_dimension"], **FAST)
    with pytest.warns(MonitorWarning, match="never called"):
        fit(tmp_path, monitor, model=WithUnused(), max_epochs=1, logger=False)


def test_unknown_layer_name_raises_at_setup_listing_names(tmp_path):
    monitor = GeometryMonitor(layers="bodyy")
    with pytest.raises(ValueError, match="body"):
        fit(tmp_path, monitor, max_epochs=1, logger=False)


def test_labels_outside_class_range_are_ignored_with_a_warning(tmp_path):
    x, y = gaussian_classes()
    y_bad = y.clone()
    y_bad[:5] = 99
    L.seed_everything(0, verbose=False)
    model = TinyMLP()
    monitor = GeometryMonitor(markers=["participation_ratio"], **FAST)
    tr = trainer(tmp_path, [monitor], max_epochs=1, logger=False)
    with pytest.warns(MonitorWarning, match=r"\[99\] outside the class range"):
        tr.fit(model, DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(TensorDataset(x, y_bad), 32))
    expected = geometry_markers(penultimate(model, x[5:]), y[5:], markers=["participation_ratio"]).values
    assert monitor.history[0]["participation_ratio"] == pytest.approx(
        float(expected["participation_ratio"]), rel=1e-5
    )


def test_non_separable_data_warns_and_suggests_fewer_points(tmp_path):
    x, y = gaussian_classes(n_classes=5, per_class=60, dim=4, spread=3.0)
    model = TinyMLP(dim=4, width=3)
    monitor = GeometryMonitor(markers=["glue_dimension"], n_t=20, n_pairs=4, samples_per_class=60)
    with pytest.warns(NonSeparableWarning, match="fewer points per class"):
        fit(tmp_path, monitor, model=model, data=(x, y), max_epochs=1, logger=False)


def test_bad_constructor_arguments_raise_clearly():
    with pytest.raises(ValueError, match="Unknown marker"):
        GeometryMonitor(markers=["glue_dim"])
    with pytest.raises(ValueError, match="not computed"):
        GeometryMonitor(markers=["nc1"], alerts=[MarkerAlert("glue_dimension", threshold=1.0)])
    with pytest.raises(ValueError, match="samples_per_class"):
        GeometryMonitor(samples_per_class=1)
    with pytest.raises(ValueError, match="glue_protocol"):
        GeometryMonitor(glue_protocol="triples")
    with pytest.raises(ValueError, match="threshold` and/or `relative_drop"):
        MarkerAlert("glue_dimension")
    with pytest.raises(ValueError, match="pass mode="):
        MarkerAlert("nc1", threshold=1.0)
    with pytest.raises(ValueError, match="replaces `monitor`"):
        MarkerCheckpoint(monitor="val_acc", prefer_higher=["geometry/glue_dimension"])
    with pytest.raises(ValueError, match="workers"):
        GeometryMonitor(workers=0)


def test_workers_reach_geometry_markers_and_leave_the_values_unchanged(monkeypatch):
    import lightning_geomarkers.callbacks.monitor as monitor_module

    seen = []
    original = monitor_module.geometry_markers

    def recording(*args, **kwargs):
        seen.append((kwargs["workers"], kwargs["num_threads"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "geometry_markers", recording)
    x, y = gaussian_classes()
    reports = [GeometryMonitor(**FAST).compute_markers(x, y)]
    reports.append(GeometryMonitor(workers=1, **FAST).compute_markers(x, y))
    assert seen == [(2, 1), (1, 1)]  # the default is 2 concurrent markers, 1 thread each
    assert reports[0].values.keys() == reports[1].values.keys()
    for name, value in reports[0].values.items():
        assert torch.equal(value, reports[1].values[name]), name


def test_warnings_are_not_repeated_for_every_batch(tmp_path):
    x, y = gaussian_classes()
    y_bad = y.clone()
    y_bad[::3] = -1
    monitor = GeometryMonitor(markers=["participation_ratio"], **FAST)
    tr = trainer(tmp_path, [monitor], max_epochs=1, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(TinyMLP(), DataLoader(TensorDataset(x, y), 32), DataLoader(TensorDataset(x, y_bad), 8))
    ours = [w for w in caught if issubclass(w.category, MonitorWarning)]
    assert len(ours) == 1


def test_joint_protocol_cap_is_reported_with_the_layer():
    """The suite's joint-protocol cap (12 classes x 20 points > 2 x 48) reaches the monitor's user as a
    GeomarkersWarning naming the layer, and the values are those of the capped 4 classes."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(12).repeat_interleave(20)
    x = 3 * torch.randn(12, 48, generator=g)[y] + torch.randn(240, 48, generator=g)
    monitor = GeometryMonitor(glue_protocol="joint", markers="glue", n_t=30)
    with pytest.warns(
        GeomarkersWarning, match=r"layer 'fc:input': GLUE \(joint protocol\).*subset of 4 classes"
    ):
        report = monitor.compute_markers(x, y, layer="fc:input")
    assert report.glue.active.shape == (30, 4)
