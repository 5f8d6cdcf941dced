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


_RANK_LOCAL_FAILURE = """
import json, sys, torch, lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_geomarkers import GeometryMonitor, MarkerAlert
from tests.lightning_helpers import TinyMLP, gaussian_classes, loaders

out = sys.argv[1]


class Flaky(GeometryMonitor):
    # The markers fail at epoch 1 on the rank that computes them (as a CUDA out-of-memory error on one GPU).
    def on_validation_epoch_start(self, trainer, pl_module):
        self.epoch_now = trainer.current_epoch
        super().on_validation_epoch_start(trainer, pl_module)

    def compute_markers(self, *args, **kwargs):
        self.computed_on = getattr(self, "computed_on", []) + [torch.distributed.get_rank()]
        if self.epoch_now == 1:
            raise RuntimeError("simulated failure on one rank")
        return super().compute_markers(*args, **kwargs)


class Dump(L.Callback):
    def __init__(self, monitor):
        self.monitor = monitor

    def on_fit_end(self, trainer, pl_module):
        m = self.monitor
        with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"history": m.history, "n_values": m.alerts[0].n_values,
                       "computed_on": getattr(m, "computed_on", [])}, f)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=30)
    train, val = loaders(x, y)
    monitor = Flaky(markers=["glue_dimension", "participation_ratio"], samples_per_class=10, n_t=20,
                    n_pairs=None, workers=1, alerts=[MarkerAlert("glue_dimension", relative_drop=0.5)])
    ckpt = ModelCheckpoint(monitor="geometry/glue_dimension", mode="max", save_top_k=2, dirpath=f"{out}/ck")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=3, logger=False,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out, callbacks=[monitor, ckpt, Dump(monitor)])
    trainer.fit(TinyMLP(), train, val)
"""


@pytest.mark.slow
def test_a_failure_on_the_computing_rank_is_shared_and_a_checkpoint_callback_does_not_hang(tmp_path):
    """Each rank used to compute the markers itself and to skip the layer alone when its computation
    failed: the ranks then disagreed on whether a value existed, and ModelCheckpoint's (or EarlyStopping's,
    MarkerCheckpoint's) collectives hung the run. Rank 0 computes now and every rank takes its outcome,
    values or failure: here every rank skips epoch 1, and nothing hangs (the run is a subprocess with a
    timeout, so a hang fails the test instead of the suite)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(_RANK_LOCAL_FAILURE)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the DDP run hung")
    assert proc.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for state in ranks:
        assert [h["epoch"] for h in state["history"]] == [0, 2]  # epoch 1 skipped on every rank
        assert state["n_values"] == 2
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["computed_on"] == [0, 0, 0] and ranks[1]["computed_on"] == []  # rank 0 alone computes
    assert "skipped layer 'fc' at epoch 1: simulated failure on one rank" in output
    # The markers are logged with sync_dist=False on purpose: Lightning's advice to sync them, once per key
    # and run, is silenced (only for this monitor's prefix).
    assert "It is recommended to use `self.log('geometry/" not in output


def test_zero_length_validation_loaders_on_several_devices_are_refused():
    """A process without validation batches skips the validation loop, and the others hung in the gather
    of the sample: refused at setup, naming the flag and the fix."""
    from types import SimpleNamespace

    monitor = GeometryMonitor()
    module = TinyMLP()
    module.allow_zero_length_dataloader_with_multiple_devices = True
    with pytest.raises(
        ValueError, match="allow_zero_length_dataloader_with_multiple_devices=True on several"
    ):
        monitor._check_distributed_setup(SimpleNamespace(world_size=2, datamodule=None), module)
    monitor._check_distributed_setup(
        SimpleNamespace(world_size=1, datamodule=None), module
    )  # one device: fine


class DictBatches(TinyMLP):
    """101 validation samples as dict batches whose inputs the monitor cannot find ("img"), so samples are
    keyed by position; Lightning's DistributedSampler pads the two shards to 51 + 51."""

    def val_dataloader(self):
        x, y = gaussian_classes(n_classes=5, per_class=40, seed=3)
        idx = torch.arange(101)
        data = [{"img": x[i], "label": y[i]} for i in idx.tolist()]
        return DataLoader(data, batch_size=16)

    def forward(self, batch):
        return super().forward(batch["img"] if isinstance(batch, dict) else batch)

    def validation_step(self, batch, batch_idx):
        self(batch)


def _label(batch):
    return batch["label"]


def validate_dicts(devices: int, tmp_path) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    monitor = GeometryMonitor(samples_per_class=15, n_t=40, n_pairs=None, lid_k=5, label_fn=_label)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    (results,) = trainer.validate(DictBatches())
    return {k: v for k, v in results.items() if k.startswith("geometry/")}


@pytest.mark.slow
def test_position_keys_under_distributed_sampler_equal_single_process(tmp_path):
    """Position keys were (rank, position in the shard): the sample depended on the sharding, and the
    DistributedSampler's padding copy of sample 0 was kept beside its original. Under Lightning's
    unshuffled DistributedSampler the keys are now the dataset indices: the markers equal one process's."""
    single = validate_dicts(1, tmp_path / "single")
    ddp = validate_dicts(2, tmp_path / "ddp")
    assert len(single) == 13 and set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
