"""Offline evaluation: the values a ``GeometryMonitor`` would log, for any model and data, without a Trainer.

:func:`evaluate_model` (what ``GeometryMonitor.evaluate`` calls) runs the model over a dataloader once,
captures the monitored layers with the monitor's own hooks, pooling, label extraction, sampling keys and
per-class sample, and computes the markers with the monitor's own ``compute_markers``. It works on a
*shadow copy* of the monitor (same settings, its own hooks, sample and warning dedupe), so evaluating
during a live fit leaves the live monitor's hooks, sample, history and alerts untouched.

Equality with the live values: the live monitor sees the batches of the validation loop, in eval mode,
after Lightning moved them to the device; offline the same happens (``model.eval()``, the
LightningModule's batch-transfer hooks, ``torch.no_grad()``), and the computation runs on the model's
device with the monitor's seed. So a checkpoint saved at an epoch and evaluated on the same validation
loader gives the values logged at that epoch (up to floating-point differences between devices).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection, move_data_to_device
from torch import nn
from torch.utils.data import DataLoader

from lightning_geomarkers.callbacks._labels import INPUT_KEYS, batch_inputs
from lightning_geomarkers.errors import MonitorWarning, error_reason
from lightning_geomarkers.functional.suite import MarkerReport

if TYPE_CHECKING:
    from lightning_geomarkers.callbacks.monitor import GeometryMonitor

__all__ = ["OfflineEvaluation", "evaluate_model", "model_device"]

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass
class OfflineEvaluation:
    """What :func:`evaluate_model` measured.

    Attributes:
        values: ``{logged key: value}``, the keys the monitor logs (``<prefix>/<marker>``, or
            ``<prefix>/<layer>/<marker>`` with several layers).
        reports: layer -> the :class:`~lightning_geomarkers.functional.MarkerReport` (with ``report.glue``).
        n_batches: batches run through the model.
        n_sampled: layer -> samples kept in the per-class sample.
        skipped: layer -> why that layer gave no value (the monitor would have warned and logged nothing).
    """

    values: dict[str, float] = field(default_factory=dict)
    reports: dict[str, MarkerReport] = field(default_factory=dict)
    n_batches: int = 0
    n_sampled: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model: ``LightningModule.device``, else that of its first parameter or buffer (CPU
    for a model with neither)."""
    if isinstance(model, L.LightningModule):
        return model.device
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _pick_loader(dataloader: Any, index: int) -> Iterable[Any]:
    """A single loader: ``dataloader`` itself, or entry ``index`` of a list/tuple/dict of DataLoaders."""
    if (
        isinstance(dataloader, (list, tuple))
        and dataloader
        and all(isinstance(d, DataLoader) for d in dataloader)
    ):
        if index >= len(dataloader):
            raise ValueError(
                f"The monitor watches dataloader_idx={index}, but {len(dataloader)} dataloaders were given; pass "
                "the loader it should measure, or a monitor with a valid `dataloader_idx`."
            )
        return dataloader[index]
    if (
        isinstance(dataloader, dict)
        and dataloader
        and all(isinstance(d, DataLoader) for d in dataloader.values())
    ):
        loaders = list(dataloader.values())
        if index >= len(loaders):
            raise ValueError(
                f"The monitor watches dataloader_idx={index}, but {len(loaders)} dataloaders were given."
            )
        return loaders[index]
    if isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable):
        raise TypeError(
            f"`dataloader` must be an iterable of batches (e.g. a torch DataLoader), got "
            f"{type(dataloader).__name__}. For a LightningDataModule pass `dm.val_dataloader()` after "
            "`dm.setup('validate')`."
        )
    return dataloader


def _default_forward(model: nn.Module, batch: Any) -> Any:
    inputs = batch_inputs(batch)
    if inputs is None:
        raise TypeError(
            f"Could not find the model inputs in a batch of type {type(batch).__name__}: expected batch[0] of a "
            f"tuple/list, a tensor under one of {list(INPUT_KEYS)} of a dict, or a bare tensor. Pass "
            "forward_fn=lambda model, batch: model(...) to run the model on such batches."
        )
    return model(inputs)


def _convert_input(model: nn.Module, batch: Any) -> Any:
    """The batch's floating-point tensors in the model's floating dtype where that is float64, float16 or
    bfloat16, as Lightning's ``64-true`` / ``16-true`` / ``bf16-true`` precision plugins convert every batch
    before the loop sees it (so the monitor captured, and keyed, converted inputs); unchanged for float32
    models (``32-true`` and the ``-mixed`` settings convert nothing)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype not in (torch.float64, torch.float16, torch.bfloat16):
        return batch
    return apply_to_collection(batch, torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _transfer(model: nn.Module, batch: Any, device: torch.device, dataloader_idx: int = 0) -> Any:
    """Move a batch to ``device`` as Lightning's loop would (a LightningModule's transfer hooks included,
    called with the monitored loader's ``dataloader_idx``)."""
    if isinstance(model, L.LightningModule):
        batch = model.on_before_batch_transfer(batch, dataloader_idx)
        batch = model.transfer_batch_to_device(batch, device, dataloader_idx)
        return model.on_after_batch_transfer(batch, dataloader_idx)
    return move_data_to_device(batch, device)


def _shadow(monitor: GeometryMonitor) -> GeometryMonitor:
    """A copy of the monitor with the same settings (and so the same code paths) but its own run and
    epoch state: private containers (hooks, samples, layer ids, warning dedupe sets, ...) are replaced
    by empty ones and the per-epoch scalars reset, so nothing it does reaches the original."""
    shadow = copy.copy(monitor)
    for name, value in vars(monitor).items():
        if name.startswith("_") and isinstance(value, (dict, list, set)):
            setattr(shadow, name, type(value)())
    shadow.history, shadow.alert_history, shadow.per_class_history = [], [], []
    shadow._capturing, shadow._position, shadow._loader_missing = False, 0, None
    shadow._num_classes, shadow._head_name = None, None
    return shadow


def evaluate_model(
    monitor: GeometryMonitor,
    model: nn.Module,
    dataloader: Any,
    *,
    forward_fn: ForwardFn | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> OfflineEvaluation:
    """Measure ``model`` on ``dataloader`` with exactly ``monitor``'s settings; see
    :meth:`GeometryMonitor.evaluate <lightning_geomarkers.GeometryMonitor.evaluate>`.

    Args:
        monitor: the configured monitor (only its settings are used; its state is not changed).
        model: any ``nn.Module``; its layers are resolved as the monitor resolves them (``layers=None``:
            the input of the last ``nn.Linear``).
        dataloader: an iterable of batches (or a list of DataLoaders: entry ``monitor.dataloader_idx``).
        forward_fn: ``forward_fn(model, batch)`` runs the model on a (device-moved) batch; default
            ``model(inputs)`` with the inputs found as the monitor finds them (``batch[0]``, ...). As in
            Lightning's ``64-true`` / ``bf16-true`` / ``16-true`` runs, a model whose parameters are
            float64, bfloat16 or float16 gets the batch's floating-point tensors in that dtype.
        device: where to run; default the model's device. The model is not moved: it must be there.
        progress: show a tqdm progress bar over the batches.

    Returns:
        :class:`OfflineEvaluation`.

    Raises:
        ValueError: a bad layer, an empty dataloader, or no value could be computed at all (the message
            gives each layer's reason).
        TypeError: batches whose inputs cannot be found (pass ``forward_fn``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"`forward_fn` must be callable (model, batch) -> output, got {forward_fn!r}.")
    loader = _pick_loader(dataloader, monitor.dataloader_idx)
    run_device = torch.device(device) if device is not None else model_device(model)
    forward = forward_fn or _default_forward

    shadow = _shadow(monitor)

    modes = {m: m.training for m in model.modules()}
    live_hooks = {name: hook.enabled for name, hook in monitor._hooks.items()}
    result = OfflineEvaluation()
    try:
        for hook in monitor._hooks.values():  # a live fit's hooks must not capture our forward passes
            hook.enabled = False
        shadow.setup(None, model, "validate")  # type: ignore[arg-type]  # resolves layers, raises on bad ones
        # A module that builds layers in configure_model()/setup() gets its resolution deferred by setup;
        # offline the model is as built as it will be: resolve now, raising on a bad layer.
        shadow._attach_deferred(None, model)  # type: ignore[arg-type]
        model.eval()
        batches: Iterable[Any] = loader
        if progress:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]

            batches = tqdm(loader, desc="batches", leave=False, unit="batch")
        with torch.no_grad():
            for batch_idx, raw in enumerate(batches):
                batch = _transfer(model, _convert_input(model, raw), run_device, monitor.dataloader_idx)
                for hook in shadow._hooks.values():
                    hook.clear()
                    hook.enabled = True
                shadow._arm(batch)
                try:
                    forward(model, batch)
                finally:
                    for hook in shadow._hooks.values():
                        hook.enabled = False
                shadow._capture_or_skip(
                    batch, None, f"GeometryMonitor.evaluate could not use batch {batch_idx}"
                )
                result.n_batches += 1
        if result.n_batches == 0:
            raise ValueError("The dataloader yielded no batch; pass a non-empty validation loader.")
        for name in shadow._hooks:
            try:
                report, n_kept = _compute(shadow, name, run_device)
            except Exception as err:
                if shadow.strict:
                    raise
                result.skipped[name] = error_reason(err)
                warnings.warn(
                    f"GeometryMonitor.evaluate skipped layer {name!r}: {error_reason(err)}",
                    MonitorWarning,
                    stacklevel=3,
                )
                continue
            result.reports[name] = report
            result.n_sampled[name] = n_kept
            for marker, value in report.values.items():
                result.values[shadow._key(name, marker)] = float(value)
    finally:
        shadow.remove_hooks()
        for module, training in modes.items():
            module.training = training
        for name, hook in monitor._hooks.items():
            if name in live_hooks:
                hook.enabled = live_hooks[name]
    if not result.values:
        reasons = "; ".join(f"{k}: {v}" for k, v in result.skipped.items()) or "every marker was skipped"
        raise ValueError(f"GeometryMonitor.evaluate computed no marker ({reasons}).")
    return result


def _compute(shadow: GeometryMonitor, name: str, device: torch.device) -> tuple[MarkerReport, int]:
    """One layer's report from the shadow's sample, through the monitor's own checks and compute path."""
    feats, labels = shadow._sample_for(
        name,
        shadow._hooks[name],
        shadow._samplers[name],
        where="on these batches",
        fix="Pass forward_fn= if the batches need a custom call, or `layers=` naming a module that runs.",
    )
    report = shadow.compute_markers(feats, labels, device=device, layer=name)
    return report, int(labels.numel())
