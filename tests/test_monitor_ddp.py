"""Under DDP (2 CPU processes, gloo, ddp_spawn) the monitor's markers equal those of one process on the
same validation data, with uneven shards, a class missing on each rank, and subsampling in effect."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomarkers import GeometryMonitor
from tests.lightning_helpers import TinyMLP, gaussian_classes


class ShardedValidation(TinyMLP):
    """Validation data split by hand: rank 0 sees classes 0-3 (120 samples), rank 1 classes 1-4 (80
    samples); a single process sees the union."""

    def val_dataloader(self):
        x, y = gaussian_classes(n_classes=5, per_class=40, seed=3)
        if self.trainer.world_size == 1:
            idx = torch.arange(len(y))
        else:
            rank0 = torch.cat([torch.nonzero(y == c).flatten()[:30] for c in range(4)])
            rest = torch.tensor(sorted(set(range(len(y))) - set(rank0.tolist())))
            idx = rank0 if self.global_rank == 0 else rest
        assert self.trainer.world_size == 1 or (self.global_rank == 0) == (len(idx) == 120)
        return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=16)


def validate(strategy: str, devices: int, tmp_path) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    model = ShardedValidation()
    monitor = GeometryMonitor(samples_per_class=25, n_t=40, n_pairs=None, lid_k=10)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    (results,) = trainer.validate(model)
    return {k: v for k, v in results.items() if k.startswith("geometry/")}


@pytest.mark.slow
def test_ddp_markers_equal_single_process(tmp_path):
    single = validate("auto", 1, tmp_path / "single")
    ddp = validate("ddp_spawn", 2, tmp_path / "ddp")
    assert len(single) == 13 and set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
