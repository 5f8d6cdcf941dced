"""Small Lightning models and data shared by the callback tests (fast on 2 CPU cores)."""

from __future__ import annotations

import glob
import os
import socket

import lightning.pytorch as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def gaussian_classes(
    n_classes: int = 5, per_class: int = 40, dim: int = 16, seed: int = 0, spread: float = 1.0
):
    """(x, y): Gaussian class clouds around random means (float32 inputs, int64 labels)."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = means[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


class TinyMLP(L.LightningModule):
    """MLP with a penultimate layer of width `width`; from epoch `collapse_at` on, its features are
    projected onto a fixed 4-dimensional subspace (a deliberate collapse of the representation: GLUE
    dimension falls by more than half)."""

    def __init__(
        self,
        dim: int = 16,
        width: int = 32,
        n_classes: int = 5,
        lr: float = 1e-2,
        collapse_at: int | None = None,
    ):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.fc = nn.Linear(width, n_classes)
        self.lr = lr
        self.collapse_at = collapse_at
        basis, _ = torch.linalg.qr(torch.randn(width, 4, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("collapse", basis @ basis.T)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.collapse_at is not None and self.current_epoch >= self.collapse_at:
            h = h @ self.collapse
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        logits = self(x)
        if dataloader_idx == 0:
            self.log("val_acc", (logits.argmax(1) == y).float().mean(), add_dataloader_idx=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loaders(x, y, batch_size: int = 32, val=None):
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    vx, vy = val if val is not None else (x, y)
    return train, DataLoader(TensorDataset(vx, vy), batch_size=batch_size)


def trainer(tmp_path, callbacks, *, max_epochs: int = 2, logger: bool = True, **kwargs) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path, name="tb") if logger else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kwargs,
    )


def read_events(log_dir) -> EventAccumulator:
    files = glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event file under {log_dir}"
    acc = EventAccumulator(
        os.path.dirname(files[0]), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def penultimate(model: TinyMLP, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.features(x)


def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo process groups and local servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
