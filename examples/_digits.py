"""Shared pieces of the examples: the 8x8 digits data (ships with scikit-learn) and a small CNN.

``digits_loaders`` gives train/validation ``DataLoader`` s of ``(B, 1, 8, 8)`` float images in [0, 1] with
int64 labels; ``DigitsCNN`` is a two-conv network whose classifier head is called ``fc``: its input (the
conv maps average-pooled to a 2 x 2 grid and flattened, ``8 * width`` features) is the penultimate layer
that ``GeometryMonitor`` watches by default. One epoch over the ~1400 training images takes ~0.2-0.5 s on
one CPU core.

Also: ``ExampleParser`` (the examples' common command line), ``cpu_threads`` (a thread-count context),
``make_trainer`` (a quiet CPU ``Trainer``), ``checkpoint_epoch`` and ``format_markers`` used to print the
results.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomarkers.utilities import limit_threads

__all__ = [
    "ExampleParser",
    "DigitsCNN",
    "DigitsClassifier",
    "SHOWN_MARKERS",
    "checkpoint_epoch",
    "cpu_threads",
    "digits_loaders",
    "digits_tensors",
    "format_markers",
    "make_trainer",
    "monitor_settings",
]

# The digits pixels are integers 0..16.
_PIXEL_MAX = 16.0

#: Markers the examples print at the end (the monitor logs all of them).
SHOWN_MARKERS = (
    "glue_capacity",
    "glue_dimension",
    "glue_radius",
    "glue_utility",
    "participation_ratio",
    "effective_rank",
    "nc1",
    "lid",
    "within_class_distance",
)


class ExampleParser(argparse.ArgumentParser):
    """The examples' common options: ``--fast``, ``--log-dir``, ``--epochs`` and ``--seed``.

    ``parse_args`` accepts path-like items in ``argv`` (``main(["--log-dir", tmp_path])``) and fills in
    ``epochs`` from ``fast_epochs`` or ``full_epochs`` when ``--epochs`` is not given.
    """

    def __init__(
        self,
        description: str,
        log_dir: str,
        full_epochs: int,
        fast_epochs: int,
        seed_help: str = "seeds data split, model and markers",
    ) -> None:
        super().__init__(description=description)
        self.full_epochs, self.fast_epochs = full_epochs, fast_epochs
        self.add_argument(
            "--fast", action="store_true", help="short run with reduced GLUE settings (a smoke test)"
        )
        self.add_argument("--log-dir", default=log_dir, help="TensorBoard root (default: %(default)s)")
        self.add_argument(
            "--epochs",
            type=int,
            default=None,
            help=f"epochs (default: {full_epochs}, or {fast_epochs} with --fast)",
        )
        self.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: %(default)s)")

    def parse_args(self, argv: Sequence[Any] | None = None) -> argparse.Namespace:  # type: ignore[override]
        args = super().parse_args(
            None if argv is None else [os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv]
        )
        if args.epochs is None:
            args.epochs = self.fast_epochs if args.fast else self.full_epochs
        return args


def monitor_settings(fast: bool) -> dict[str, Any]:
    """``GeometryMonitor`` arguments of a ``--fast`` run: fewer samples, class pairs and probes (the
    markers are noisier, and not comparable with a full run's); ``{}`` (the defaults) otherwise."""
    return dict(samples_per_class=30, n_pairs=10, n_t=50, lid_k=10) if fast else {}


def cpu_threads(threads: int = 1) -> AbstractContextManager[None]:
    """Run the block with ``threads`` intra-op threads, then restore the previous setting
    (``lightning_geomarkers.utilities.limit_threads``).

    A model this small gains nothing from more threads, and on a busy machine several threads contend
    (an epoch goes from ~0.3 s to several seconds); one thread also keeps run times reproducible.
    """
    return limit_threads(threads)


def digits_tensors(classes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(S, 1, 8, 8)`` float32 in [0, 1] and ``(S,)`` int64 labels.

    With ``classes`` only those digits are kept, relabelled ``0..k-1`` in the order given.
    """
    data = load_digits()
    x = np.asarray(data.images, dtype=np.float32) / _PIXEL_MAX
    y = np.asarray(data.target, dtype=np.int64)
    if classes is not None:
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
            raise ValueError(f"`classes` must be distinct digits in 0..9, got {classes}.")
        remap = np.full(10, -1, dtype=np.int64)
        remap[classes] = np.arange(len(classes))
        keep = remap[y] >= 0
        x, y = x[keep], remap[y[keep]]
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)


def digits_loaders(
    batch_size: int = 64,
    val_fraction: float = 0.2,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of the digits, split stratified by class (seeded).

    The train loader shuffles with its own seeded generator, so the batch order is reproducible; the
    validation loader does not shuffle and uses batches of 256.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
    x, y = digits_tensors(classes)
    train_idx, val_idx = train_test_split(
        np.arange(len(y)), test_size=val_fraction, random_state=seed, stratify=y.numpy()
    )
    train_idx, val_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))
    train = DataLoader(
        TensorDataset(x[train_idx], y[train_idx]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    val = DataLoader(TensorDataset(x[val_idx], y[val_idx]), batch_size=256, shuffle=False)
    return train, val


class DigitsClassifier(L.LightningModule):
    """Training/validation steps and optimizer of the examples' classifiers; subclasses define ``forward``.

    Logs ``train_loss`` (per epoch), ``val_loss`` and ``val_acc``. Every ``__init__`` argument of the
    subclass is saved as a hyperparameter (so ``load_from_checkpoint`` rebuilds the model).

    Args:
        optimizer: "adam", "adamw" or "sgd" (momentum 0.9).
        lr, weight_decay: optimizer settings (the weight decay can be changed mid-run through
            ``trainer.optimizers[0].param_groups``, as ``early_warning.py`` does).
    """

    def __init__(self, optimizer: str = "adam", lr: float = 3e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        if optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam', 'adamw' or 'sgd', got {optimizer!r}.")
        self.save_hyperparameters()  # collects the subclass's __init__ arguments too

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        return cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


class DigitsCNN(DigitsClassifier):
    """conv-ReLU-conv-ReLU-average pool-flatten-Linear classifier for ``(B, 1, 8, 8)`` images.

    The average pool keeps a ``pool_size x pool_size`` grid (a global pool, ``pool_size=1``, learns the
    digits several times slower: the 5 x 5 receptive field then loses where a stroke is).

    Args:
        num_classes: outputs of the head ``fc``.
        width: channels of the first conv (the second has ``2 * width``).
        pool_size: side of the pooled grid; the penultimate dimension is ``2 * width * pool_size**2``.
        optimizer, lr, weight_decay: see :class:`DigitsClassifier`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        pool_size: int = 2,
        optimizer: str = "adam",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(optimizer, lr, weight_decay)
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool_size),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width * pool_size**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def make_trainer(max_epochs: int, callbacks: Iterable[L.Callback], logger: Any, **kwargs: Any) -> L.Trainer:
    """A quiet, deterministic single-CPU ``Trainer`` (no progress bar, no model summary)."""
    options: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def checkpoint_epoch(path: str | os.PathLike[str]) -> int:
    """The (0-based) epoch stored in a Lightning checkpoint file."""
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def format_markers(values: Mapping[str, Any], names: Iterable[str] = SHOWN_MARKERS) -> str:
    """A two-column text table ``marker | value`` of the ``names`` present in ``values``."""
    names = [n for n in names if n in values]
    if not names:
        return "(no markers)"
    width = max(len(n) for n in names)
    rows = [f"  {'marker'.ljust(width)}  value", f"  {'-' * width}  ----------"]
    rows += [f"  {n.ljust(width)}  {float(values[n]):10.4f}" for n in names]
    return "\n".join(rows)
