"""Quickstart: live geometry markers of a small CNN on the 8x8 digits, in TensorBoard.

``GeometryMonitor`` watches the input of the classifier head ``fc`` (found automatically), computes the
markers at the end of every validation epoch and logs them as ``geometry/<marker>``; a ``ModelCheckpoint``
keeps the epoch with the highest GLUE effective dimension ``geometry/glue_dimension``.

    python examples/quickstart.py                  # 15 epochs, 10 s on an idle 2-core CPU, more when busy
    python examples/quickstart.py --fast           # 2 epochs, reduced GLUE settings (a smoke test)
    tensorboard --logdir runs/quickstart           # printed at the end, with the exact directory

Needs scikit-learn (for the digits data), nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from _digits import (
    DigitsCNN,
    ExampleParser,
    cpu_threads,
    digits_loaders,
    format_markers,
    make_trainer,
    monitor_settings,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_geomarkers import GeometryMonitor


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = ExampleParser(__doc__.splitlines()[0], "runs/quickstart", 15, 2).parse_args(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)

    train_loader, val_loader = digits_loaders(batch_size=64, val_fraction=0.2, seed=args.seed)
    model = DigitsCNN(num_classes=10, lr=3e-3)
    # The defaults: 50 samples per class (all ~36 validation digits of each class), all 45 class pairs,
    # 100 probes per pair (n_t); --fast uses fewer.
    monitor = GeometryMonitor(seed=args.seed, **monitor_settings(args.fast))
    logger = TensorBoardLogger(save_dir=args.log_dir, name="", default_hp_metric=False)
    checkpoint = ModelCheckpoint(
        monitor="geometry/glue_dimension",
        mode="max",
        # "/" in a metric name would make a sub-directory: write the value under a short name.
        filename="epoch={epoch:02d}-glue_dimension={geometry/glue_dimension:.3f}",
        auto_insert_metric_name=False,
    )
    trainer = make_trainer(args.epochs, [monitor, checkpoint], logger)
    with cpu_threads(1):
        trainer.fit(model, train_loader, val_loader)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v is not None}
    markers = monitor.history[-1] if monitor.history else {}
    score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else math.nan
    log_dir = str(Path(logger.log_dir))

    print()
    print(f"Logs (TensorBoard event files): {log_dir}")
    print(f"Kept checkpoint (max geometry/glue_dimension = {score:.4f}): {checkpoint.best_model_path}")
    print(
        f"Markers at the last epoch ({markers.get('epoch', '?')}), val_acc = {metrics.get('val_acc', math.nan):.3f}:"
    )
    print(format_markers(markers))
    print("Open the dashboard (Scalars tab, 'geometry' group; Custom Scalars for grouped charts) with:")
    print(f"    tensorboard --logdir {log_dir}")
    return {
        "log_dir": log_dir,
        "best_model_path": checkpoint.best_model_path,
        "best_model_score": score,
        "metrics": metrics,
        "history": monitor.history,
    }


if __name__ == "__main__":
    main()
