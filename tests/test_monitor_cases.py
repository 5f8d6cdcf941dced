"""Issue 8: every way the monitor used to log, keep or compare a wrong number silently.

Each case either works or is refused at setup/construction with a message naming the problem and the
fix. Tiny models, small samples, 1-4 epochs."""

from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_geomarkers.callbacks.monitor as monitor_module
from lightning_geomarkers import (
    GeometryMonitor,
    GeometryWarning,
    MarkerAlert,
    MarkerCheckpoint,
    MonitorWarning,
)
from lightning_geomarkers.functional import geometry_markers
from tests.lightning_helpers import TinyMLP, gaussian_classes, loaders, penultimate, trainer

FAST = dict(n_t=30, n_pairs=None, samples_per_class=30, lid_k=10)
CHEAP = dict(markers=["participation_ratio"], samples_per_class=50, lid_k=10)  # >= per class: no subsampling


def fit(tmp_path, callbacks, *, model=None, max_epochs=1, data=None, val=None, **kwargs):
    L.seed_everything(0, verbose=False)
    x, y = data if data is not None else gaussian_classes()
    model = model or TinyMLP()
    tr = trainer(tmp_path, list(callbacks), max_epochs=max_epochs, logger=False, **kwargs)
    train, val_loader = loaders(x, y)
    tr.fit(model, train, val if val is not None else val_loader)
    return tr, model


# ------------------------------------------------------------------ 1. one key, one source


def test_two_monitors_with_the_same_keys_are_refused_at_setup(tmp_path):
    a = GeometryMonitor(layers="fc:input", **CHEAP)
    b = GeometryMonitor(layers="body.1", **CHEAP)
    with pytest.raises(ValueError, match=r"both log \['geometry/participation_ratio'\].*own prefix"):
        fit(tmp_path, [a, b])
    # the fix from the message: distinct prefixes, each logging its own layer's value (not an average)
    a = GeometryMonitor(layers="fc:input", prefix="head", **CHEAP)
    b = GeometryMonitor(layers="body.1", prefix="body", **CHEAP)
    tr, model = fit(tmp_path, [a, b])
    x, y = gaussian_classes()
    with torch.no_grad():
        body = model.body[1](model.body[0](x))
    for key, feats in (("head", penultimate(model, x)), ("body", body)):
        expected = geometry_markers(feats, y, markers=["participation_ratio"]).values["participation_ratio"]
        assert float(tr.callback_metrics[f"{key}/participation_ratio"]) == pytest.approx(
            float(expected), rel=1e-5
        )


def test_a_key_the_module_already_logs_is_left_to_it_with_a_warning(tmp_path):
    class LogsOurKey(TinyMLP):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            super().validation_step(batch, batch_idx)
            self.log("geometry/participation_ratio", 123.0)

    monitor = GeometryMonitor(**CHEAP)
    with pytest.warns(MonitorWarning, match=r"did not log 'geometry/participation_ratio'.*validation_step"):
        tr, _ = fit(tmp_path, [monitor], model=LogsOurKey())
    assert float(tr.callback_metrics["geometry/participation_ratio"]) == 123.0
    assert len(monitor.history) == 1  # the value is still computed and kept in the history


# ------------------------------------------------------------------ 2. the head the labels belong to


class MultiTask(TinyMLP):
    """Main head (8 classes) registered first, auxiliary 2-way head registered after it."""

    def __init__(self):
        super().__init__(n_classes=8)
        self.aux = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.features(x)
        return nn.functional.cross_entropy(self.fc(h), y) + nn.functional.cross_entropy(self.aux(h), y % 2)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        h = self.features(batch[0])
        self.fc(h), self.aux(h)


def test_multi_task_model_is_refused_with_the_candidates_and_the_fix(tmp_path):
    data = gaussian_classes(n_classes=8, per_class=20)
    with pytest.raises(
        ValueError, match=r"Several possible classifier heads: 'fc' .*'aux.2'.*layers=\"fc:input\""
    ):
        fit(tmp_path, [GeometryMonitor(**CHEAP)], model=MultiTask(), data=data)
    monitor = GeometryMonitor(layers="fc:input", **CHEAP)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)  # no label is dropped any more
        fit(tmp_path, [monitor], model=MultiTask(), data=data)
    assert monitor.history[0]["layer"] == "fc:input"


class Attention(nn.Module):
    def __init__(self, d: int, qkv: str) -> None:
        super().__init__()
        setattr(self, qkv, nn.Linear(d, 3 * d))  # feeds no later Linear of width 3d
        self.proj = nn.Linear(d, d)


class Block(nn.Module):
    def __init__(self, d: int, attn: str = "attn", qkv: str = "qkv") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        setattr(self, attn, Attention(d, qkv))
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)


class TimmLikeViT(nn.Module):
    """timm's ViT layout: patch_embed, blocks with attn.qkv / attn.proj and mlp.fc1 / mlp.fc2, head."""

    def __init__(self, d: int = 16, n_classes: int = 5, attn: str = "attn", qkv: str = "qkv") -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, 4)
        self.blocks = nn.Sequential(*(Block(d, attn, qkv) for _ in range(2)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)


@pytest.mark.parametrize(("attn", "qkv"), [("attn", "qkv"), ("0", "to_qkv")])  # timm; lucidrains-style names
def test_vit_like_models_resolve_to_their_head(attn, qkv):
    from lightning_geomarkers.callbacks._layers import find_classifier_head, head_candidates

    model = TimmLikeViT(attn=attn, qkv=qkv)
    assert [n for n, _ in head_candidates(model)] == [
        "head"
    ]  # was ['blocks.0.attn.qkv', 'blocks.1.attn.qkv', 'head']
    assert find_classifier_head(model)[0] == "head"
    # a multi-task model is still refused
    with pytest.raises(ValueError, match=r"Several possible classifier heads: 'fc' .*'aux.2'"):
        find_classifier_head(MultiTask())


def test_labels_beyond_the_head_say_wrong_head_not_only_ignore_index(tmp_path):
    x, y = gaussian_classes(n_classes=5)
    model = TinyMLP(n_classes=2)  # a head with 2 outputs watched for 5-class labels

    class TwoWay(TinyMLP):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch[0], batch[1] % 2), batch_idx)

    model = TwoWay(n_classes=2)
    with pytest.warns(
        MonitorWarning, match=r"head 'fc' \(2 classes: 0..1.*not the classifier of these labels"
    ):
        fit(tmp_path, [GeometryMonitor(**CHEAP)], model=model, data=(x, y))


# ------------------------------------------------------------------ 3. schedules


def test_strict_early_stopping_on_a_marker_is_refused_at_setup(tmp_path):
    monitor = GeometryMonitor(every_n_epochs=2, **CHEAP)
    stop = EarlyStopping(monitor="geometry/participation_ratio", mode="max")
    with pytest.raises(ValueError, match=r"strict=False"):
        fit(tmp_path, [monitor, stop])


def test_non_strict_early_stopping_acts_only_on_computed_epochs(tmp_path):
    monitor = GeometryMonitor(every_n_epochs=2, **CHEAP)
    stop = EarlyStopping(monitor="geometry/participation_ratio", mode="max", strict=False, verbose=False)
    tr, _ = fit(tmp_path, [monitor, stop], max_epochs=4)
    assert tr.current_epoch == 4  # used to stop after epoch 0 on the NaN placeholder
    assert [h["epoch"] for h in monitor.history] == [1, 3]
    assert stop.best_score == pytest.approx(max(h["participation_ratio"] for h in monitor.history))


class PlateauMLP(TinyMLP):
    def __init__(self, strict: bool):
        super().__init__()
        self.strict = strict

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0)
        scheduler = {"scheduler": plateau, "monitor": "geometry/glue_dimension", "strict": self.strict}
        return {"optimizer": opt, "lr_scheduler": scheduler}


def test_strict_lr_scheduler_on_a_marker_is_refused_and_the_fix_runs(tmp_path):
    settings = dict(markers=["glue_dimension"], every_n_epochs=2, **{**FAST, "n_t": 10})
    with pytest.raises(
        ValueError, match=r"ReduceLROnPlateau monitors 'geometry/glue_dimension'.*\"strict\": False"
    ):
        fit(tmp_path, [GeometryMonitor(**settings)], model=PlateauMLP(strict=True), max_epochs=2)
    monitor = GeometryMonitor(**settings)
    tr, _ = fit(tmp_path, [monitor], model=PlateauMLP(strict=False), max_epochs=2)
    assert tr.current_epoch == 2  # epoch 0 (no marker) used to raise in Lightning's scheduler update
    assert [h["epoch"] for h in monitor.history] == [1]


def test_model_checkpoint_filename_naming_another_marker_is_refused(tmp_path):
    ckpt = ModelCheckpoint(
        monitor="val_acc", mode="max", filename="{epoch}-{geometry/participation_ratio:.2f}"
    )
    with pytest.raises(
        ValueError, match=r"names 'geometry/participation_ratio'.*leave it out of the filename"
    ):
        fit(tmp_path, [GeometryMonitor(every_n_epochs=2, **CHEAP), ckpt])
    # naming its own monitored marker is fine: the name is formatted only when the value exists
    ckpt = ModelCheckpoint(
        monitor="geometry/participation_ratio",
        mode="max",
        filename="{epoch}-{geometry/participation_ratio:.2f}",
    )
    fit(tmp_path, [GeometryMonitor(every_n_epochs=2, **CHEAP), ckpt], max_epochs=2)
    assert ckpt.best_model_path.endswith(".ckpt") and "epoch=1" in ckpt.best_model_path


def test_trainer_validate_computes_whatever_every_n_epochs(tmp_path):
    monitor = GeometryMonitor(every_n_epochs=2, **CHEAP)
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes()
    tr = trainer(tmp_path, [monitor], logger=False)
    model = TinyMLP()
    tr.validate(model, loaders(x, y)[1], verbose=False)
    assert len(monitor.history) == 1
    expected = geometry_markers(penultimate(model, x), y, markers=["participation_ratio"]).values
    assert float(tr.callback_metrics["geometry/participation_ratio"]) == pytest.approx(
        float(expected["participation_ratio"]), rel=1e-5
    )


def test_every_n_epochs_that_never_meets_validation_warns_with_the_fix(tmp_path):
    monitor = GeometryMonitor(every_n_epochs=3, **CHEAP)
    with pytest.warns(
        MonitorWarning, match=r"max_epochs=4\): markers are never computed \(first at epoch 5\)"
    ):
        fit(tmp_path, [monitor], max_epochs=4, check_val_every_n_epoch=2)
    assert monitor.history == []
    # compatible schedules that still never compute in the run (5 > 3 epochs) warn too (they did not)
    for every, every_val in ((5, 1), (4, 2)):
        monitor = GeometryMonitor(every_n_epochs=every, **CHEAP)
        with pytest.warns(MonitorWarning, match=r"max_epochs=3\): markers are never computed"):
            fit(tmp_path / f"{every}-{every_val}", [monitor], max_epochs=3, check_val_every_n_epoch=every_val)
        assert monitor.history == []


@pytest.mark.parametrize("every_val", [2, 4])
def test_every_n_epochs_dividing_the_validation_interval_does_not_warn(tmp_path, every_val):
    monitor = GeometryMonitor(every_n_epochs=2, **CHEAP)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)
        fit(tmp_path, [monitor], max_epochs=every_val, check_val_every_n_epoch=every_val)
    assert [h["epoch"] for h in monitor.history] == [every_val - 1]  # every validation computed


# ------------------------------------------------------------------ 4. stable sample without inputs


class DictBatches(TinyMLP):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["img"], batch["target"]), batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self(batch["img"])


def _dict_loader(x, y, shuffle=False):
    return DataLoader([{"img": x[i], "target": y[i]} for i in range(len(y))], batch_size=40, shuffle=shuffle)


def _validate_and_record(tmp_path, monitor, model, loader):
    seen = {}
    original = monitor.compute_markers

    def record(features, labels, device=None, **kwargs):
        seen["features"], seen["labels"] = features.clone(), labels.clone()
        return original(features, labels, device, **kwargs)

    monitor.compute_markers = record
    trainer(tmp_path, [monitor], logger=False).validate(model, loader, verbose=False)
    return seen


@pytest.mark.parametrize("input_fn", [None, lambda batch: batch["img"]])
def test_sample_does_not_move_with_the_weights_when_inputs_are_not_found(tmp_path, input_fn):
    x, y = gaussian_classes(per_class=60)
    loader = _dict_loader(x, y)
    model = DictBatches()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(1e-6 * torch.randn_like(p))
    kwargs = dict(samples_per_class=20, markers=["participation_ratio"], input_fn=input_fn)
    ctx = (
        pytest.warns(MonitorWarning, match="position in the validation loader") if input_fn is None else None
    )
    if ctx is not None:
        with ctx:
            a = _validate_and_record(tmp_path, GeometryMonitor(**kwargs), model, loader)
    else:
        a = _validate_and_record(tmp_path, GeometryMonitor(**kwargs), model, loader)
    b = _validate_and_record(tmp_path, GeometryMonitor(**kwargs), perturbed, loader)
    assert a["features"].shape == (100, 32)
    assert torch.equal(a["labels"], b["labels"])
    # same rows selected: the features differ by the perturbation only, not by the choice of samples
    assert torch.allclose(a["features"], b["features"], atol=1e-4)
    assert not torch.equal(a["features"], b["features"])  # the perturbation did reach the features


def test_position_keys_on_a_shuffled_loader_say_so(tmp_path):
    x, y = gaussian_classes()
    monitor = GeometryMonitor(**CHEAP)
    with pytest.warns(MonitorWarning, match=r"SHUFFLES.*input_fn"):
        trainer(tmp_path, [monitor], logger=False).validate(
            DictBatches(), _dict_loader(x, y, shuffle=True), verbose=False
        )


def test_sampling_keys_and_position_checks_are_computed_once_per_batch(tmp_path, monkeypatch):
    x, y = gaussian_classes()  # 200 samples: 5 validation batches of 40
    calls = {"keys": 0, "shuffled": 0}
    real_keys = monitor_module.sample_keys

    def counting_keys(*args, **kwargs):
        calls["keys"] += 1
        return real_keys(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "sample_keys", counting_keys)
    monitor = GeometryMonitor(layers=["body.1", "fc:input"], **CHEAP)
    real_shuffled = monitor._loader_shuffled

    def counting_shuffled(trainer):
        calls["shuffled"] += 1
        return real_shuffled(trainer)

    monitor._loader_shuffled = counting_shuffled
    with pytest.warns(MonitorWarning, match="position in the validation loader"):
        trainer(tmp_path, [monitor], logger=False).validate(DictBatches(), _dict_loader(x, y), verbose=False)
    assert calls == {"keys": 5, "shuffled": 1}  # was 10 keys (once per layer) and a check per batch
    assert len(monitor.history) == 2


def test_a_failing_sample_gather_skips_the_layer_instead_of_crashing(tmp_path, monkeypatch):
    from lightning_geomarkers.metrics.sample import PerClassSample

    def mismatch(self, *args, **kwargs):  # what every rank raises after gathering different widths
        raise RuntimeError("features have 32 columns on rank 0 but 16 on rank 1")

    monkeypatch.setattr(PerClassSample, "sync", mismatch)
    monitor = GeometryMonitor(**CHEAP)
    monitor._distributed = lambda trainer: True  # as under DDP: the gather runs at the epoch's end
    with pytest.warns(MonitorWarning, match=r"skipped layer 'fc' at epoch 0: features have 32 columns"):
        tr, _ = fit(tmp_path, [monitor], max_epochs=2)
    assert tr.current_epoch == 2 and monitor.history == []


# ------------------------------------------------------------------ 5. a new fit starts afresh


def test_a_reused_monitor_does_not_carry_history_or_alerts_to_a_new_fit(tmp_path):
    alert = MarkerAlert("glue_dimension", relative_drop=0.5)
    monitor = GeometryMonitor(markers=["glue_dimension"], alerts=[alert], **FAST)
    fit(tmp_path / "a", [monitor], max_epochs=2)
    best_a = alert.best
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        warnings.simplefilter("ignore", UserWarning)  # degenerate probes on 4-dim collapsed features
        fit(tmp_path / "b", [monitor], model=TinyMLP(collapse_at=0), max_epochs=1)
    # the fresh, collapsed model is far below the first model's best: carried state would have fired
    assert monitor.history[0]["glue_dimension"] < 0.5 * best_a
    assert [h["epoch"] for h in monitor.history] == [0]
    assert monitor.alert_history == []
    assert alert.best == pytest.approx(monitor.history[0]["glue_dimension"])


# ------------------------------------------------------------------ 6. checkpoints


def test_marker_checkpoint_with_an_unprefixed_key_is_refused_listing_valid_keys(tmp_path):
    ckpt = MarkerCheckpoint(floors={"participation_ratio": 0.5}, dirpath=tmp_path / "ck")
    with pytest.raises(ValueError, match=r"'participation_ratio'.*e\.g\. 'geometry/participation_ratio'"):
        fit(tmp_path, [GeometryMonitor(**CHEAP), ckpt])


def test_marker_checkpoint_on_a_marker_the_monitor_does_not_compute_says_so(tmp_path):
    """The key is written the logged way, the marker is just not computed: the message used to say "Use
    the logged key"."""
    ckpt = MarkerCheckpoint(floors={"geometry/nc1": 0.1}, dirpath=tmp_path / "ck")
    with pytest.raises(ValueError, match=r"Add 'nc1' to the monitor's `markers`, or drop it here") as err:
        fit(tmp_path, [GeometryMonitor(**CHEAP), ckpt])
    assert "Use the logged key" not in str(err.value)


def test_model_checkpoint_keeps_nothing_when_no_marker_was_computed(tmp_path):
    x, y = gaussian_classes()

    class NoLabels(TinyMLP):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self(batch[0])

    val = DataLoader(TensorDataset(x), batch_size=32)  # batches without labels: never computed
    ckpt = ModelCheckpoint(monitor="geometry/participation_ratio", mode="max", dirpath=tmp_path / "ck")
    with pytest.warns(MonitorWarning, match="label"):
        fit(tmp_path, [GeometryMonitor(**CHEAP), ckpt], model=NoLabels(), max_epochs=2, val=val)
    assert ckpt.best_model_path == "" and ckpt.best_model_score is None
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").iterdir())


def test_model_checkpoint_never_ranks_an_uncomputed_epoch(tmp_path):
    ckpt = ModelCheckpoint(monitor="geometry/participation_ratio", mode="max", save_top_k=3, dirpath=tmp_path)
    monitor = GeometryMonitor(every_n_epochs=2, **CHEAP)
    fit(tmp_path, [monitor, ckpt], max_epochs=4)
    kept = sorted(ckpt.best_k_models)
    assert len(kept) == 2 and "epoch=1" in kept[0] and "epoch=3" in kept[1]
    assert all(math.isfinite(float(v)) for v in ckpt.best_k_models.values())


# ------------------------------------------------------------------ 7. alerts named by the logged key


def test_alert_on_the_full_logged_key_is_accepted(tmp_path):
    alert = MarkerAlert("geometry/participation_ratio", threshold=1e9)  # fires at once
    monitor = GeometryMonitor(alerts=[alert], **CHEAP)
    with pytest.warns(GeometryWarning, match="participation_ratio"):
        tr, _ = fit(tmp_path, [monitor])
    assert [e["epoch"] for e in monitor.alert_history] == [0]
    assert float(tr.callback_metrics["geometry/alert/participation_ratio"]) == 1.0
    bad = GeometryMonitor(alerts=[MarkerAlert("head/participation_ratio", threshold=1.0)], **CHEAP)
    with pytest.raises(ValueError, match=r"not monitored.*MarkerAlert\('geometry/participation_ratio'\)"):
        fit(tmp_path, [bad])


# ------------------------------------------------------------------ 8. the rest


def test_trainer_test_warns_that_nothing_is_computed(tmp_path):
    x, y = gaussian_classes()

    class WithTest(TinyMLP):
        def test_step(self, batch, batch_idx):
            self(batch[0])

    monitor = GeometryMonitor(**CHEAP)
    with pytest.warns(MonitorWarning, match=r"trainer.test logs no geometry marker.*trainer.validate"):
        trainer(tmp_path, [monitor], logger=False).test(WithTest(), loaders(x, y)[1], verbose=False)
    assert monitor.history == []


def test_dataloader_idx_beyond_the_loaders_names_the_real_problem(tmp_path):
    monitor = GeometryMonitor(dataloader_idx=3, **CHEAP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [monitor])
    messages = [str(w.message) for w in caught if issubclass(w.category, MonitorWarning)]
    assert any("dataloader_idx=3 but the validation has 1 dataloader" in m for m in messages)
    assert not any("never called" in m for m in messages)


def test_resume_with_an_equivalent_layer_spec_keeps_the_history(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = GeometryMonitor(layers=None, **CHEAP)
    fit(tmp_path / "a", [first, ckpt], max_epochs=2)
    resumed = GeometryMonitor(layers="fc:input", **CHEAP)
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes()
    tr = trainer(tmp_path / "b", [resumed], max_epochs=3, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(TinyMLP(), *loaders(x, y), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert not [
        w for w in caught if "other value settings" in str(w.message)
    ]  # the same layer, spelt otherwise


def test_a_checkpoint_saved_after_fit_keeps_the_resolved_state_key(tmp_path):
    """``trainer.save_checkpoint`` once fit has returned (after teardown) stored the monitor's state under
    the unresolved ``layers`` argument, so a resume with an equivalent layer spec lost the history and
    Lightning warned about a missing callback."""
    first = GeometryMonitor(layers=None, **CHEAP)
    tr, _ = fit(tmp_path / "a", [first], max_epochs=1)
    tr.save_checkpoint(tmp_path / "final.ckpt")
    saved = torch.load(tmp_path / "final.ckpt", weights_only=False)["callbacks"]
    assert "GeometryMonitor{'prefix': 'geometry', 'layers': ['fc:input']}" in saved
    resumed = GeometryMonitor(layers="fc:input", **CHEAP)
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "b", [resumed], max_epochs=2, logger=False).fit(
            TinyMLP(), *loaders(x, y), ckpt_path=str(tmp_path / "final.ckpt")
        )
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert not [w for w in caught if "Please add the following callbacks" in str(w.message)]


def test_checkpoints_with_the_former_state_key_still_restore(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = GeometryMonitor(**CHEAP)
    fit(tmp_path / "a", [first, ckpt], max_epochs=1)
    path = tmp_path / "ck" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if str(k).startswith("GeometryMonitor")]
    saved["callbacks"] = {"GeometryMonitor{'prefix': 'geometry', 'layers': 'None'}": state}  # old format
    torch.save(saved, path)
    resumed = GeometryMonitor(**CHEAP)
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes()
    tr = trainer(tmp_path / "b", [resumed], max_epochs=2, logger=False)
    tr.fit(TinyMLP(), *loaders(x, y), ckpt_path=str(path))
    assert [h["epoch"] for h in resumed.history] == [0, 1]


def test_alert_state_is_matched_by_marker_not_position():
    dim = MarkerAlert("glue_dimension", relative_drop=0.2)
    util = MarkerAlert("geometry/glue_utility", relative_drop=0.2)
    saver = GeometryMonitor(markers="glue", alerts=[dim, util])
    dim.update(10.0, epoch=0, step=0)
    util.update(0.5, epoch=0, step=0)
    state = saver.state_dict()
    new_util, new_dim, extra = (
        MarkerAlert("glue_utility", relative_drop=0.2),
        MarkerAlert("glue_dimension", relative_drop=0.2),
        MarkerAlert("glue_radius", threshold=3.0),
    )
    loader = GeometryMonitor(markers="glue", alerts=[new_util, new_dim, extra])
    with pytest.warns(MonitorWarning, match=r"no alert state for \['glue_radius'\]"):
        loader.load_state_dict(state)
        loader.on_fit_start(None, None)  # type: ignore[arg-type]  # said when the resumed fit starts
    assert new_dim.best == 10.0 and new_util.best == 0.5 and extra.best is None


def test_restored_alert_state_is_reported_at_fit_only_and_reads_well(tmp_path):
    """A checkpoint with alert state restored by a monitor without alerts: the warning used to read "no
    alert state for [] (they start afresh) and state for alerts no longer configured ...", and came also
    from trainer.validate(ckpt_path=...), where alerts never run."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    with pytest.warns(GeometryWarning):
        fit(
            tmp_path / "a",
            [GeometryMonitor(alerts=[MarkerAlert("participation_ratio", threshold=1e9)], **CHEAP), ckpt],
        )
    path = str(tmp_path / "ck" / "last.ckpt")
    x, y = gaussian_classes()
    _, val = loaders(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "b", [GeometryMonitor(**CHEAP)], logger=False).validate(
            TinyMLP(), val, ckpt_path=path
        )
    assert not [
        str(w.message) for w in caught if "alert state" in str(w.message) or "alerts no" in str(w.message)
    ]
    train, val = loaders(x, y)
    with pytest.warns(MonitorWarning) as record:
        trainer(tmp_path / "c", [GeometryMonitor(**CHEAP)], max_epochs=2, logger=False).fit(
            TinyMLP(), train, val, ckpt_path=path
        )
    (message,) = [str(w.message) for w in record if "alerts no longer" in str(w.message)]
    assert message == (
        "GeometryMonitor: the checkpoint holds state for alerts no longer configured: ['participation_ratio'] "
        "(ignored)."
    )


def test_logged_keys_after_fit_and_messages_without_a_schedule_of_one(tmp_path):
    """logged_keys() raised after fit (teardown drops the hooks, the resolved layers stay); the
    EarlyStopping message named "epochs skipped by every_n_epochs=1", which skips nothing."""
    monitor = GeometryMonitor(**CHEAP)
    fit(tmp_path / "a", [monitor])
    assert monitor.logged_keys() == ["geometry/participation_ratio"]
    stop = EarlyStopping(monitor="geometry/participation_ratio", mode="max")
    with pytest.raises(ValueError, match=r"strict=False") as err:
        fit(tmp_path / "b", [GeometryMonitor(**CHEAP), stop])
    assert "every_n_epochs" not in str(err.value)
    with pytest.raises(ValueError, match=r"every_n_epochs=2"):
        fit(tmp_path / "c", [GeometryMonitor(every_n_epochs=2, **CHEAP), stop])


def test_layer_names_with_a_colon_are_sanitised_in_keys(tmp_path):
    monitor = GeometryMonitor(
        layers=["fc:input", "body.1"],
        alerts=[MarkerAlert("fc:input/participation_ratio", threshold=1e9)],
        **CHEAP,
    )
    with pytest.warns(GeometryWarning):
        tr, _ = fit(tmp_path, [monitor])
    keys = set(tr.callback_metrics)
    assert {"geometry/fc_input/participation_ratio", "geometry/body.1/participation_ratio"} <= keys
    assert "geometry/alert/fc_input/participation_ratio" in keys
    assert not any(":" in k for k in keys)
    # With several layers the alert's message and event name the layer (they used to say only
    # "participation_ratio = ...", whichever layer fired).
    (event,) = monitor.alert_history
    assert (
        event["key"] == "geometry/fc_input/participation_ratio"
        and event["marker"] == "fc:input/participation_ratio"
    )
    assert "): geometry/fc_input/participation_ratio = " in event["message"]


def test_compiled_head_is_hooked_outside_the_compiled_region(tmp_path):
    from torch._dynamo.utils import counters

    class Compiled(TinyMLP):
        def __init__(self):
            super().__init__()
            self.fc = torch.compile(self.fc, backend="eager")

    x, y = gaussian_classes()

    def graphs(callbacks):
        torch._dynamo.reset()
        counters.clear()
        L.seed_everything(0, verbose=False)
        tr = trainer(tmp_path, callbacks, logger=False, max_epochs=2)
        model = Compiled()
        tr.fit(model, *[DataLoader(TensorDataset(x, y), batch_size=16) for _ in range(2)])
        return counters["stats"]["unique_graphs"], model

    baseline, _ = graphs([])
    monitor = GeometryMonitor(**CHEAP)
    with_monitor, model = graphs([monitor])
    # 13 validation batches per epoch: hooks traced inside the compiled call (on `_orig_mod`) made Dynamo
    # recompile whenever the hook's Python state changed. Hooked on the wrapper, nothing is added.
    assert with_monitor == baseline
    assert monitor.history[-1]["layer"] == "fc"
    ref = geometry_markers(penultimate(model, x), y, markers=["participation_ratio"]).values
    assert monitor.history[-1]["participation_ratio"] == pytest.approx(
        float(ref["participation_ratio"]), rel=1e-5
    )


def test_a_hook_inside_the_compiled_region_would_recompile():
    """Why the wrapper is hooked: the same capture on `_orig_mod` recompiles as it is toggled."""
    from torch._dynamo.utils import counters

    from lightning_geomarkers.callbacks._layers import FeatureHook, resolve_layers

    model = TinyMLP()
    model.fc = torch.compile(model.fc, backend="eager")
    ((module, where),) = resolve_layers(model).values()
    assert module is model.fc  # the OptimizedModule, not model.fc._orig_mod
    counts = []
    for target in (module, model.fc._orig_mod):
        torch._dynamo.reset()
        counters.clear()
        hook = FeatureHook(target, "input")
        for i in range(6):
            hook.enabled = i % 2 == 0
            model(torch.randn(8, 16))
            hook.pop()
        hook.remove()
        counts.append(counters["stats"]["unique_graphs"])
    assert counts[0] == 1 and counts[1] > 1


# ------------------------------------------------------------------ noise-aware alerts


def test_standard_errors_reach_history_logs_and_alerts(tmp_path, monkeypatch):
    """The markers report carries ``standard_errors`` (added by the markers layer); the monitor puts
    them in the history, logs them on request and feeds them to the alerts."""
    real = geometry_markers

    def with_se(*args, **kwargs):
        report = real(*args, **kwargs)
        report.standard_errors = {"glue_dimension": 0.25, "glue_utility": float("nan")}
        return report

    monkeypatch.setattr(monitor_module, "geometry_markers", with_se)
    fed = []

    class Spy(MarkerAlert):
        def update(self, value, *, epoch, step, se=None, **names):
            fed.append(se)
            return super().update(value, epoch=epoch, step=step, se=se, **names)

    monitor = GeometryMonitor(
        markers=["glue_dimension", "glue_utility"],
        alerts=[Spy("glue_dimension", relative_drop=0.9, min_standard_errors=2.0)],
        log_standard_errors=True,
        **FAST,
    )
    tr, _ = fit(tmp_path, [monitor], max_epochs=2)
    assert [h["glue_dimension_se"] for h in monitor.history] == [0.25, 0.25]
    assert "glue_utility_se" not in monitor.history[0]  # NaN standard errors are dropped
    assert float(tr.callback_metrics["geometry/glue_dimension_se"]) == 0.25
    assert "geometry/glue_utility_se" not in tr.callback_metrics  # never had a value
    assert fed == [0.25, 0.25]


def test_min_standard_errors_ignores_drops_within_the_noise():
    values = [10.0, 7.0]  # a 30% drop from the best value
    noisy = MarkerAlert("glue_dimension", relative_drop=0.2, min_standard_errors=2.0)
    assert noisy.update(values[0], epoch=0, step=0, se=1.5) is None
    # difference 3.0, its standard error sqrt(1.5^2 + 1.5^2) = 2.12: 1.41 standard errors < 2
    assert noisy.update(values[1], epoch=1, step=1, se=1.5) is None
    sharp = MarkerAlert("glue_dimension", relative_drop=0.2, min_standard_errors=2.0)
    sharp.update(values[0], epoch=0, step=0, se=0.5)
    event = sharp.update(values[1], epoch=1, step=1, se=0.5)  # 3.0 / 0.707 = 4.2 standard errors
    assert event is not None and "4.2 standard errors" in event.message
    plain = MarkerAlert("glue_dimension", relative_drop=0.2)
    plain.update(values[0], epoch=0, step=0, se=1.5)
    assert plain.update(values[1], epoch=1, step=1, se=1.5) is not None  # k unset: the drop alone
    # threshold: |value - threshold| against the value's own standard error
    floor = MarkerAlert("glue_dimension", threshold=8.0, min_standard_errors=2.0)
    assert floor.update(7.5, epoch=0, step=0, se=0.5) is None  # 1 standard error below
    assert floor.update(6.5, epoch=1, step=1, se=0.5) is not None  # 3 standard errors below
    # moving average reference: se of the mean of n values is sqrt(sum se_i^2) / n
    avg = MarkerAlert("glue_dimension", relative_drop=0.1, reference="moving_average", window=2)
    avg.update(10.0, epoch=0, step=0, se=0.3)
    avg.update(10.0, epoch=1, step=1, se=0.4)
    assert avg.reference_se() == pytest.approx(0.25)


def test_min_standard_errors_state_round_trip_and_old_checkpoints():
    alert = MarkerAlert("glue_dimension", relative_drop=0.2, min_standard_errors=2.0)
    alert.update(10.0, epoch=0, step=0, se=0.5)
    restored = MarkerAlert("glue_dimension", relative_drop=0.2, min_standard_errors=2.0)
    restored.load_state_dict(alert.state_dict())
    assert restored.best_se == 0.5 and list(restored.recent_se) == [0.5]
    old = {k: v for k, v in alert.state_dict().items() if not k.endswith("_se")}
    restored.load_state_dict(old)  # a checkpoint from before standard errors existed
    assert restored.best == 10.0 and restored.best_se is None
    assert restored.update(7.0, epoch=1, step=1, se=0.1) is not None  # reference SE unknown: drop alone


def test_min_standard_errors_is_validated():
    with pytest.raises(ValueError, match="positive number"):
        MarkerAlert("glue_dimension", relative_drop=0.2, min_standard_errors=0)
    with pytest.raises(ValueError, match=r"only the GLUE markers"):
        MarkerAlert("participation_ratio", relative_drop=0.2, min_standard_errors=2.0)


# ------------------------------------------------------------------ 11. found in review (eleventh session)


def test_a_batch_skipped_before_its_features_were_taken_does_not_drop_the_next(tmp_path):
    """A batch whose labels cannot be read is skipped; its features, already captured by the hook, must
    go with it, or the next batch gets twice its rows and is skipped too (it was, with a misleading
    "called several times per step?" warning). The value is that of every other batch's samples."""
    x, y = (
        gaussian_classes()
    )  # 5 classes of 40, batches of 32: only batch 1 (rows 32-63) holds classes 0 and 1

    def label_fn(batch):
        labels = batch[1]
        if int(labels[0]) == 0 and int(labels[-1]) == 1:
            raise ValueError("unlabelled batch")
        return labels

    monitor = GeometryMonitor(label_fn=label_fn, **CHEAP)
    with pytest.warns(MonitorWarning, match="could not use validation batch 1") as record:
        tr, model = fit(tmp_path, [monitor])
    assert not [w for w in record if "feature rows for a batch" in str(w.message)]
    kept = torch.cat([torch.arange(32), torch.arange(64, 200)])
    feats = penultimate(model, x)[kept]
    expected = geometry_markers(feats, y[kept], markers=["participation_ratio"]).values["participation_ratio"]
    assert float(tr.callback_metrics["geometry/participation_ratio"]) == pytest.approx(
        float(expected), rel=1e-5
    )


def test_prefer_higher_takes_one_key_as_a_string_and_refuses_non_keys(tmp_path):
    """``prefer_higher="key"`` was split into one-letter keys, none of them ever logged: nothing was
    saved and nothing said so."""
    runs = {}
    for name, prefer in (
        ("string", "geometry/participation_ratio"),
        ("list", ["geometry/participation_ratio"]),
    ):
        ckpt = MarkerCheckpoint(prefer_higher=prefer, dirpath=tmp_path / name)
        fit(tmp_path / name, [GeometryMonitor(**CHEAP), ckpt], max_epochs=2)
        assert ckpt.prefer_higher == ["geometry/participation_ratio"] and ckpt.best_model_path
        runs[name] = ckpt.kept_marker_values
    assert runs["string"] == runs["list"] and set(runs["list"]) == {"geometry/participation_ratio"}
    for bad in ([""], ["geometry/participation_ratio", 3]):
        with pytest.raises(ValueError, match="non-empty strings"):
            MarkerCheckpoint(prefer_higher=bad)


def test_marker_checkpoints_that_differ_in_schedule_share_a_trainer_and_old_keys_restore(tmp_path):
    """The state key holds ModelCheckpoint's schedule, as ModelCheckpoint's own: two instances that
    differ only in every_n_epochs were refused by Lightning as duplicates. A checkpoint written with the
    former key (no schedule) still restores the kept marker values."""
    every = [
        MarkerCheckpoint(
            prefer_higher=["geometry/participation_ratio"], dirpath=tmp_path / f"e{n}", every_n_epochs=n
        )
        for n in (1, 2)
    ]
    last = ModelCheckpoint(dirpath=tmp_path / "last", save_last=True)
    fit(tmp_path / "a", [GeometryMonitor(**CHEAP), *every, last], max_epochs=2)
    assert every[0].state_key != every[1].state_key
    assert all(c.best_model_path and c.kept_marker_values for c in every)
    path = tmp_path / "last" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    states = saved["callbacks"]
    assert {c.state_key for c in every} <= set(states)
    legacy = every[0]._legacy_state_key  # the former format: no schedule (the same key for both)
    assert legacy == every[1]._legacy_state_key and legacy not in states
    states[legacy] = states.pop(every[0].state_key)
    del states[every[1].state_key]
    torch.save(saved, path)
    resumed = MarkerCheckpoint(prefer_higher=["geometry/participation_ratio"], dirpath=tmp_path / "r")
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes()
    tr = trainer(tmp_path / "b", [GeometryMonitor(**CHEAP), resumed], max_epochs=2, logger=False)
    tr.fit(TinyMLP(), *loaders(x, y), ckpt_path=str(path))
    assert resumed.kept_marker_values == every[0].kept_marker_values  # restored (no epoch left to run)


class LazyMLP(TinyMLP):
    """TinyMLP whose layers are built in ``configure_model()`` (Lightning's pattern for large models),
    which Lightning calls after the callbacks' ``setup``."""

    def __init__(self):
        L.LightningModule.__init__(self)
        self.body = self.fc = None
        self.lr, self.collapse_at = 1e-2, None

    def configure_model(self):
        if self.fc is None:
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
            self.fc = nn.Linear(32, 5)


def test_a_model_that_builds_its_layers_in_configure_model_is_monitored(tmp_path):
    """The monitor (and MarkerCheckpoint's key check) resolved the layers at setup, before Lightning
    built them: the run crashed where it trains without the monitor. They now resolve at the first hook
    after configure_model; the values are those of the built layers."""
    monitor = GeometryMonitor(**CHEAP)
    ckpt = MarkerCheckpoint(
        prefer_higher=["geometry/participation_ratio"], dirpath=tmp_path / "ck", save_last=True
    )
    tr, model = fit(tmp_path / "a", [monitor, ckpt], model=LazyMLP(), max_epochs=2)
    x, y = gaussian_classes()
    expected = geometry_markers(penultimate(model, x), y, markers=["participation_ratio"]).values
    assert float(tr.callback_metrics["geometry/participation_ratio"]) == pytest.approx(
        float(expected["participation_ratio"]), rel=1e-5
    )
    assert ckpt.best_model_path and [h["epoch"] for h in monitor.history] == [0, 1]
    # resumed with an equivalent layer spec: the state is found under the resolved key
    resumed = GeometryMonitor(layers="fc:input", **CHEAP)
    L.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "b", [resumed], max_epochs=3, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(LazyMLP(), *loaders(x, y), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    # Lightning compares the callbacks' keys before on_load_checkpoint: the monitor's is already resolved
    missing = [str(w.message) for w in caught if "Please add the following callbacks" in str(w.message)]
    assert not any("GeometryMonitor{" in m for m in missing), missing
    # trainer.validate on a fresh lazy model, and a layer that does not exist even once it is built
    check = GeometryMonitor(**CHEAP)
    trainer(tmp_path / "c", [check], logger=False).validate(LazyMLP(), loaders(x, y)[1], verbose=False)
    assert len(check.history) == 1
    with pytest.raises(ValueError, match="nope"):
        fit(tmp_path / "d", [GeometryMonitor(layers="nope", **CHEAP)], model=LazyMLP())
    with pytest.raises(ValueError, match="nope"):  # a model built in __init__ is still refused at setup
        fit(tmp_path / "e", [GeometryMonitor(layers="nope", **CHEAP)])
    # offline the model is as built as it will be: a bad layer raises at once, a good one gives the values
    with pytest.raises(ValueError, match="has no submodule named 'nope'"):
        GeometryMonitor(layers="nope", **CHEAP).evaluate(model, loaders(x, y)[1])
    offline = GeometryMonitor(**CHEAP).evaluate(model, loaders(x, y)[1])
    assert offline["geometry/participation_ratio"] == pytest.approx(
        float(expected["participation_ratio"]), rel=1e-5
    )


def test_a_key_the_module_also_logs_in_on_validation_epoch_end_is_reported(tmp_path):
    """The module's on_validation_epoch_end runs after the callbacks': the monitor cannot see that log
    coming, and Lightning averages the two values. It now says so once the validation ends, naming the
    key, both values and the fix."""

    class LogsOurKeyAtEpochEnd(TinyMLP):
        def on_validation_epoch_end(self):
            self.log("geometry/participation_ratio", 100.0)

    monitor = GeometryMonitor(**CHEAP)
    with pytest.warns(
        MonitorWarning, match=r"'geometry/participation_ratio' = .*Lightning reports .*prefix="
    ):
        tr, _ = fit(tmp_path, [monitor], model=LogsOurKeyAtEpochEnd())
    mine = monitor.history[-1]["participation_ratio"]
    assert float(tr.callback_metrics["geometry/participation_ratio"]) == pytest.approx(
        (mine + 100.0) / 2, rel=1e-5
    )


def test_a_callable_action_named_stop_does_not_stop_training(tmp_path):
    """Whether to stop was read from the fired events' action labels, which for a callable is its
    __name__: a notification hook named `stop` stopped the run once another alert had action="stop"."""
    calls = []

    def stop(event):  # a user's hook that happens to be named "stop"
        calls.append(event.epoch)

    alerts = [
        MarkerAlert("participation_ratio", threshold=1000.0, mode="max", action=stop),  # fires at epoch 0
        MarkerAlert("participation_ratio", threshold=-1.0, mode="max", action="stop"),  # never fires
    ]
    tr, _ = fit(tmp_path, [GeometryMonitor(alerts=alerts, **CHEAP)], max_epochs=3)
    assert calls == [0] and tr.current_epoch == 3  # it fired (once: alerts re-arm on recovery); no stop


def test_trainer_validate_logs_the_markers_but_leaves_the_alerts_of_the_run_alone(tmp_path):
    """The docs send test sets through trainer.validate(): its value went into the fit's alert state
    (and could fire a 'stop' for an epoch that never trained) and into history like a training epoch.
    As EarlyStopping, alerts now move only during fit; validate's history entries say their stage."""
    alert = MarkerAlert("participation_ratio", threshold=1000.0, mode="max", action="stop")  # always below
    monitor = GeometryMonitor(alerts=[alert], **CHEAP)
    with pytest.warns(GeometryWarning):
        tr, model = fit(tmp_path, [monitor], max_epochs=3)
    assert tr.current_epoch == 1 and len(monitor.alert_history) == 1  # fired and stopped after epoch 0
    n_values, fired = alert.n_values, list(monitor.alert_history)
    x, y = gaussian_classes(seed=5)
    checker = trainer(tmp_path / "v", [monitor], logger=False)
    checker.validate(model, loaders(x, y)[1], verbose=False)
    assert "geometry/participation_ratio" in checker.callback_metrics and not checker.should_stop
    assert alert.n_values == n_values and monitor.alert_history == fired
    assert monitor.history[-1]["stage"] == "validate" and "stage" not in monitor.history[0]


def test_problems_of_a_ranks_own_batches_are_warned_by_that_rank(monkeypatch):
    """Under DDP every warning went through rank_zero_warn, so a problem only another rank had (labels out
    of range in its shard, a batch it skipped, an alert action that raised there) was never said. Such
    local problems are now warned by the rank that has them, tagged; shared ones still by rank 0 alone."""
    from lightning.pytorch.utilities import rank_zero_only

    monitor = GeometryMonitor(**CHEAP)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with pytest.warns(MonitorWarning, match=r"^\[rank 1\] labels out of range$"):
        monitor._problem("labels-range", "labels out of range", local=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor._problem("compute:fc", "shared problem")  # rank 0 says it
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    with pytest.warns(MonitorWarning, match=r"^shared problem$"):
        monitor._problem("compute:fc2", "shared problem")


def test_a_restore_note_of_an_earlier_validate_is_not_said_at_a_later_fresh_fit(tmp_path):
    """load_state_dict (trainer.validate(ckpt_path=...)) kept its note for the next fit, which then said
    that 'the checkpoint holds no alert state' although that fit restored nothing."""
    monitor = GeometryMonitor(alerts=[MarkerAlert("participation_ratio", threshold=1e9)], **CHEAP)
    monitor.load_state_dict(GeometryMonitor(**CHEAP).state_dict())  # as a validate(ckpt_path) would
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [monitor])
    assert not [str(w.message) for w in caught if "checkpoint holds" in str(w.message)]


# ------------------------------------------------------------------ checkpoints outside fit, and sharing


def test_validate_with_a_checkpoint_after_fit_keeps_the_record_and_tags_the_checkpoint_epoch(tmp_path):
    """trainer.validate/test(ckpt_path="best") after fit: Lightning restores the callbacks too, and the
    monitor's history, per-class history, alert history and alert states were replaced by the (older)
    checkpoint's; the validate entry was tagged with the fit's last epoch, not the weights' epoch."""

    class Tested(TinyMLP):
        def test_step(self, batch, batch_idx):
            self.log("test_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    alert = MarkerAlert("glue_dimension", relative_drop=0.01)
    monitor = GeometryMonitor(markers=["glue_dimension"], alerts=[alert], **FAST)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="geometry/glue_dimension", mode="max")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr, model = fit(tmp_path, [monitor, ckpt], model=Tested(), max_epochs=4)
    before = [dict(h) for h in monitor.history]
    per_class, fired, alert_state = (
        list(monitor.per_class_history),
        list(monitor.alert_history),
        alert.state_dict(),
    )
    assert [h["epoch"] for h in before] == [0, 1, 2, 3] and alert.n_values == 4
    best_epoch = torch.load(ckpt.best_model_path, weights_only=False)["epoch"]  # the fit ended at epoch 4
    x, y = gaussian_classes()
    _, val = loaders(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.test(model, val, ckpt_path="best")
        tr.validate(model, val, ckpt_path="best")
    assert monitor.history[:4] == before and monitor.per_class_history[:4] == per_class
    assert monitor.alert_history == fired and alert.state_dict() == alert_state
    (entry,) = monitor.history[4:]
    assert entry["stage"] == "validate" and entry["epoch"] == best_epoch
    assert entry["step"] == before[best_epoch]["step"]  # the fit's x-axis for those weights
    assert entry["glue_dimension"] == pytest.approx(before[best_epoch]["glue_dimension"], rel=1e-9)
    assert monitor.per_class_history[4]["epoch"] == best_epoch


def test_resume_with_other_value_settings_warns_and_starts_the_alerts_afresh(tmp_path):
    """The values of other settings (e.g. fewer samples per class) are not comparable with the checkpoint's,
    and the alerts compared them silently (a false 28% drop in a review's run); only the seed was checked."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    kwargs = dict(markers=["glue_dimension"], n_t=30, n_pairs=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(
            tmp_path / "a",
            [
                GeometryMonitor(
                    samples_per_class=30, alerts=[MarkerAlert("glue_dimension", relative_drop=0.2)], **kwargs
                ),
                ckpt,
            ],
            max_epochs=2,
        )
    alert = MarkerAlert("glue_dimension", relative_drop=0.2)
    monitor = GeometryMonitor(samples_per_class=4, alerts=[alert], **kwargs)
    x, y = gaussian_classes()
    train, val = loaders(x, y)
    with pytest.warns(MonitorWarning) as record:
        trainer(tmp_path / "b", [monitor], max_epochs=3, logger=False).fit(
            TinyMLP(), train, val, ckpt_path=str(tmp_path / "ck" / "last.ckpt")
        )
    messages = [str(w.message) for w in record]
    (said,) = [m for m in messages if "other value settings" in m]
    assert "samples_per_class: checkpoint 30, now 4" in said and "alerts start afresh" in said
    assert not [m for m in messages if "checkpoint holds" in m]  # no confusing second note
    assert [h["epoch"] for h in monitor.history] == [0, 1, 2]  # the earlier values are kept
    assert alert.n_values == 1  # only the value measured with the new settings


def test_two_monitors_with_one_checkpoint_state_key_are_refused_at_setup(tmp_path):
    """Disjoint markers on the same resolved layer and prefix log no key in common, but their checkpoint
    states shared one key: a checkpoint kept one of them and a resume loaded it into both."""
    a = GeometryMonitor(markers=["participation_ratio"], samples_per_class=50, lid_k=10)
    b = GeometryMonitor("fc:input", markers=["effective_rank"], samples_per_class=50, lid_k=10)
    with pytest.raises(ValueError, match=r"checkpoint states would share the key.*own prefix"):
        fit(tmp_path, [a, b])
    fit(
        tmp_path,
        [a, GeometryMonitor("fc:input", markers=["effective_rank"], prefix="g2", samples_per_class=50)],
    )


def test_one_alert_object_in_two_places_is_refused():
    alert = MarkerAlert("participation_ratio", relative_drop=0.5)
    with pytest.raises(ValueError, match="given twice in `alerts`"):
        GeometryMonitor(alerts=[alert, alert], **CHEAP)
    a = GeometryMonitor(prefix="a", alerts=[alert], **CHEAP)
    b = GeometryMonitor(layers="body.1", prefix="b", alerts=[alert], **CHEAP)
    with pytest.raises(
        ValueError, match="same MarkerAlert object .* two GeometryMonitors.*one MarkerAlert per"
    ):
        fit(None, [a, b])


def test_a_layer_called_in_a_loop_is_skipped_without_buffering_every_call(tmp_path):
    """The watched module runs 40 times per step: the monitor skips those batches (one row per sample is
    impossible) and its hook never holds more rows than the batch has samples."""

    class Looped(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.Linear(32, 32)

        def features(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            for _ in range(40):
                h = torch.tanh(self.cell(h))
            return h

    monitor = GeometryMonitor("cell", markers=["participation_ratio"], samples_per_class=10)
    held: list[int] = []

    def watch(module, args, output):  # before the monitor's hook (registered later): the earlier calls' rows
        hook = monitor._hooks.get("cell")
        if hook is not None and hook.enabled:
            held.append(sum(b.shape[0] for b in hook._buffer))

    model = Looped()
    model.cell.register_forward_hook(watch)
    x, y = gaussian_classes()
    _, val = loaders(x, y)
    with pytest.warns(MonitorWarning) as record:
        trainer(tmp_path, [monitor], logger=False).validate(model, val, verbose=False)
    batch = next(iter(val))[1].shape[0]
    assert held and max(held) <= batch
    assert any(
        f"produced {40 * batch} feature rows for a batch of {batch} labels" in str(w.message) for w in record
    )
    assert monitor.history == []


def test_a_single_logit_binary_head_keeps_both_classes(tmp_path):
    """nn.Linear(width, 1) trained with BCE: the class range was taken as out_features = 1, so every
    label 1 was dropped and no epoch had two classes (nothing was ever logged)."""

    class Binary(TinyMLP):
        def __init__(self) -> None:
            super().__init__(n_classes=1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.binary_cross_entropy_with_logits(self(x)[:, 0], y.float())

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self(batch[0])

    monitor = GeometryMonitor(**CHEAP)
    tr, model = fit(tmp_path, [monitor], model=Binary(), data=gaussian_classes(n_classes=2))
    x, y = gaussian_classes(n_classes=2)
    expected = geometry_markers(penultimate(model, x), y, markers=["participation_ratio"])
    assert float(tr.callback_metrics["geometry/participation_ratio"]) == pytest.approx(
        float(expected.values["participation_ratio"]), rel=1e-5
    )


def test_samples_that_share_their_key_are_warned_with_the_tensor_it_came_from(tmp_path):
    """A dict batch whose first recognised input ('input_ids', a prompt shared by every sample) does not
    identify the samples: every row of a class got one key and counted once, silently (three prompt
    variants kept 3 of 20 samples per class, and markers were logged)."""
    x, y = gaussian_classes()
    prompt = torch.arange(8)

    class Prompted(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i):
            return {"input_ids": prompt + i % 3, "pixel_values": x[i], "labels": y[i]}

    class DictModel(TinyMLP):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["pixel_values"]), batch["labels"])

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self(batch["pixel_values"])

    def run(monitor):
        loader = DataLoader(Prompted(), batch_size=50)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(DictModel(), loader, loader)
        return [str(w.message) for w in caught if issubclass(w.category, MonitorWarning)]

    said = run(GeometryMonitor(**CHEAP))
    repeated = 50 - len({(int(y[i]), i % 3) for i in range(50)})  # the first batch: 2 classes x 3 prompts
    expected = f"{repeated} of 50 samples of a validation batch have the same input (batch['input_ids'])"
    assert any(expected in m for m in said)
    fixed = GeometryMonitor(**CHEAP, input_fn=lambda b: b["pixel_values"])
    assert not [m for m in run(fixed) if "same input" in m] and len(fixed.history) == 1


def test_a_failing_per_class_view_leaves_the_markers_logged(tmp_path, monkeypatch):
    """The per-class view (per_class_history, the heat map) failed inside the layer's computation, so all
    of the layer's markers were dropped although they had been computed."""

    def failing(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(monitor_module, "class_view", failing)
    monitor = GeometryMonitor(markers=["glue_dimension", "participation_ratio"], **FAST)
    with pytest.warns(
        MonitorWarning, match=r"skipped the per-class view of layer 'fc' at epoch 0 \(MemoryError\)"
    ):
        tr, _ = fit(tmp_path, [monitor])
    assert {"geometry/glue_dimension", "geometry/participation_ratio"} <= set(tr.callback_metrics)
    assert len(monitor.history) == 1 and monitor.per_class_history == []


def test_a_marker_beyond_float32_is_kept_in_the_history_not_logged_as_inf(tmp_path):
    """A float64 model with features near 1e40: Lightning logs float32, so the within-class distance
    (3e40) was logged as inf, and the monitor then blamed a key collision that did not happen."""

    class Huge(TinyMLP):
        def features(self, x: torch.Tensor) -> torch.Tensor:
            return super().features(x) * 1e40

    monitor = GeometryMonitor(markers=["participation_ratio", "within_class_distance"], samples_per_class=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = trainer(tmp_path, [monitor], logger=False, precision="64-true")
        tr.validate(Huge(), loaders(*gaussian_classes())[1], verbose=False)  # no training: no overflow there
    said = [str(w.message) for w in caught if issubclass(w.category, MonitorWarning)]
    assert [m for m in said if "did not log 'geometry/within_class_distance'" in m and "float32" in m]
    assert not [m for m in said if "Lightning reports" in m]  # no false collision
    assert "geometry/within_class_distance" not in tr.callback_metrics
    assert monitor.history[0]["within_class_distance"] > 1e38  # kept, in float64
    assert math.isfinite(float(tr.callback_metrics["geometry/participation_ratio"]))  # scale-free: logged


def test_a_checkpoint_is_matched_to_the_step_its_own_weights_were_logged_at():
    """The step of trainer.validate(ckpt_path=...) came from the last computation of the checkpoint's
    epoch, also for a checkpoint saved later in that epoch (every_n_train_steps with val_check_interval
    < 1): the entry was filed where the fit had measured other weights."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    monitor = GeometryMonitor(**CHEAP)
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    state = {"computed_at": [[0, 2, 1], [0, 4, 3]]}  # (epoch, global_step, logged step)
    for global_step, expected in ((2, 1), (4, 3), (3, 3)):  # 3: saved between two computations
        checkpoint = {"epoch": 0, "global_step": global_step, "callbacks": {monitor.state_key: state}}
        monitor.on_load_checkpoint(trainer, None, checkpoint)
        assert monitor._weights_from == (0, expected)
