"""The examples run end to end (``--fast``) and do what they claim: markers in TensorBoard, a kept
checkpoint, an alert that fires on the degradation and not before, finite markers for a Transformer."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GLUE_TAGS = ("glue_capacity", "glue_dimension", "glue_radius", "glue_utility")


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``examples/<name>.py`` under a private module name (the examples import ``_digits``)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def event_scalars(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def by_epoch(events: EventAccumulator, tag: str) -> dict[int, float]:
    """A scalar tag's values keyed by epoch (Lightning writes an ``epoch`` scalar at every logging step)."""
    epoch_of_step = {e.step: int(e.value) for e in events.Scalars("epoch")}
    return {epoch_of_step[e.step]: e.value for e in events.Scalars(tag)}


def test_digits_loaders_shapes_ranges_and_class_subset(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from _digits import digits_loaders, digits_tensors

    train, val = digits_loaders(batch_size=32, val_fraction=0.25, seed=0, classes=[7, 3])
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    n_train, n_val = len(train.dataset), len(val.dataset)
    assert n_train + n_val == 179 + 183  # the 7s and the 3s
    assert abs(n_val - 0.25 * (n_train + n_val)) <= 1
    assert set(torch.cat([b[1] for b in val]).tolist()) == {0, 1}
    x_all, y_all = digits_tensors()
    x_sub, y_sub = digits_tensors([7, 3])
    assert torch.equal(x_sub[y_sub == 0], x_all[y_all == 7]) and torch.equal(
        x_sub[y_sub == 1], x_all[y_all == 3]
    )
    # Seeded: the same split and the same shuffled batches.
    again, _ = digits_loaders(batch_size=32, val_fraction=0.25, seed=0, classes=[7, 3])
    assert torch.equal(next(iter(again))[0], x)


def test_quickstart_logs_markers_and_keeps_a_checkpoint(tmp_path, monkeypatch, capsys):
    quickstart = load_example("quickstart", monkeypatch)
    out = quickstart.main(["--fast", "--log-dir", tmp_path])  # a Path in argv is accepted

    log_dir = Path(out["log_dir"])
    assert log_dir.is_relative_to(tmp_path) and list(log_dir.glob("events.out.tfevents.*"))
    events = event_scalars(str(log_dir))
    scalars = set(events.Tags()["scalars"])
    expected = {f"geometry/{m}" for m in (*GLUE_TAGS, "participation_ratio", "effective_rank", "nc1", "lid")}
    assert expected <= scalars, expected - scalars
    assert {"val_acc", "val_loss", "train_loss"} <= scalars
    assert "geometry/feature_spectrum" in events.Tags()["histograms"]
    dims = by_epoch(events, "geometry/glue_dimension")
    assert sorted(dims) == [0, 1] and all(math.isfinite(v) and v > 0 for v in dims.values())

    # The kept checkpoint is the epoch with the highest logged D_eff, and it loads.
    best = Path(out["best_model_path"])
    assert best.is_file() and best.is_relative_to(log_dir)
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    best_epoch = max(dims, key=dims.get)
    assert ckpt["epoch"] == best_epoch
    assert out["best_model_score"] == pytest.approx(dims[best_epoch], rel=1e-5)
    assert "fc.weight" in ckpt["state_dict"]

    assert out["metrics"]["geometry/glue_dimension"] == pytest.approx(dims[1], rel=1e-5)
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {log_dir}" in printed
    assert str(best) in printed and "glue_utility" in printed


def test_early_warning_fires_on_the_degradation_and_keeps_the_checkpoint_before_it(tmp_path, monkeypatch):
    early_warning = load_example("early_warning", monkeypatch)
    out = early_warning.main(["--fast", "--log-dir", str(tmp_path)])
    degrade = out["degrade_epoch"]
    history = {h["epoch"]: h["glue_dimension"] for h in out["history"]}
    assert sorted(history) == list(range(max(history) + 1)) and max(history) > degrade

    # The representation really degrades: D_eff ends well below its best value before the switch.
    best_before = max(v for e, v in history.items() if e < degrade)
    assert history[max(history)] < 0.8 * best_before

    # The alert fires at or after the degradation, never before, with a GeometryWarning each time.
    assert out["alert_epochs"], "the alert never fired"
    assert min(out["alert_epochs"]) >= degrade
    assert len(out["alert_messages"]) == len(out["alert_epochs"])
    assert all("glue_dimension" in m for m in out["alert_messages"])

    # The same in the TensorBoard event file: geometry/alert/glue_dimension is 0 before, 1 when it fires.
    flags = by_epoch(event_scalars(out["log_dir"]), "geometry/alert/glue_dimension")
    assert sorted(flags) == sorted(history)
    assert [e for e, v in sorted(flags.items()) if v > 0] == out["alert_epochs"]

    # The kept checkpoint is the best D_eff, from before the degradation.
    assert out["best_checkpoint_epoch"] < degrade
    assert history[out["best_checkpoint_epoch"]] == pytest.approx(max(history.values()))
    assert Path(out["best_model_path"]).is_file()


def test_transformer_markers_are_finite_and_follow_the_pooling(tmp_path, monkeypatch):
    transformer = load_example("transformer", monkeypatch)
    runs = {
        pooling: transformer.main(["--fast", "--log-dir", str(tmp_path / pooling), "--pooling", pooling])
        for pooling in ("cls", "mean")
    }
    for out in runs.values():
        markers = out["markers"]
        assert {*GLUE_TAGS, "participation_ratio", "nc1", "lid"} <= set(markers)
        assert all(math.isfinite(v) for v in markers.values()), markers
        assert 0 < markers["glue_utility"] <= 1
        assert len(out["history"]) == 2
        assert out["metrics"]["val_acc"] > 0.5  # it learns, even in 2 epochs
    # Same seed, same network: only the pooling differs, and the geometry does too.
    assert runs["cls"]["metrics"]["val_acc"] == runs["mean"]["metrics"]["val_acc"]
    assert runs["cls"]["markers"]["glue_dimension"] != pytest.approx(
        runs["mean"]["markers"]["glue_dimension"]
    )
