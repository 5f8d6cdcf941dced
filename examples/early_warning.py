"""Early warning: a geometry alert fires when the representation degrades, and the checkpoint survives.

A small CNN learns the 8x8 digits with AdamW. From ``--degrade-epoch`` on, its weight decay is switched
from 1e-4 to 10 (decoupled: every step shrinks each weight by 3%), which squeezes the penultimate
features into fewer directions: the GLUE effective dimension ``glue_dimension`` falls steadily, by half
within 8 epochs in the full run (validation accuracy falls too, from ~0.88 to ~0.56, then flattens).

- ``MarkerAlert("glue_dimension", relative_drop=0.15, patience=2, warmup=2)`` fires a ``GeometryWarning``
  once the dimension has stayed 15% below its best value for 2 consecutive epochs (the first 2 epochs,
  where it dips while the network leaves its random initialisation, are ignored). The alert is also
  logged as ``geometry/alert/glue_dimension`` (1 on the epoch it fires, else 0) and kept in
  ``monitor.alert_history``.
- ``ModelCheckpoint(monitor="geometry/glue_dimension", mode="max")`` keeps the checkpoint from before
  the drop.

    python examples/early_warning.py            # 16 epochs, degradation from epoch 8, ~30 s on 2 cores
    python examples/early_warning.py --fast     # 9 epochs, degradation from epoch 5, reduced GLUE settings
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from _digits import (
    DigitsCNN,
    ExampleParser,
    checkpoint_epoch,
    cpu_threads,
    digits_loaders,
    make_trainer,
    monitor_settings,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_geomarkers import GeometryMonitor, GeometryWarning, MarkerAlert

MARKER = "glue_dimension"
BASE_WEIGHT_DECAY = 1e-4
DEGRADED_WEIGHT_DECAY = 10.0


class WeightDecaySwitch(L.Callback):
    """From epoch ``epoch`` on, train with weight decay ``weight_decay`` (every parameter group)."""

    def __init__(self, epoch: int, weight_decay: float) -> None:
        self.epoch = epoch
        self.weight_decay = weight_decay

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["weight_decay"] = self.weight_decay


def parse_args(argv: Sequence[Any] | None) -> argparse.Namespace:
    parser = ExampleParser(__doc__.splitlines()[0], "runs/early_warning", 16, 9)
    parser.add_argument(
        "--degrade-epoch",
        type=int,
        default=None,
        help="first epoch with the large weight decay (default: 8, or 5 with --fast)",
    )
    args = parser.parse_args(argv)
    if args.degrade_epoch is None:
        args.degrade_epoch = 5 if args.fast else 8
    return args


def read_scalars(log_dir: str, tags: Sequence[str]) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` for the given scalar tags of the TensorBoard event files in ``log_dir``."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    present = set(events.Tags()["scalars"])
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags if tag in present}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    degrade_epoch = args.degrade_epoch  # the first epoch trained with the large weight decay
    L.seed_everything(args.seed, workers=True, verbose=False)

    train_loader, val_loader = digits_loaders(batch_size=64, val_fraction=0.2, seed=args.seed)
    model = DigitsCNN(optimizer="adamw", lr=3e-3, weight_decay=BASE_WEIGHT_DECAY)
    alert = MarkerAlert(MARKER, relative_drop=0.15, patience=2, warmup=2)
    monitor = GeometryMonitor(
        markers=["glue_dimension", "glue_utility"],
        alerts=[alert],
        seed=args.seed,
        **monitor_settings(args.fast),
    )
    checkpoint = ModelCheckpoint(
        monitor=f"geometry/{MARKER}", mode="max", filename="epoch={epoch:02d}", auto_insert_metric_name=False
    )
    logger = TensorBoardLogger(save_dir=args.log_dir, name="", default_hp_metric=False)
    switch = WeightDecaySwitch(degrade_epoch, DEGRADED_WEIGHT_DECAY)
    trainer = make_trainer(args.epochs, [monitor, checkpoint, switch], logger)

    with cpu_threads(1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeometryWarning)
        trainer.fit(model, train_loader, val_loader)
    alert_messages = [str(w.message) for w in caught if issubclass(w.category, GeometryWarning)]
    for w in caught:  # hand the other warnings back to the usual machinery
        if not issubclass(w.category, GeometryWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    # What TensorBoard shows, by epoch (Lightning writes an "epoch" scalar at every logging step; the
    # validation scalars sit at step global_step - 1, so map steps to epochs through it).
    log_dir = str(Path(logger.log_dir))
    alert_tag = f"geometry/alert/{MARKER}"
    scalars = read_scalars(log_dir, ["epoch", alert_tag, "val_acc"])
    epoch_of_step = {step: int(value) for step, value in scalars["epoch"].items()}
    tb_alert_epochs = [epoch_of_step[s] for s, v in sorted(scalars.get(alert_tag, {}).items()) if v > 0]
    val_acc = {epoch_of_step[s]: v for s, v in scalars.get("val_acc", {}).items()}
    alert_epochs = [a["epoch"] for a in monitor.alert_history]
    best_epoch = checkpoint_epoch(checkpoint.best_model_path)

    print()
    print(f"Weight decay {BASE_WEIGHT_DECAY:g} -> {DEGRADED_WEIGHT_DECAY:g} from epoch {degrade_epoch}.")
    print("epoch  phase     glue_dimension  glue_utility  val_acc  alert")
    for h in monitor.history:
        phase = "degraded" if h["epoch"] >= degrade_epoch else "normal"
        flag = "FIRED" if h["epoch"] in alert_epochs else ""
        acc = val_acc.get(h["epoch"], float("nan"))
        print(
            f"{h['epoch']:5d}  {phase:8s}  {h[MARKER]:14.3f}  {h['glue_utility']:12.3f}  {acc:7.3f}  {flag}"
        )
    print()
    for message in alert_messages:
        print(f"GeometryWarning: {message}")
    print(
        f"monitor.alert_history epochs: {alert_epochs}; '{alert_tag}' = 1 in TensorBoard at: {tb_alert_epochs}"
    )
    print(
        f"Kept checkpoint (max geometry/{MARKER} = {float(checkpoint.best_model_score):.3f}) is from epoch "
        f"{best_epoch}, {'before' if best_epoch is not None and best_epoch < degrade_epoch else 'NOT before'} "
        f"the degradation at epoch {degrade_epoch}: {checkpoint.best_model_path}"
    )
    print(f"    tensorboard --logdir {log_dir}")
    return {
        "alert_epochs": alert_epochs,
        "tensorboard_alert_epochs": tb_alert_epochs,
        "alert_messages": alert_messages,
        "degrade_epoch": degrade_epoch,
        "best_checkpoint_epoch": best_epoch,
        "best_model_path": checkpoint.best_model_path,
        "history": monitor.history,
        "log_dir": log_dir,
    }


if __name__ == "__main__":
    main()
