"""Geometry markers of a small Transformer encoder, with an explicit token pooling.

Each 8x8 digit is read as a sequence of 8 row tokens (8 pixels each), projected to ``d_model``; a
learned CLS token is prepended, and the linear head classifies the encoder's output at the CLS position.
The monitor watches the encoder's output ``(B, 9, d_model)`` (``layers="encoder"``) and pools it with
``pooling="cls"`` (token 0: exactly what the head sees) or ``pooling="mean"`` (the average of all tokens).

    python examples/transformer.py                  # 12 epochs, ~30 s on 2 CPU cores
    python examples/transformer.py --pooling mean   # the geometry of the mean token instead
    python examples/transformer.py --fast           # 2 epochs, reduced GLUE settings
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from _digits import (
    DigitsClassifier,
    ExampleParser,
    cpu_threads,
    digits_loaders,
    format_markers,
    make_trainer,
    monitor_settings,
)
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_geomarkers import GeometryMonitor


class DigitsTransformer(DigitsClassifier):
    """Rows of a ``(B, 1, 8, 8)`` image as 8 tokens, a CLS token, a pre-norm encoder and a Linear head.

    Args:
        num_classes: outputs of the head ``fc``.
        d_model, nhead, num_layers, dim_feedforward: encoder size (no dropout).
        optimizer, lr, weight_decay: see ``DigitsClassifier``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        optimizer: str = "adamw",
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(optimizer, lr, weight_decay)
        self.embed = nn.Linear(8, d_model)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d_model))
        self.position = nn.Parameter(0.02 * torch.randn(1, 9, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True, norm_first=True
        )
        # Pre-norm layers leave the residual stream un-normalised: close the encoder with a LayerNorm.
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(1, 2)  # (B, 1, 8, 8) -> (B, 8 tokens, 8 features)
        tokens = self.embed(rows)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.position
        return self.fc(self.encoder(tokens)[:, 0])


def parse_args(argv: Sequence[Any] | None) -> argparse.Namespace:
    parser = ExampleParser(__doc__.splitlines()[0], "runs/transformer", 12, 2)
    parser.add_argument(
        "--pooling", choices=("cls", "mean"), default="cls", help="token pooling (default: cls)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)

    train_loader, val_loader = digits_loaders(batch_size=64, val_fraction=0.2, seed=args.seed)
    model = DigitsTransformer()
    # The encoder returns (B, 9, d_model): the monitor pools the tokens to (B, d_model) before measuring.
    monitor = GeometryMonitor(
        layers="encoder", pooling=args.pooling, seed=args.seed, **monitor_settings(args.fast)
    )
    logger = TensorBoardLogger(save_dir=args.log_dir, name="", default_hp_metric=False)
    trainer = make_trainer(args.epochs, [monitor], logger, enable_checkpointing=False)
    with cpu_threads(1):
        trainer.fit(model, train_loader, val_loader)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v is not None}
    markers = {k: v for k, v in monitor.history[-1].items() if k not in ("epoch", "step", "layer")}
    log_dir = str(Path(logger.log_dir))
    print()
    print(
        f"Encoder output pooled with pooling={args.pooling!r}; after {args.epochs} epochs "
        f"val_acc = {metrics.get('val_acc', math.nan):.3f}. Markers:"
    )
    print(format_markers(markers))
    print(f"    tensorboard --logdir {log_dir}")
    return {"markers": markers, "metrics": metrics, "history": monitor.history, "log_dir": log_dir}


if __name__ == "__main__":
    main()
