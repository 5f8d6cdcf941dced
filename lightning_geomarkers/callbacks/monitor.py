"""``GeometryMonitor``: live geometry markers of a layer's class manifolds in any Lightning run."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_geomarkers.callbacks._labels import batch_inputs, extract_labels
from lightning_geomarkers.callbacks._layers import (
    FeatureHook,
    check_pooling,
    find_classifier_head,
    resolve_layers,
)
from lightning_geomarkers.callbacks._sampling import PerClassSampler, sample_keys
from lightning_geomarkers.callbacks.alerts import AlertEvent, MarkerAlert
from lightning_geomarkers.errors import GeometryWarning, MonitorWarning
from lightning_geomarkers.functional.suite import GLUE_MARKER_NAMES, geometry_markers, resolve_marker_names
from lightning_geomarkers.utilities.checks import check_positive_int, check_seed

__all__ = ["GeometryMonitor"]

Layers = str | nn.Module | Sequence[str | nn.Module] | None


class GeometryMonitor(L.Callback):
    """Compute geometry markers of the penultimate layer's class manifolds at validation time.

    During each monitored validation epoch the callback captures the features of the hooked layer(s)
    (detached, pooled to (B, N)), keeps a bounded per-class subsample, and at the epoch's end computes
    the markers (GLUE capacity, dimension, radius, utility and alignments; participation ratio,
    numerical and effective rank, NC1, local intrinsic dimension, within-class distance) on the
    module's device. Every marker is logged with ``pl_module.log`` as ``<prefix>/<marker>`` (with several
    layers ``<prefix>/<layer>/<marker>``), so ``ModelCheckpoint``/``EarlyStopping`` can monitor it.

    Sampling is bottom-k by an exact hash of each input: per class the ``samples_per_class`` samples with
    the smallest seeded keys, from at most ``max_classes`` classes (a fixed, seeded subset). Memory is
    bounded whatever the validation set's length, the same samples are tracked epoch after epoch, and
    under DDP the union of the ranks' samples re-selects exactly what one process would keep.

    The monitor never crashes a run: problems (no labels, NaN features, too few classes, a layer that
    is never called, non-separable data) produce a ``MonitorWarning`` and that computation is skipped;
    already logged values are kept. Configuration errors (unknown layer name, unknown marker) raise at
    setup, before training starts.

    Args:
        layers: None (the input of the model's final ``nn.Linear``), a module name (its output;
            ``"name:input"`` for its input), a module, or a list of them.
        pooling: how to reduce conv maps / token sequences to (B, N): "auto" (mean over spatial dims or
            tokens), "mean", "cls" (token 0), "max", or a callable.
        label_fn: ``label_fn(batch) -> (B,) labels``; default ``batch[1]`` or a dict key among
            "label", "labels", "y", "target", "targets".
        markers: "all", "glue", or a list of names from ``lightning_geomarkers.functional.MARKERS``.
        samples_per_class: per-class sample kept each epoch (the GLUE protocols draw from it).
        max_classes: at most this many classes are monitored (a fixed, seeded subset).
        glue_protocol: "pairs" (the paper's: random class pairs, P = 2) or "joint" (all classes).
        points_per_class: GLUE points per class (default: ``samples_per_class``).
        n_pairs, n_t, dichotomies: GLUE protocol parameters. ``n_t`` defaults to 100 probes per pair
            (the paper used 200): probes are Monte-Carlo samples of the same expectations, so this halves
            the cost without changing what is estimated, and the fixed seed keeps epochs comparable.
        center_features, projection_dim: GLUE preprocessing (global centering; random projection of
            wider features).
        lid_k: neighbours of the local intrinsic dimension.
        every_n_epochs: compute on every n-th validation epoch.
        dataloader_idx: which validation dataloader to monitor.
        alerts: :class:`MarkerAlert` objects.
        seed: seeds sampling, GLUE probes and projections (fixed across epochs, so markers move only when
            the representation does).
        log_spectrum: with a ``TensorBoardLogger``, log the singular-value spectrum of the features as a
            histogram.
        custom_scalars: with a ``TensorBoardLogger``, write a custom-scalars layout grouping the markers.
        prefix: logging namespace.
        strict: raise instead of warning on data problems (for debugging a setup).

    Example::

        monitor = GeometryMonitor(alerts=[MarkerAlert("glue_dimension", relative_drop=0.2, patience=2)])
        trainer = L.Trainer(callbacks=[monitor, ModelCheckpoint(monitor="geometry/glue_dimension", mode="max")])
    """

    def __init__(
        self,
        layers: Layers = None,
        *,
        pooling: str | Callable[[Any], torch.Tensor] = "auto",
        label_fn: Callable[[Any], torch.Tensor] | None = None,
        markers: str | Iterable[str] = "all",
        samples_per_class: int = 50,
        max_classes: int | None = 100,
        glue_protocol: str = "pairs",
        points_per_class: int | None = None,
        n_pairs: int | None = 100,
        n_t: int = 100,
        dichotomies: str = "random",
        center_features: bool = True,
        projection_dim: int | None = 1000,
        lid_k: int = 20,
        every_n_epochs: int = 1,
        dataloader_idx: int = 0,
        alerts: Sequence[MarkerAlert] = (),
        seed: int = 0,
        log_spectrum: bool = True,
        custom_scalars: bool = True,
        prefix: str = "geometry",
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.pooling = check_pooling(pooling)
        if label_fn is not None and not callable(label_fn):
            raise TypeError(f"`label_fn` must be callable (batch -> labels), got {label_fn!r}.")
        self.label_fn = label_fn
        self.markers = resolve_marker_names(markers)
        self.samples_per_class = check_positive_int(samples_per_class, "samples_per_class", minimum=2)
        self.max_classes = (
            None if max_classes is None else check_positive_int(max_classes, "max_classes", minimum=2)
        )
        if glue_protocol not in ("pairs", "joint"):
            raise ValueError(f"`glue_protocol` must be 'pairs' or 'joint', got {glue_protocol!r}.")
        if points_per_class is not None:
            check_positive_int(points_per_class, "points_per_class", minimum=2)
        self.glue_kwargs = dict(
            glue_protocol=glue_protocol,
            points_per_class=points_per_class or self.samples_per_class,
            n_pairs=None if n_pairs is None else check_positive_int(n_pairs, "n_pairs"),
            n_t=check_positive_int(n_t, "n_t"),
            dichotomies=dichotomies,
            center_features=bool(center_features),
            projection_dim=None
            if projection_dim is None
            else check_positive_int(projection_dim, "projection_dim"),
            lid_k=check_positive_int(lid_k, "lid_k", minimum=2),
        )
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        self.dataloader_idx = check_positive_int(dataloader_idx, "dataloader_idx", minimum=0)
        alerts = list(alerts)
        for alert in alerts:
            if not isinstance(alert, MarkerAlert):
                raise TypeError(f"`alerts` must contain MarkerAlert objects, got {type(alert).__name__}.")
            if alert.marker.rsplit("/", 1)[-1] not in self.markers:
                raise ValueError(
                    f"Alert on {alert.marker!r} but that marker is not computed; add it to `markers` "
                    f"(currently {list(self.markers)})."
                )
        self.alerts = alerts
        self.seed = check_seed(seed)
        self.log_spectrum = bool(log_spectrum)
        self.custom_scalars = bool(custom_scalars)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("`prefix` must be a non-empty string such as 'geometry'.")
        self.prefix = prefix.rstrip("/")
        self.strict = bool(strict)

        self.history: list[dict[str, Any]] = []
        self.alert_history: list[dict[str, Any]] = []
        self.last_computed_step: int | None = None
        self._hooks: dict[str, FeatureHook] = {}
        self._samplers: dict[str, PerClassSampler] = {}
        self._num_classes: int | None = None
        self._capturing = False
        self._epoch_problems: set[str] = set()
        self._layout_written = False

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, layers=str(self.layers))

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "alert_history": [dict(a) for a in self.alert_history],
            "alerts": [a.state_dict() for a in self.alerts],
            "seed": self.seed,
            "last_computed_step": self.last_computed_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(
                f"GeometryMonitor resumed with seed={self.seed} but the checkpoint used seed={state_dict['seed']}: "
                "a different subsample and probes will be used, so markers may jump.",
                category=MonitorWarning,
            )
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.alert_history = [dict(a) for a in state_dict.get("alert_history", [])]
        self.last_computed_step = state_dict.get("last_computed_step")
        saved = state_dict.get("alerts", [])
        if len(saved) == len(self.alerts):
            for alert, st in zip(self.alerts, saved, strict=True):
                alert.load_state_dict(st)
        elif saved:
            rank_zero_warn(
                "GeometryMonitor: the checkpoint holds state for a different set of alerts; alerts start afresh.",
                category=MonitorWarning,
            )

    # ------------------------------------------------------------------ set-up and tear-down
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hooks:
            return
        resolved = resolve_layers(pl_module, self.layers)  # raises, listing names, on a bad layer
        if self.layers is None:
            self._num_classes = find_classifier_head(pl_module)[1].out_features
        for name, (module, where) in resolved.items():
            self._hooks[name] = FeatureHook(module, where, self.pooling, name=name, strict=self.strict)
            self._samplers[name] = PerClassSampler(self.samples_per_class, self.max_classes, self.seed)
        for alert in self.alerts:
            if "/" in alert.marker and alert.marker.rsplit("/", 1)[0] not in self._hooks:
                raise ValueError(
                    f"Alert on {alert.marker!r} names a layer that is not monitored; monitored layers: "
                    f"{list(self._hooks)}."
                )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.remove_hooks()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Detach every forward hook from the model (idempotent; done automatically at teardown)."""
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        self._samplers.clear()
        self._capturing = False

    # ------------------------------------------------------------------ capture
    def _due(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._capturing = bool(self._hooks) and self._due(trainer)
        self._epoch_problems = set()
        if self._capturing:
            for name, hook in self._hooks.items():
                hook.clear()
                hook.enabled = False
                self._samplers[name].reset()

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        on = self._capturing and dataloader_idx == self.dataloader_idx
        for hook in self._hooks.values():
            hook.enabled = on

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._capturing or dataloader_idx != self.dataloader_idx:
            return
        for hook in self._hooks.values():
            hook.enabled = False
        try:
            self._capture_batch(batch)
        except Exception as err:
            if self.strict:
                raise
            self._problem(
                f"capture:{type(err).__name__}",
                f"GeometryMonitor could not use validation batch {batch_idx} and skipped it: {err}",
            )

    def _capture_batch(self, batch: Any) -> None:
        labels = extract_labels(batch, self.label_fn)
        inputs = batch_inputs(batch)
        keep = labels >= 0
        if self._num_classes is not None:
            keep &= labels < self._num_classes
        if not bool(keep.all()):
            bad = labels[~keep].unique().tolist()[:10]
            self._problem(
                "labels-range",
                f"GeometryMonitor ignored samples with labels {bad} outside the class range "
                f"[0, {self._num_classes}) (e.g. an ignore index)."
                if self._num_classes is not None
                else f"GeometryMonitor ignored samples with negative labels {bad} (e.g. an ignore index).",
            )
        for name, hook in self._hooks.items():
            feats = hook.pop()
            if feats is None:
                continue
            if feats.shape[0] != labels.shape[0]:
                self._problem(
                    f"rows:{name}",
                    f"GeometryMonitor: layer {name!r} produced {feats.shape[0]} feature rows for a batch of "
                    f"{labels.shape[0]} labels (called several times per step?); those batches are skipped. "
                    "Monitor a layer that runs once per sample, or pass `label_fn`.",
                )
                continue
            content = inputs if inputs is not None and inputs.shape[0] == feats.shape[0] else feats
            keys = sample_keys(content[keep.to(content.device)], labels[keep], self.seed)
            self._samplers[name].update(feats[keep.to(feats.device)], labels[keep], keys)

    # ------------------------------------------------------------------ compute and log
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._hooks:
            return
        if not self._capturing:
            self._log_missing(trainer)
            return
        self._capturing = False
        for hook in self._hooks.values():
            hook.enabled = False
        distributed = (
            trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        )
        epoch, step = trainer.current_epoch, self._log_step(trainer)
        fired: list[AlertEvent] = []
        computed_any = False
        for name, hook in self._hooks.items():
            sampler = self._samplers[name]
            if distributed:  # collective: every rank takes part, whatever happened locally
                sampler.sync(gather_all_tensors, device=pl_module.device)
            try:
                values = self._compute_layer(name, hook, sampler, pl_module, trainer)
            except Exception as err:
                if self.strict:
                    raise
                self._problem(
                    f"compute:{name}", f"GeometryMonitor skipped layer {name!r} at epoch {epoch}: {err}"
                )
                values = {}
            if values:
                computed_any = True
                self.history.append({"epoch": epoch, "step": step, "layer": name, **values})
            fired += self._run_alerts(name, values, epoch, step, pl_module)
        self._log_missing(trainer)
        if computed_any:
            self.last_computed_step = trainer.global_step
        if any(a.action == "stop" for a in self.alerts):
            stop = any(e.action == "stop" for e in fired)
            if trainer.strategy.reduce_boolean_decision(stop, all=False):
                trainer.should_stop = True
                rank_zero_info(f"GeometryMonitor: stopping training at epoch {epoch} on a geometry alert.")

    def _key(self, layer: str, marker: str) -> str:
        return f"{self.prefix}/{marker}" if len(self._hooks) == 1 else f"{self.prefix}/{layer}/{marker}"

    @staticmethod
    def _log_step(trainer: L.Trainer) -> int:
        """The step Lightning writes epoch-level scalars at (batches that stepped the optimizer), so the
        histogram, the history and alert messages line up with the scalar charts."""
        return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))

    def _log_missing(self, trainer: L.Trainer) -> None:
        """Make every marker key exist in ``trainer.callback_metrics`` before its first value.

        A ``ModelCheckpoint``/``EarlyStopping`` monitoring a marker raises when its key is missing, which
        happens before the first computation (``every_n_epochs > 1``, or a first computation skipped on
        bad data). Such keys get NaN, which ``ModelCheckpoint`` ranks last; it is not sent to the loggers.
        Once logged, Lightning keeps a key's latest value there by itself on epochs without a fresh one.
        """
        metrics = trainer.callback_metrics  # Lightning's persistent dict, read by ModelCheckpoint
        for layer in self._hooks:
            for marker in self.markers:
                metrics.setdefault(self._key(layer, marker), torch.tensor(math.nan))

    def _compute_layer(
        self,
        name: str,
        hook: FeatureHook,
        sampler: PerClassSampler,
        pl_module: L.LightningModule,
        trainer: L.Trainer,
    ) -> dict[str, float]:
        feats, labels, _ = sampler.state()
        if sampler.num_stored == 0:
            if hook.calls == 0 and hook.error is None:
                raise RuntimeError(
                    f"layer {name!r} was never called during validation (is it used in forward()?), so no "
                    "features were captured. Pass `layers=` naming a module that runs in validation_step."
                )
            raise RuntimeError("no labelled features were captured this epoch (see the previous warnings).")
        if not bool(torch.isfinite(feats).all()):
            raise RuntimeError(
                "the captured features contain NaN/Inf (diverging training?); no marker is logged for this "
                "epoch, earlier values are kept."
            )
        classes, counts = labels.unique(return_counts=True)
        small = classes[counts < 2]
        if small.numel():
            self._problem(
                f"small:{name}",
                f"GeometryMonitor: classes {small.tolist()[:10]} had fewer than 2 validation samples and are left "
                "out of the markers.",
            )
            keep = ~torch.isin(labels, small)
            feats, labels = feats[keep.to(feats.device)], labels[keep]
        if labels.unique().numel() < 2:
            raise RuntimeError(
                f"only {labels.unique().numel()} class with at least 2 samples was seen; geometry markers need "
                "at least 2 classes. Check the labels or validate on more data."
            )
        feats = feats.to(pl_module.device)
        labels = labels.to(pl_module.device)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = geometry_markers(
                feats,
                labels,
                markers=self.markers,
                generator=self.seed,
                strict=False,
                return_spectrum=self.log_spectrum and self._tensorboard(trainer) is not None,
                **self.glue_kwargs,
            )

        for w in caught:  # re-issue the solver's warnings once per epoch, with context
            self._problem(
                f"solver:{name}:{w.category.__name__}",
                f"GeometryMonitor, layer {name!r}: {w.message}",
                w.category,
            )
        for marker, reason in report.skipped.items():
            hint = " Use fewer points per class (`points_per_class`)." if "separab" in reason else ""
            self._problem(
                f"skip:{name}:{marker}",
                f"GeometryMonitor skipped {marker} for layer {name!r}: {reason}.{hint}",
            )
        values = {m: float(v) for m, v in report.values.items()}
        for marker, value in values.items():
            pl_module.log(self._key(name, marker), value, on_epoch=True, on_step=False, sync_dist=False)
        self._log_tensorboard(trainer, name, report.spectrum, values)
        return values

    def _run_alerts(
        self, layer: str, values: dict[str, float], epoch: int, step: int, pl_module: L.LightningModule
    ) -> list[AlertEvent]:
        fired = []
        for alert in self.alerts:
            a_layer, _, marker = alert.marker.rpartition("/")
            if a_layer and a_layer != layer:
                continue
            if not a_layer and len(self._hooks) > 1 and layer != next(iter(self._hooks)):
                continue  # an unqualified alert watches the first layer
            if marker not in values:
                continue
            event = alert.update(values[marker], epoch=epoch, step=step)
            pl_module.log(
                f"{self.prefix}/alert/{alert.marker}", float(event is not None), on_epoch=True, on_step=False
            )
            if event is None:
                continue
            fired.append(event)
            self.alert_history.append(event.to_dict())
            if callable(alert.action):
                try:
                    alert.action(event)
                except Exception as err:
                    self._problem(
                        f"action:{alert.marker}", f"GeometryMonitor: the alert action raised {err!r}."
                    )
            else:
                rank_zero_warn(event.message, category=GeometryWarning)
        return fired

    # ------------------------------------------------------------------ TensorBoard extras
    def _tensorboard(self, trainer: L.Trainer) -> Any | None:
        if not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _log_tensorboard(
        self, trainer: L.Trainer, layer: str, spectrum: torch.Tensor | None, values: dict[str, float]
    ) -> None:
        writer = self._tensorboard(trainer)
        if writer is None:
            return
        if self.log_spectrum and spectrum is not None:  # the markers' own decomposition, shared
            spectrum = spectrum.cpu()
            tag = (
                f"{self.prefix}/feature_spectrum"
                if len(self._hooks) == 1
                else f"{self.prefix}/{layer}/feature_spectrum"
            )
            writer.add_histogram(tag, spectrum, self._log_step(trainer))
        if self.custom_scalars and not self._layout_written:
            writer.add_custom_scalars(self._layout())
            self._layout_written = True

    def _layout(self) -> dict[str, dict[str, list[Any]]]:
        groups = {
            "GLUE geometry": [m for m in self.markers if m in GLUE_MARKER_NAMES and "alignment" not in m],
            "GLUE alignments": [m for m in self.markers if m in GLUE_MARKER_NAMES and "alignment" in m],
            "Spectrum": [
                m for m in self.markers if m in ("participation_ratio", "numerical_rank", "effective_rank")
            ],
            "Collapse and intrinsic dimension": [
                m for m in self.markers if m in ("nc1", "lid", "lid_twonn", "within_class_distance")
            ],
        }
        layout: dict[str, dict[str, list[Any]]] = {}
        for layer in self._hooks:
            charts = {
                title: ["Multiline", [self._key(layer, m) for m in names]]
                for title, names in groups.items()
                if names
            }
            layout[f"{self.prefix} {layer}" if len(self._hooks) > 1 else self.prefix] = charts
        if self.alerts:
            layout[f"{self.prefix} alerts"] = {
                "alerts": ["Multiline", [f"{self.prefix}/alert/{a.marker}" for a in self.alerts]]
            }
        return layout

    # ------------------------------------------------------------------ messages
    def _problem(self, key: str, message: str, category: type[Warning] = MonitorWarning) -> None:
        """Warn once per epoch and problem kind (a 1000-batch epoch must not print 1000 warnings)."""
        if key in self._epoch_problems:
            return
        self._epoch_problems.add(key)
        rank_zero_warn(message, category=category)
