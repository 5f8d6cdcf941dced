"""``GeometryMonitor``: live geometry markers of a layer's class manifolds in any Lightning run."""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler

from lightning_geomarkers.callbacks._heatmap import class_view, write_class_heatmap
from lightning_geomarkers.callbacks._labels import batch_inputs, extract_labels, find_inputs
from lightning_geomarkers.callbacks._layers import (
    FeatureHook,
    builds_layers_later,
    check_pooling,
    find_classifier_head,
    metric_name,
    resolve_layers,
)
from lightning_geomarkers.callbacks.alerts import AlertEvent, MarkerAlert
from lightning_geomarkers.callbacks.checkpoint import MarkerCheckpoint
from lightning_geomarkers.callbacks.offline import ForwardFn, evaluate_model
from lightning_geomarkers.errors import GeometryWarning, MonitorWarning, error_reason
from lightning_geomarkers.functional.suite import (
    GLUE_MARKER_NAMES,
    MARKERS,
    MarkerReport,
    geometry_markers,
    resolve_marker_names,
)
from lightning_geomarkers.metrics.sample import PerClassSample, sample_keys
from lightning_geomarkers.utilities.checks import all_finite, check_positive_int, check_protocol, check_seed

__all__ = ["GeometryMonitor"]

Layers = str | nn.Module | Sequence[str | nn.Module] | None
_SIGN = {True: "higher", False: "lower", None: "sign varies"}


#: Attribute of a TensorBoard writer holding each monitor's custom-scalars layout (by prefix), merged.
_LAYOUTS_ATTR = "_lightning_geomarkers_layouts"


def _exact(key: str) -> str:
    """A custom-scalars chart tag for exactly ``key``: TensorBoard reads chart tags as regular expressions
    matched at the start, so ``geometry/lid`` would also draw ``geometry/lid_twonn`` and
    ``geometry/glue_dimension`` its ``_se``, and a prefix such as ``geo(val)`` would match nothing."""
    return re.escape(key) + "$"


def _stops(alert: MarkerAlert) -> bool:
    """Whether the alert's action is the built-in ``"stop"`` (not a callable, whatever its name)."""
    return isinstance(alert.action, str) and alert.action == "stop"


class GeometryMonitor(L.Callback):
    """Compute geometry markers of the penultimate layer's class manifolds at validation time.

    During each monitored validation epoch the callback captures the features of the hooked layer(s)
    (detached, pooled to (B, N)), keeps a bounded per-class subsample, and at the epoch's end computes
    the markers (GLUE capacity, dimension, radius, utility and alignments; participation ratio,
    numerical and effective rank, NC1, local intrinsic dimension, within-class distance) on the
    module's device. Every marker is logged with ``pl_module.log`` as ``<prefix>/<marker>`` (with several
    layers ``<prefix>/<layer>/<marker>``), so ``ModelCheckpoint``/``EarlyStopping`` can monitor it.

    Sampling is bottom-k by an exact hash of each input (or of its position in the validation loader
    when the inputs are not found; see ``input_fn``): per class the ``samples_per_class`` samples with
    the smallest seeded keys, from at most ``max_classes`` classes (a fixed, seeded subset). Memory is
    bounded whatever the validation set's length, the same samples are tracked epoch after epoch, and
    under DDP the union of the ranks' samples re-selects exactly what one process would keep.

    The monitor never crashes a run: problems (no labels, NaN features, too few classes, a layer that
    is never called, non-separable data) produce a ``MonitorWarning`` and that computation is skipped;
    already logged values are kept. Configuration errors (unknown or ambiguous layer, unknown marker,
    keys that another monitor also logs, a strict ``EarlyStopping`` on a marker) raise at construction or
    setup, before training starts. At a validation without a fresh value, a marker key that a callback
    monitors is ``None`` in ``trainer.callback_metrics`` (others are removed): never a placeholder or
    an earlier epoch's value. Each ``fit`` starts with an empty history and fresh alerts (a resume then
    loads the checkpoint's).

    Args:
        layers: None (the input of the model's final ``nn.Linear``), a module name (its output;
            ``"name:input"`` for its input), a module, or a list of them.
        pooling: how to reduce conv maps / token sequences to (B, N): "auto" (mean over spatial dims or
            tokens), "mean", "cls" (token 0), "max", or a callable.
        label_fn: ``label_fn(batch) -> (B,) labels``; default ``batch[1]`` or a dict key among
            "label", "labels", "y", "target", "targets".
        input_fn: ``input_fn(batch) -> (B, ...) tensor`` identifying each sample (its raw input), whose
            bytes key the sampling; default ``batch[0]`` or a dict key among "x", "input", "inputs",
            "image", "images", "input_ids", "pixel_values". When no input is found, samples are keyed
            by their position in the validation loader (stable only without shuffling; a warning says
            so once). Never keyed on the features, which change with the weights.
        markers: "all", "glue", or a list of names from ``lightning_geomarkers.functional.MARKERS``.
        samples_per_class: per-class sample kept each epoch (the GLUE protocols draw from it).
        max_classes: at most this many classes are monitored (a fixed, seeded subset).
        glue_protocol: "pairs" (the paper's: random class pairs, P = 2) or "joint" (all classes, at most
            floor(2 N / M) of them: beyond that a warned, fixed seeded subset, see ``geometry_markers``).
        points_per_class: GLUE points per class (default: ``samples_per_class``).
        n_pairs, n_t, dichotomies: GLUE protocol parameters. ``n_t`` defaults to 100 probes per pair
            (the paper used 200): probes are Monte-Carlo samples of the same expectations, so this halves
            the cost without changing what is estimated, and the fixed seed keeps epochs comparable.
        center_features, projection_dim: GLUE preprocessing (global centering; random projection of
            wider features).
        lid_k: neighbours of the local intrinsic dimension.
        every_n_epochs: compute at validations that end a training epoch ``e`` with
            ``(e + 1) % every_n_epochs == 0`` (epochs counted from 0). ``trainer.validate`` always computes.
            With ``check_val_every_n_epoch`` > 1 choose a multiple or a divisor of it (every validation
            then computes, or every k-th; a warning at setup otherwise).
        dataloader_idx: which validation dataloader to monitor.
        alerts: :class:`MarkerAlert` objects.
        seed: seeds sampling, GLUE probes and projections (fixed across epochs, so markers move only when
            the representation does).
        log_spectrum: with a ``TensorBoardLogger``, log the singular-value spectrum of the features as a
            histogram.
        custom_scalars: with a ``TensorBoardLogger``, write a custom-scalars layout (one chart per marker)
            and a text table describing the markers.
        log_class_heatmap: with a ``TensorBoardLogger`` and the pairs protocol, write a class-by-class heat
            map of pairwise GLUE capacity as an image at each computation (up to 50 monitored classes).
            Per-class values go to :attr:`per_class_history` either way (pairs protocol only).
        prefix: logging namespace. Two monitors must not log the same keys (refused at setup).
        log_standard_errors: also log ``<prefix>/<marker>_se``, the standard error of each GLUE marker
            (they are always in :attr:`history` when the markers report one).
        strict: raise instead of warning on data problems (for debugging a setup).
        num_threads: torch intra-op threads while the markers are computed (restored afterwards); ``None``
            keeps the process setting. Default 1: on a CPU shared with DataLoader workers or other jobs the
            many small solver ops and the large decompositions ran 3-13x slower at 2 threads than at 1
            (see docs/performance.md). On a GPU it only affects the little CPU work.
        workers: on CPU, threads computing the markers concurrently (see ``geometry_markers``), each with
            ``num_threads`` intra-op threads: LID beside the spectrum, then GLUE's projection and chunks
            of pairs on both. The values are identical for every setting. Default 2: on the 2-core test
            machine the 1000-class epoch of ``benchmarks/bench_monitor.py`` took 2.0-3.0 s (median 2.2 s)
            instead of 3.7-4.6 s at 1 (1.24-1.81x side by side; 4.3-4.6 s instead of 5.8-6.6 s with two
            busy processes on the cores, where ``num_threads=2`` had taken 12 s against 5.0 s), for 50-100 MB
            more peak memory, and the digits head 0.21-0.24 s instead of 0.29-0.33 s (docs/performance.md). Capped
            at the CPUs available to the process. ``1`` keeps the markers on one core and the peak
            lower.

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
        input_fn: Callable[[Any], torch.Tensor] | None = None,
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
        log_class_heatmap: bool = True,
        prefix: str = "geometry",
        log_standard_errors: bool = False,
        strict: bool = False,
        num_threads: int | None = 1,
        workers: int = 2,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.pooling = check_pooling(pooling)
        if label_fn is not None and not callable(label_fn):
            raise TypeError(f"`label_fn` must be callable (batch -> labels), got {label_fn!r}.")
        self.label_fn = label_fn
        if input_fn is not None and not callable(input_fn):
            raise TypeError(f"`input_fn` must be callable (batch -> inputs tensor), got {input_fn!r}.")
        self.input_fn = input_fn
        self.markers = resolve_marker_names(markers)
        self.samples_per_class = check_positive_int(samples_per_class, "samples_per_class", minimum=2)
        self.max_classes = (
            None if max_classes is None else check_positive_int(max_classes, "max_classes", minimum=2)
        )
        self.glue_kwargs = check_protocol(
            glue_protocol,
            points_per_class=self.samples_per_class if points_per_class is None else points_per_class,
            n_pairs=n_pairs,
            n_t=n_t,
            dichotomies=dichotomies,
            center_features=center_features,
            projection_dim=projection_dim,
            lid_k=lid_k,
        )
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        self.dataloader_idx = check_positive_int(dataloader_idx, "dataloader_idx", minimum=0)
        alerts = list(alerts)
        for alert in alerts:
            if not isinstance(alert, MarkerAlert):
                raise TypeError(f"`alerts` must contain MarkerAlert objects, got {type(alert).__name__}.")
            if alert.marker.rsplit("/", 1)[-1] not in self.markers:  # "<prefix>/<layer>/<marker>" too
                raise ValueError(
                    f"Alert on {alert.marker!r} but that marker is not computed; add it to `markers` "
                    f"(currently {list(self.markers)})."
                )
        if len({id(a) for a in alerts}) < len(alerts):
            raise ValueError(
                "The same MarkerAlert object is given twice in `alerts`: it would see every value twice. "
                "Create one MarkerAlert per alert."
            )
        self.alerts = alerts
        self.seed = check_seed(seed)
        self.log_spectrum = bool(log_spectrum)
        self.custom_scalars = bool(custom_scalars)
        self.log_class_heatmap = bool(log_class_heatmap)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("`prefix` must be a non-empty string such as 'geometry'.")
        self.prefix = prefix.rstrip("/")
        self.log_standard_errors = bool(log_standard_errors)
        self.strict = bool(strict)
        self.num_threads = None if num_threads is None else check_positive_int(num_threads, "num_threads")
        self.workers = check_positive_int(workers, "workers")

        self.history: list[dict[str, Any]] = []
        self.alert_history: list[dict[str, Any]] = []
        #: Pairs protocol: one ``{"epoch", "step", "layer", "per_class": {class_id: {...}}}`` per computation.
        self.per_class_history: list[dict[str, Any]] = []
        self.last_computed_step: int | None = None
        self._computed_at: list[tuple[int, int, int]] = []  # (epoch, global_step, logged step) in fit
        self._hooks: dict[str, FeatureHook] = {}
        self._samplers: dict[str, PerClassSample] = {}
        self._layer_ids: dict[str, str] = {}  # display name -> "<module name>:<input|output>"
        self._alert_targets: list[tuple[str, str]] = []  # (layer display name, marker) per alert
        self._num_classes: int | None = None
        self._head_name: str | None = None
        self._capturing = False
        self._loader_missing: str | None = None
        self._position = 0  # samples seen so far in this epoch's monitored loader (position keys)
        self._epoch_problems: set[str] = set()
        self._run_warnings: set[str] = set()
        self._layout_written = False
        self._deferred: str | None = None  # the setup stage whose layer resolution waits for the model
        self._deferred_module: nn.Module | None = None  # the module it waits for (for state_key meanwhile)
        # Marker values logged at this validation (compared with what Lightning reports at its end).
        self._logged_now: dict[str, float] = {}
        # (batch, labels) extracted at the batch's start, for its end (see _arm).
        self._armed: tuple[Any, torch.Tensor] | None = None
        # What a restored checkpoint's alert state lacked or had in excess, said at the next fit's start.
        self._restore_note: str | None = None
        # (epoch, step) of the checkpoint whose weights trainer.validate(ckpt_path=...) measures, and
        # whether the checkpoint being loaded is loaded for fit (set by on_load_checkpoint).
        self._weights_from: tuple[int, int] | None = None
        self._loading_for_fit = True

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        """Identifies this monitor's state in a checkpoint: its prefix and the *resolved* layers once set
        up (``layers=None`` and ``layers="fc:input"`` watching the same input share one key), the
        ``layers`` argument before."""
        ids = self._layer_ids
        if not ids and self._deferred_module is not None:  # resolution waits for configure_model()
            try:  # Lightning compares keys when restoring, before on_load_checkpoint: the layers exist then
                ids = self._layer_id_map(self._deferred_module)
            except Exception:
                ids = {}
        if ids:
            return self._generate_state_key(prefix=self.prefix, layers=sorted(ids.values()))
        return self._generate_state_key(prefix=self.prefix, layers=str(self.layers))

    @property
    def _legacy_state_key(self) -> Any:  # Lightning's fallback key when loading a checkpoint
        """The key of checkpoints written before ``state_key`` used the resolved layers (``prefix`` and
        ``str(layers)``), so they still restore."""
        return self._generate_state_key(prefix=self.prefix, layers=str(self.layers))

    def value_settings(self) -> dict[str, Any]:
        """The settings that decide the logged values besides ``seed`` and the model: which rows are kept
        (``samples_per_class``, ``max_classes``), the layers and pooling, and the GLUE and LID protocol.
        Kept in the monitor's checkpoint state, so that a later measurement (``lightning-geomarkers rank``)
        can tell whether it reproduces the logged values.

        Example:
            >>> GeometryMonitor().value_settings()["n_t"]
            100
        """
        layers: Any
        if self.layers is None or isinstance(self.layers, str):
            layers = self.layers
        elif isinstance(self.layers, (list, tuple)):
            layers = [x if isinstance(x, str) else "module" for x in self.layers]
            if len(layers) == 1:  # layers=["fc"] logs the same keys and values as layers="fc"
                layers = layers[0]
        else:
            layers = "module"
        # glue_kwargs["max_classes"] is GLUE's own class cap (None: GLUE uses every sampled class); the
        # sample's max_classes is what caps the classes.
        glue = {k: v for k, v in self.glue_kwargs.items() if k != "max_classes"}
        return {
            "layers": layers,
            # The watched layers as resolved on the model ("<module>:<input|output>"; None before set-up):
            # layers=None and layers="fc:input" watch the same layer.
            "layer_ids": sorted(self._layer_ids.values()) or None,
            "pooling": self.pooling if isinstance(self.pooling, str) else "callable",
            "samples_per_class": self.samples_per_class,
            "max_classes": self.max_classes,
            **glue,
        }

    def settings_differences(
        self, logged: Mapping[str, Any] | None, model: nn.Module | None = None
    ) -> list[tuple[str, Any, Any]]:
        """``(name, logged value, value here)`` for every :meth:`value_settings` entry that differs from
        ``logged`` (the ``"settings"`` a checkpoint of a monitor holds); none without a record. The layers
        are compared as resolved (``layer_ids``) where both sides know them (this monitor once set up, or
        resolved on ``model``), so ``layers=None`` and ``layers="fc:input"`` do not differ; as spelt
        otherwise.

        Example:
            >>> GeometryMonitor(n_t=50).settings_differences(GeometryMonitor().value_settings())
            [('n_t', 100, 50)]
        """
        if logged is None:
            return []

        def same(a: Any, b: Any) -> bool:  # explicit dichotomies are tensors
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                return (
                    isinstance(a, torch.Tensor)
                    and isinstance(b, torch.Tensor)
                    and torch.equal(a.cpu(), b.cpu())
                )
            return bool(a == b)

        here = self.value_settings()
        if here["layer_ids"] is None and model is not None:
            try:
                here["layer_ids"] = sorted(self._layer_id_map(model).values())
            except Exception:  # a layer the model lacks: evaluating it says so
                pass
        if logged.get("layer_ids") is not None and here["layer_ids"] is not None:
            del here["layers"]  # the resolved layers decide
        else:
            del here["layer_ids"]
        return [(k, logged[k], v) for k, v in here.items() if k in logged and not same(logged[k], v)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "alert_history": [dict(a) for a in self.alert_history],
            "per_class_history": [dict(h) for h in self.per_class_history],
            "alerts": [a.state_dict() for a in self.alerts],
            "seed": self.seed,
            "settings": self.value_settings(),
            "last_computed_step": self.last_computed_step,
            # (epoch, global_step, logged step) of each computation: a checkpoint's weights are then
            # matched to the step their markers were logged at (trainer.validate(ckpt_path=...)).
            "computed_at": [list(c) for c in self._computed_at],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._loading_for_fit and (self.history or self.alert_history or self.per_class_history):
            # trainer.validate/test(ckpt_path=...) after a fit: Lightning restores the callbacks too, but
            # this monitor's own record runs further than the checkpoint's (written during that fit).
            return
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(
                f"GeometryMonitor resumed with seed={self.seed} but the checkpoint used seed={state_dict['seed']}: "
                "a different subsample and probes will be used, so markers may jump.",
                category=MonitorWarning,
            )
        differ = self.settings_differences(state_dict.get("settings"))
        if differ:
            listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in differ)
            rank_zero_warn(
                f"GeometryMonitor resumed with other value settings than the checkpoint's ({listed}): the "
                "markers measure something else from here on, so the alerts start afresh instead of comparing "
                "with values of the old settings; the history keeps the earlier values. Resume with the "
                "checkpoint's settings to continue the same series."
                if self._loading_for_fit
                else f"GeometryMonitor measures with other value settings than the checkpoint's monitor "
                f"({listed}): its values are not comparable with the ones logged during training.",
                category=MonitorWarning,
            )
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.alert_history = [dict(a) for a in state_dict.get("alert_history", [])]
        self.per_class_history = [dict(h) for h in state_dict.get("per_class_history", [])]
        self.last_computed_step = state_dict.get("last_computed_step")
        self._computed_at = [tuple(c) for c in state_dict.get("computed_at", [])]
        # Alerts are matched to saved state by marker (in order among alerts on the same marker), never
        # by position: adding or reordering alerts must not hand one alert another's best value.
        saved: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for st in state_dict.get("alerts", []):
            saved[self._normalise_alert_name(str(st.get("marker")))].append(st)
        fresh = []
        for alert in self.alerts:
            queue = saved.get(self._normalise_alert_name(alert.marker))
            if differ:  # said above; the saved state is dropped
                alert.reset()
                if queue:
                    queue.pop(0)
            elif queue:
                alert.load_state_dict({**queue.pop(0), "marker": alert.marker})
            else:
                fresh.append(alert.marker)
        left = [m for m, q in saved.items() for _ in q]
        parts = [f"no alert state for {fresh} (they start afresh)"] if fresh else []
        parts += [f"state for alerts no longer configured: {left} (ignored)"] if left else []
        # Said when a fit starts (on_fit_start): alerts move during fit only, so a trainer.validate()
        # restoring the same checkpoint has nothing to be told.
        self._restore_note = (
            "GeometryMonitor: the checkpoint holds " + " and ".join(parts) + "." if parts else None
        )

    def _alert_key(self, marker: str) -> str:
        """The key an alert on ``marker`` logs its state under: ``"<prefix>/alert/<normalised name>"``."""
        return f"{self.prefix}/alert/{self._normalise_alert_name(marker)}"

    def _normalise_alert_name(self, marker: str) -> str:
        """``"<prefix>/<layer>/<marker>"``, ``"<layer>/<marker>"`` or ``"<marker>"`` without the prefix
        and with the layer as in logged keys (``"fc:input"`` -> ``"fc_input"``)."""
        if marker.startswith(self.prefix + "/"):
            marker = marker[len(self.prefix) + 1 :]
        layer, _, base = marker.rpartition("/")
        return f"{metric_name(layer)}/{base}" if layer else base

    def _reset_run_state(self) -> None:
        """Forget everything a previous ``fit`` learned (history, alert references), so a monitor reused
        for a new model (a sweep in a notebook) does not compare it with the last one. A resumed fit gets
        its state back from the checkpoint right after (``load_state_dict`` runs after ``setup``)."""
        self.history = []
        self.alert_history = []
        self.per_class_history = []
        self.last_computed_step = None
        self._computed_at = []
        for alert in self.alerts:
            alert.reset()
        self._layout_written = False
        self._run_warnings = set()
        self._restore_note = None  # a checkpoint restored for an earlier validate() is not this fit's

    def logged_keys(self, pl_module: nn.Module | None = None) -> list[str]:
        """Every key this monitor logs with ``pl_module.log`` (markers, their standard errors when
        ``log_standard_errors``, alerts), for the layers it watches (resolved on ``pl_module`` when it is
        not set up yet)."""
        if self._hooks:
            layers = list(self._hooks)
        elif self._layer_ids:  # after teardown (the hooks are gone, the resolved layers are kept)
            layers = list(self._layer_ids)
        elif pl_module is not None:
            layers = list(resolve_layers(pl_module, self.layers))
        else:
            raise ValueError("logged_keys() needs the model before the monitor is set up.")
        single = len(layers) == 1
        keys = []
        for layer in layers:
            for marker in self.markers:
                keys.append(self._key(layer, marker, single=single))
                if self.log_standard_errors and marker in GLUE_MARKER_NAMES:
                    keys.append(self._key(layer, marker + "_se", single=single))
        keys += sorted({self._alert_key(a.marker) for a in self.alerts})
        return keys

    # ------------------------------------------------------------------ set-up and tear-down
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._weights_from, self._loading_for_fit = None, True  # set again if this stage loads a checkpoint
        if stage == "test":
            self._warn_run(
                "test",
                "GeometryMonitor computes markers at validation only: trainer.test logs no geometry marker. "
                "To measure a test set, run trainer.validate(model, dataloaders=test_loader) with the monitor.",
            )
        if stage in ("test", "predict") or self._hooks:
            return
        self._check_distributed_setup(trainer, pl_module)
        if stage == "fit":
            self._reset_run_state()
        self._deferred, self._deferred_module, self._layer_ids = None, None, {}
        try:
            self._attach(trainer, pl_module, stage)
        except Exception:
            if not builds_layers_later(pl_module):
                raise
            # The module builds its layers in configure_model() or setup(), which Lightning runs after the
            # callbacks' setup: resolve them at the first hook after that (see _attach_deferred).
            self._deferred, self._deferred_module = stage, pl_module

    def _check_distributed_setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse what would hang a distributed run."""
        if getattr(trainer, "world_size", 1) <= 1:
            return
        flag = "allow_zero_length_dataloader_with_multiple_devices"
        if getattr(pl_module, flag, False) or getattr(getattr(trainer, "datamodule", None), flag, False):
            raise ValueError(
                f"GeometryMonitor cannot run with {flag}=True on several devices: a process whose validation "
                "loader has no batch skips the validation loop, and the other processes would wait for it "
                "forever when they gather the per-class sample. Give every process at least one validation "
                f"batch (e.g. fewer devices for validation, or a smaller batch size) and leave {flag} False."
            )

    def _attach_deferred(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resolve the layers of a module that builds them in ``configure_model()`` / ``setup()``, at the
        first hook after those (restoring a checkpoint, ``on_fit_start``, ``on_validation_start``); a layer
        that still does not exist raises now, with the same message as at setup."""
        if self._deferred is not None:
            stage, self._deferred, self._deferred_module = self._deferred, None, None
            self._attach(trainer, pl_module, stage)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning reads state_key again right after this hook to restore the state.
        self._attach_deferred(trainer, pl_module)
        self._loading_for_fit = trainer.state.fn == TrainerFn.FITTING
        if not self._loading_for_fit:  # trainer.validate(ckpt_path=...): the weights are this checkpoint's
            epoch, step = checkpoint.get("epoch"), checkpoint.get("global_step")
            # The step the fit logged these weights' markers at (its charts' x-axis): that of the saved
            # computation made at this checkpoint's global_step (a checkpoint saved at a validation);
            # the checkpoint's global_step (optimizer steps) where none was (e.g. saved between them).
            state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
            logged = [s for e, g, s in state.get("computed_at", []) if e == epoch and g == step]
            if logged:
                step = logged[-1]
            if isinstance(epoch, int) and isinstance(step, int):
                self._weights_from = (epoch, step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._attach_deferred(trainer, pl_module)
        if getattr(trainer, "world_size", 1) > 1 and self._hooks:
            # The markers are computed on the gathered sample and are the same on every rank: they are
            # logged with sync_dist=False on purpose, so Lightning's advice to sync each of them is noise.
            # Only this monitor's own keys (a filter on the prefix would hide the advice for other keys).
            keys = "|".join(re.escape(k) for k in self.logged_keys())
            warnings.filterwarnings("ignore", message=rf"It is recommended to use `self\.log\('(?:{keys})'")

    def _layer_id_map(
        self, model: nn.Module, resolved: Mapping[str, tuple[nn.Module, str]] | None = None
    ) -> dict[str, str]:
        """Display name -> ``"<module name>:<input|output>"`` of the watched layers (the resolved identity
        behind :attr:`state_key`)."""
        layers = resolve_layers(model, self.layers) if resolved is None else resolved
        names_by_id: dict[int, str] = {}
        for n, m in model.named_modules():
            names_by_id.setdefault(id(m), n)
        return {
            name: f"{names_by_id.get(id(module), name)}:{where}" for name, (module, where) in layers.items()
        }

    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the layers, register the hooks and check the set-up (the work of :meth:`setup`)."""
        resolved = resolve_layers(pl_module, self.layers)  # raises, listing names, on a bad layer
        self._num_classes, self._head_name = None, None
        if self.layers is None:
            self._head_name, head = find_classifier_head(pl_module)
            # One logit (a binary classifier trained with BCE) still separates two classes, 0 and 1.
            self._num_classes = max(2, int(head.out_features))
        for name, (module, where) in resolved.items():
            self._hooks[name] = FeatureHook(module, where, self.pooling, name=name, strict=self.strict)
            self._samplers[name] = self._new_sampler()
        self._layer_ids = self._layer_id_map(pl_module, resolved)
        try:
            self._alert_targets = [self._alert_target(a) for a in self.alerts]
            self._check_callbacks(trainer, pl_module)
        except Exception:
            self.remove_hooks()
            self._layer_ids = {}
            raise
        if stage == "fit":
            self._check_schedule(trainer)

    def _alert_target(self, alert: MarkerAlert) -> tuple[str, str]:
        """(layer display name, marker) an alert watches; accepts the logged key ``"<prefix>/..."``."""
        name = self._normalise_alert_name(alert.marker)
        layer, _, marker = name.rpartition("/")
        if not layer:
            return next(iter(self._hooks)), marker  # an unqualified alert watches the first layer
        for display in self._hooks:
            if metric_name(display) == layer:
                return display, marker
        raise ValueError(
            f"Alert on {alert.marker!r} names a layer that is not monitored; monitored layers: "
            f"{list(self._hooks)}. Use MarkerAlert('<marker>'), MarkerAlert('<layer>/<marker>') or the "
            f"logged key, e.g. MarkerAlert({self._key(next(iter(self._hooks)), marker)!r})."
        )

    def _check_callbacks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse set-ups that would log, compare or stop on a number under a key it does not belong to."""
        mine = set(self.logged_keys())
        for cb in getattr(trainer, "callbacks", []):
            if cb is self:
                continue
            # A monitor whose layers wait for configure_model() makes this check itself when it attaches.
            if isinstance(cb, GeometryMonitor) and cb._deferred is None:
                clash = sorted(mine & set(cb.logged_keys(pl_module)))
                if clash:
                    raise ValueError(
                        f"Two GeometryMonitors would both log {clash[:4]}{' ...' if len(clash) > 4 else ''} "
                        f"(layers={self.layers!r} and layers={cb.layers!r}, both with prefix={self.prefix!r}); "
                        "Lightning would silently average their values. Give each monitor its own prefix, "
                        f"e.g. GeometryMonitor(..., prefix='{self.prefix}_<layer>'), or use one monitor "
                        "with layers=[...] (keys '<prefix>/<layer>/<marker>')."
                    )
                if cb.state_key == self.state_key:
                    raise ValueError(
                        f"Two GeometryMonitors watch the same layers ({sorted(self._layer_ids.values())}) with "
                        f"prefix={self.prefix!r}: their checkpoint states would share the key {self.state_key!r}, "
                        "so a checkpoint keeps only one of them and a resumed run restores it into both. Give "
                        f"each monitor its own prefix, e.g. GeometryMonitor(..., prefix='{self.prefix}_2'), or "
                        "use one monitor with all the markers."
                    )
                shared = [a.marker for a in self.alerts if any(a is b for b in cb.alerts)]
                if shared:
                    raise ValueError(
                        f"The same MarkerAlert object ({shared[0]!r}) is given to two GeometryMonitors: it would "
                        "compare one monitor's values with the other's. Create one MarkerAlert per monitor."
                    )
            if isinstance(cb, EarlyStopping) and cb.monitor in mine and cb.strict:
                raise ValueError(
                    f"EarlyStopping(monitor={cb.monitor!r}) needs strict=False: the marker has no value at "
                    f"validations where it is not computed (the sanity check, {self._skipped_epochs()}data "
                    "problems), and GeometryMonitor never puts a placeholder where EarlyStopping would act on "
                    "it. Pass "
                    f"EarlyStopping(monitor={cb.monitor!r}, strict=False, ...) (patience then counts computed "
                    "epochs only), or stop on a geometry alert: MarkerAlert(<marker>, relative_drop=..., "
                    "action='stop')."
                )
            if isinstance(cb, ModelCheckpoint) and cb.filename:
                named = [
                    k
                    for k in sorted(mine)
                    if k != cb.monitor and re.search(r"\{" + re.escape(k) + r"[:}]", cb.filename)
                ]
                if named:
                    raise ValueError(
                        f"ModelCheckpoint(filename={cb.filename!r}) names {named[0]!r}, which has no value at "
                        "validations where the marker is not computed (the filename would be formatted with "
                        "None, which raises, or 0, a number that is not the marker's). Name a marker in the "
                        "filename only when it is that ModelCheckpoint's monitor, e.g. "
                        f"ModelCheckpoint(monitor={named[0]!r}, mode=..., filename="
                        f"'{{epoch}}-{{{named[0]}:.3f}}'), or leave it out of the filename."
                    )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a strict lr scheduler on a marker key (the optimizers exist only from here on), and say
        which alerts a resumed fit starts afresh."""
        note, self._restore_note = self._restore_note, None
        if note is not None:
            rank_zero_warn(note, category=MonitorWarning)
        self._attach_deferred(trainer, pl_module)
        if not self._hooks:
            return
        mine = set(self.logged_keys())
        for config in getattr(trainer, "lr_scheduler_configs", None) or []:
            if config.monitor in mine and config.strict:
                raise ValueError(
                    f"The lr scheduler {type(config.scheduler).__name__} monitors {config.monitor!r} with "
                    "strict=True (Lightning's default), which raises at every validation where the marker has "
                    f"no value ({self._skipped_epochs()}data problems), and GeometryMonitor never puts a "
                    "placeholder there. Return it from configure_optimizers with strict=False: "
                    f'{{"scheduler": scheduler, "monitor": {config.monitor!r}, "strict": False}} (it then '
                    "steps only on computed epochs)."
                )

    def _skipped_epochs(self) -> str:
        """``"epochs skipped by every_n_epochs=N, "`` for the messages above, or nothing when N = 1."""
        return f"epochs skipped by every_n_epochs={self.every_n_epochs}, " if self.every_n_epochs > 1 else ""

    def _check_schedule(self, trainer: L.Trainer) -> None:
        """Warn once per fit when the markers are never computed in ``max_epochs`` (whatever the schedules),
        or only where this monitor's ``every_n_epochs`` and the trainer's validation schedule meet."""
        every_val = getattr(trainer, "check_val_every_n_epoch", None)
        if not every_val:  # validation by steps only: no epoch schedule to compare with
            return
        n = self.every_n_epochs
        meet = n * every_val // math.gcd(n, every_val)  # the markers are computed every `meet` epochs
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        if max_epochs is not None and meet > max_epochs:
            self._warn_run(
                "schedule",
                f"GeometryMonitor(every_n_epochs={n}) with Trainer(check_val_every_n_epoch={every_val}, "
                f"max_epochs={max_epochs}): markers are never computed (first at epoch {meet - 1}), so nothing "
                "is logged, alerted or checkpointed on them. Use an every_n_epochs that divides the run, e.g. "
                f"every_n_epochs={every_val}.",
            )
        elif n % every_val and every_val % n:  # neither divides the other: some validations compute nothing
            self._warn_run(
                "schedule",
                f"GeometryMonitor(every_n_epochs={n}) with Trainer(check_val_every_n_epoch={every_val}): "
                f"markers are computed only every {meet} epochs (when both schedules meet). Use an "
                f"every_n_epochs that is a multiple of {every_val} or a divisor of it, e.g. "
                f"every_n_epochs={every_val}.",
            )

    def _new_sampler(self) -> PerClassSample:
        """A fresh, empty per-class sample with this monitor's settings (one per monitored layer)."""
        return PerClassSample(self.samples_per_class, self.max_classes, seed=self.seed)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.remove_hooks()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Detach every forward hook from the model (idempotent; done automatically at teardown).

        The resolved layers stay known to :attr:`state_key`, so a checkpoint saved after ``fit`` (e.g.
        ``trainer.save_checkpoint`` once it returns) stores this monitor's state under the same key as
        one saved during it."""
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        self._samplers.clear()
        self._capturing = False

    # ------------------------------------------------------------------ offline
    def evaluate(
        self,
        model: nn.Module,
        dataloader: Any,
        *,
        forward_fn: ForwardFn | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """The values this monitor would log for ``model`` on ``dataloader``, without a Trainer.

        Same settings as the live monitor (layers, with ``layers=None`` head detection; pooling; labels and
        ``label_fn``; sampling keys from the inputs and ``seed``; ``samples_per_class``, ``max_classes``;
        protocol; markers) and the same keys: ``<prefix>/<marker>``, or ``<prefix>/<layer>/<marker>`` with
        several layers. The model runs on its own device, in eval mode under ``torch.no_grad()`` (the
        previous train/eval mode of every submodule is restored), with temporary hooks that are removed
        afterwards, also on error. The monitor's own state (hooks of a live fit, history, alerts) is not
        touched. A checkpoint saved during a monitored fit and evaluated on the same validation loader
        gives the values logged at that epoch.

        Works for any ``nn.Module``. Each batch is moved to the model's device (through a
        LightningModule's batch-transfer hooks) and the model is called as ``model(inputs)``, the inputs
        found as the monitor finds them (``batch[0]``, a dict's ``"x"``/``"input"``/... key, or a bare
        tensor). Pass ``forward_fn(model, batch)`` for other batches, e.g. ``lambda m, b: m(**b)``.

        Args:
            model: the model to measure (a LightningModule or any ``nn.Module``).
            dataloader: an iterable of validation batches (a list of DataLoaders: entry
                ``dataloader_idx``).
            forward_fn: runs the model on one batch; its output is ignored (the hooks capture the layers).
            progress: show a progress bar over the batches.

        Returns:
            ``{key: value}`` for every marker computed. A marker that cannot be computed is left out with a
            ``MonitorWarning``, as the live monitor does.

        Raises:
            ValueError: unknown layer, empty dataloader, or no marker could be computed (with the reason).
            TypeError: inputs not found in the batches (pass ``forward_fn``).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> g = torch.Generator().manual_seed(0)
            >>> y = torch.arange(3).repeat_interleave(20)
            >>> x = 3 * torch.randn(3, 8, generator=g)[y] + torch.randn(60, 8, generator=g)
            >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
            >>> monitor = GeometryMonitor(markers=["glue_dimension", "participation_ratio"], n_t=20)
            >>> values = monitor.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16))
            >>> sorted(values)
            ['geometry/glue_dimension', 'geometry/participation_ratio']
        """
        return evaluate_model(self, model, dataloader, forward_fn=forward_fn, progress=progress).values

    # ------------------------------------------------------------------ capture
    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if not trainer.training and trainer.state.fn == "validate":
            return True  # a standalone trainer.validate always computes
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._capturing = bool(self._hooks) and self._due(trainer)
        self._epoch_problems = set()
        self._logged_now = {}  # nothing left over from a validation that ended in an exception
        self._position = 0
        self._loader_missing = None
        if self._capturing:
            n_loaders = len(trainer.num_val_batches)
            if self.dataloader_idx >= n_loaders:
                self._loader_missing = (
                    f"dataloader_idx={self.dataloader_idx} but the validation has {n_loaders} dataloader(s), "
                    f"so nothing was captured. Pass dataloader_idx in 0..{n_loaders - 1}, or add the loader."
                )
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
        if on:
            self._arm(batch)

    def _arm(self, batch: Any) -> None:
        """Bound every hook's buffer by the batch's number of labels (a layer called in a loop must not
        buffer its rows for the whole step), and keep the labels for :meth:`_capture_batch`."""
        try:
            labels = extract_labels(batch, self.label_fn)
        except Exception:  # said at the batch's end, where it is extracted again
            self._armed = None
            rows = None
        else:
            self._armed = (batch, labels)
            rows = int(labels.shape[0])
        for hook in self._hooks.values():
            hook.max_rows = rows

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
        self._capture_or_skip(batch, trainer, f"GeometryMonitor could not use validation batch {batch_idx}")

    def _capture_or_skip(self, batch: Any, trainer: L.Trainer | None, what: str) -> None:
        """:meth:`_capture_batch`; with ``strict=False`` a batch that fails is skipped with one warning per
        kind of error and epoch (``what`` says which batch), and the epoch goes on."""
        try:
            self._capture_batch(batch, trainer)
        except Exception as err:
            # A batch that failed before its features were taken (labels, inputs) must not leave them
            # buffered: the next batch would get twice its rows and be skipped too. (A batch that
            # succeeds has popped every buffer: nothing to do on that path, once per batch.)
            for hook in self._hooks.values():
                hook.drop()
            if self.strict:
                raise
            self._problem(f"capture:{type(err).__name__}", f"{what} and skipped it: {err}", local=True)

    def _capture_batch(self, batch: Any, trainer: L.Trainer | None = None) -> None:
        armed, self._armed = self._armed, None
        labels = armed[1] if armed is not None and armed[0] is batch else extract_labels(batch, self.label_fn)
        inputs = self._inputs(batch, labels.shape[0], trainer)
        keep = labels >= 0
        if self._num_classes is not None:
            keep &= labels < self._num_classes
        every = bool(keep.all())  # the common case: no row to drop, no copy of the features
        if not every:
            bad = labels[~keep].unique().tolist()[:10]
            share = float((~keep).float().mean())
            self._problem(
                "labels-range",
                f"GeometryMonitor ignored samples with labels {bad} outside the class range of the watched "
                f"head {self._head_name!r} ({self._num_classes} classes: 0..{self._num_classes - 1}; "
                f"{share:.0%} of this batch). If that head is not the classifier of these labels (a "
                "multi-task model, an auxiliary head), pass layers='<classifier>:input'; if the labels are "
                "an ignore index (e.g. -100) or extra classes, this is expected."
                if self._num_classes is not None
                else f"GeometryMonitor ignored samples with negative labels {bad} (e.g. an ignore index).",
                local=True,
            )
        keys: torch.Tensor | None = None  # one set of sampling keys per batch, shared by the layers
        kept_labels = labels if every else labels[keep]
        for name, hook in self._hooks.items():
            rows = hook.step_rows
            feats = hook.pop()
            if rows == 0 or (feats is None and rows <= labels.shape[0]):  # nothing, or a failure it warned
                continue
            if feats is None or feats.shape[0] != labels.shape[0]:
                self._problem(
                    f"rows:{name}",
                    f"GeometryMonitor: layer {name!r} produced {rows} feature rows for a batch of "
                    f"{labels.shape[0]} labels (called several times per step?); those batches are skipped. "
                    "Monitor a layer that runs once per sample, or pass `label_fn`.",
                    local=True,
                )
                continue
            if keys is None:
                kept_inputs = inputs if every else inputs[keep.to(inputs.device)]
                keys = sample_keys(kept_inputs, kept_labels, self.seed)
                self._check_distinct(keys, batch)
            self._samplers[name].update(feats if every else feats[keep.to(feats.device)], kept_labels, keys)

    def _check_distinct(self, keys: torch.Tensor, batch: Any) -> None:
        """Warn (once per epoch) when many samples of a batch share their key: equal (input, label) pairs
        are one sample to :class:`PerClassSample`, so where the tensor the keys come from does not tell
        the samples apart (a prompt shared by every row under ``input_ids``), classes shrink silently."""
        n = int(keys.numel())
        repeated = n - int(torch.unique(keys).numel()) if n > 1 else 0
        if repeated < 2 or 10 * repeated < n:  # an occasional true duplicate in the data is fine
            return
        source = "input_fn(batch)" if self.input_fn is not None else (find_inputs(batch)[1] or "the batch")
        self._problem(
            "duplicate-keys",
            f"GeometryMonitor: {repeated} of {n} samples of a validation batch have the same input ({source}) "
            "and label as another sample of the batch, so they count once in the per-class sample. If they "
            "are different samples, that tensor does not identify them (e.g. a prompt shared by every "
            "sample): pass input_fn=<callable(batch) -> a tensor that differs per sample>, e.g. "
            "input_fn=lambda b: b['pixel_values'].",
            local=True,
        )

    def _inputs(self, batch: Any, n: int, trainer: L.Trainer | None) -> torch.Tensor:
        """What identifies each sample for the sampling keys: the raw inputs (``input_fn`` or found in the
        batch), else the sample's position in the monitored loader. Never the features: they change
        with the weights, so the sample would change with every update."""
        start, self._position = self._position, self._position + n
        if self.input_fn is not None:
            inputs = self.input_fn(batch)
            if not isinstance(inputs, torch.Tensor) or inputs.ndim == 0 or inputs.shape[0] != n:
                raise ValueError(
                    f"input_fn(batch) must return a (batch, ...) tensor with {n} rows, got "
                    f"{type(inputs).__name__} {tuple(getattr(inputs, 'shape', ()))}."
                )
            return inputs
        found = batch_inputs(batch)
        if found is not None and found.ndim > 0 and found.shape[0] == n:
            return found
        rank = trainer.global_rank if trainer is not None else 0
        pos = torch.arange(start, start + n, dtype=torch.int64)
        sampler = getattr(self._monitored_loader(trainer), "sampler", None)
        if type(sampler) is DistributedSampler and not sampler.shuffle:
            # Lightning's sharding of an unshuffled loader: rank r's i-th sample is dataset index
            # (r + i * replicas) mod len (the padding repeats the first samples), so position keys equal a
            # single process's and the padding copies share their originals' keys (they count once).
            pos = (sampler.rank + pos * sampler.num_replicas) % len(sampler.dataset)  # type: ignore[arg-type]
            rank = 0
        if "position-keys" not in self._run_warnings:  # warned once per fit: build the message once
            self._warn_position_keys(batch, trainer)
        return torch.stack([torch.full_like(pos, rank), pos], dim=1)

    def _warn_position_keys(self, batch: Any, trainer: L.Trainer | None) -> None:
        shuffled = self._loader_shuffled(trainer)
        self._warn_run(
            "position-keys",
            "GeometryMonitor could not find the inputs of the validation batch "
            f"({type(batch).__name__}), so samples are keyed by their position in the validation loader"
            + (
                ". That loader SHUFFLES, so the sample changes every epoch and adds noise to the markers. "
                "Use shuffle=False for validation, or"
                if shuffled
                else " (stable across epochs without shuffling; with several processes, the same as one "
                "process's under Lightning's DistributedSampler, otherwise dependent on the sharding). For keys "
                "that follow each input whatever its position,"
            )
            + " pass input_fn=lambda batch: <the inputs tensor>, e.g. input_fn=lambda b: b['img'].",
        )

    def _monitored_loader(self, trainer: L.Trainer | None) -> Any:
        """The validation loader this monitor watches (None where it cannot be told)."""
        loaders = getattr(trainer, "val_dataloaders", None) if trainer is not None else None
        if isinstance(loaders, (list, tuple)):
            return loaders[self.dataloader_idx] if self.dataloader_idx < len(loaders) else None
        return None if isinstance(loaders, dict) else loaders

    def _loader_shuffled(self, trainer: L.Trainer | None) -> bool:
        sampler = getattr(self._monitored_loader(trainer), "sampler", None)
        return isinstance(sampler, RandomSampler) or bool(getattr(sampler, "shuffle", False))

    # ------------------------------------------------------------------ compute and log
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._hooks:
            return
        if not self._capturing:
            self._no_fresh_values(trainer, set())
            return
        self._capturing = False
        for hook in self._hooks.values():
            hook.enabled = False
        distributed = self._distributed(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        epoch, step = self._epoch_and_step(trainer)
        fired: list[tuple[MarkerAlert, AlertEvent]] = []
        computed_any = False
        fresh: set[str] = set()
        alert_flags: dict[str, float] = {}
        for name, hook in self._hooks.items():
            sampler = self._samplers[name]
            values: dict[str, float]
            ses: dict[str, float]
            outcome: tuple[dict[str, float], dict[str, float], dict[int, dict[str, float]] | None] | str
            try:
                # Collective: every rank takes part, whatever happened locally. Inside the try: what it
                # raises (feature widths that differ across ranks) is raised on every rank after the
                # gather, so every rank warns and skips this layer together.
                if distributed:
                    sampler.to(pl_module.device).sync()  # torchmetrics gather, then bottom-k re-selection
                if self._loader_missing is not None:
                    raise RuntimeError(self._loader_missing)
                # Every rank holds the same gathered sample: rank 0 computes the markers and the others
                # take its result (below), so that every rank logs, checkpoints and alerts on the same
                # numbers even when one rank alone fails (e.g. runs out of memory), which would otherwise
                # leave the ranks out of step and hang ModelCheckpoint's or EarlyStopping's collectives.
                outcome = (
                    self._compute_layer(name, hook, sampler, pl_module, trainer)
                    if not distributed or trainer.is_global_zero
                    else "not computed on this rank"
                )
            except Exception as err:
                if self.strict and not distributed:
                    raise
                outcome = error_reason(err)
            if distributed:  # one broadcast per layer, reached by every rank
                outcome = trainer.strategy.broadcast(outcome, src=0)
            if isinstance(outcome, str):
                if self.strict:
                    raise RuntimeError(f"GeometryMonitor could not compute layer {name!r}: {outcome}")
                self._problem(
                    f"compute:{name}", f"GeometryMonitor skipped layer {name!r} at epoch {epoch}: {outcome}"
                )
                values, ses = {}, {}
            else:
                values, ses, per_class = outcome
                self._record_layer(name, values, ses, per_class, pl_module, trainer, fresh)
            if values:
                computed_any = True
                entry = {"epoch": epoch, "step": step, "layer": name, **values}
                entry.update({f"{m}_se": v for m, v in ses.items()})
                if not fitting:  # trainer.validate(): not part of the training run's series
                    entry["stage"] = str(getattr(trainer.state.fn, "value", trainer.state.fn))
                self.history.append(entry)
            if fitting:  # as EarlyStopping: trainer.validate() (e.g. on a test set) never moves the alerts
                fired += self._run_alerts(name, values, ses, epoch, step, alert_flags)
        for key, flag in alert_flags.items():  # one value per key, even with several alerts on a marker
            pl_module.log(key, flag, on_epoch=True, on_step=False)
            fresh.add(key)
        self._no_fresh_values(trainer, fresh)
        if computed_any:
            self.last_computed_step = trainer.global_step
            if fitting:
                self._computed_at.append((epoch, trainer.global_step, step))
        if fitting and any(_stops(a) for a in self.alerts):
            # Decided by the alerts themselves: a callable action whose name is "stop" does not stop.
            stop = any(_stops(alert) for alert, _ in fired)
            if trainer.strategy.reduce_boolean_decision(stop, all=False):
                trainer.should_stop = True
                rank_zero_info(f"GeometryMonitor: stopping training at epoch {epoch} on a geometry alert.")

    @staticmethod
    def _distributed(trainer: L.Trainer) -> bool:
        return bool(
            trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        )

    def _key(self, layer: str, marker: str, *, single: bool | None = None) -> str:
        """``<prefix>/<marker>`` with one layer, else ``<prefix>/<layer>/<marker>`` with ``":"`` in the
        layer name replaced by ``"_"`` (MLflow and others rename such keys)."""
        single = len(self._hooks) == 1 if single is None else single
        return f"{self.prefix}/{marker}" if single else f"{self.prefix}/{metric_name(layer)}/{marker}"

    @staticmethod
    def _log_step(trainer: L.Trainer) -> int:
        """The step Lightning writes epoch-level scalars at (batches that stepped the optimizer), so the
        histogram, the history and alert messages line up with the scalar charts."""
        return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))

    def _epoch_and_step(self, trainer: L.Trainer) -> tuple[int, int]:
        """The (epoch, step) a computation is recorded under: the training's, or under
        ``trainer.validate(ckpt_path=...)`` the checkpoint's, whose weights are measured."""
        if self._weights_from is not None and trainer.state.fn != TrainerFn.FITTING:
            return self._weights_from
        return trainer.current_epoch, self._log_step(trainer)

    def _no_fresh_values(self, trainer: L.Trainer, fresh: set[str]) -> None:
        """Take every key not computed at this validation out of ``trainer.callback_metrics``.

        No stale value from an earlier epoch and no NaN placeholder may stand for this epoch. A key that
        a callback monitors (``ModelCheckpoint``, ``EarlyStopping``, ``MarkerCheckpoint``'s floors,
        ceilings and ``prefer_higher``) is set to ``None``: ``ModelCheckpoint`` raises on a missing key
        once validation has run, but with ``None`` it keeps nothing for the epoch (it used to keep a NaN
        placeholder scored -inf, or rank a stale value as this epoch's), ``EarlyStopping(strict=False)``
        skips the epoch, and ``MarkerCheckpoint`` makes it ineligible. Other keys are removed. Loggers
        never see either (they get ``pl_module.log`` values only).
        """
        metrics: dict[str, Any] = trainer.callback_metrics  # Lightning's dict, read by ModelCheckpoint
        watched: set[str] = set()
        for cb in getattr(trainer, "callbacks", []):
            if isinstance(cb, MarkerCheckpoint):
                watched.update(cb._watched_keys())
            elif isinstance(getattr(cb, "monitor", None), str):
                watched.add(cb.monitor)
        for key in self.logged_keys():
            if key in fresh:
                continue
            if key in watched:
                metrics[key] = None
            else:
                metrics.pop(key, None)

    def _log_value(self, pl_module: L.LightningModule, key: str, value: float, fresh: set[str]) -> None:
        """``pl_module.log`` unless another logger already logged ``key`` in this loop (two sources of one
        key are averaged silently by Lightning): then warn and leave the key to it."""
        trainer = pl_module._trainer
        results = getattr(trainer, "_results", None) if trainer is not None else None
        here = getattr(pl_module, "_current_fx_name", None)
        if results is not None:
            for other in results.values():
                meta = getattr(other, "meta", None)
                if meta is not None and meta.name == key and meta.fx != here and not other.has_reset:
                    self._problem(
                        f"collision:{key}",
                        f"GeometryMonitor did not log {key!r}: {meta.fx} already logs that key, and Lightning "
                        f"would mix the two values. Give the monitor another prefix (prefix='{self.prefix}_x') "
                        "or rename the other metric.",
                    )
                    return
        f32 = torch.finfo(torch.float32)
        if math.isfinite(value) and (abs(value) > f32.max or 0 < abs(value) < f32.tiny):
            self._problem(
                f"float32:{key}",
                f"GeometryMonitor did not log {key!r} = {value:.6g}: Lightning logs float32, which cannot hold "
                f"it (normal range {f32.tiny:.3g} to {f32.max:.3g}; it would become {'inf' if abs(value) > 1 else '0'}"
                " or lose its digits). The value is kept in the monitor's history. Features of such magnitudes "
                "usually mean the training diverged (or vanished); rescale them if they are expected.",
            )
            return
        pl_module.log(key, value, on_epoch=True, on_step=False, sync_dist=False)
        fresh.add(key)
        self._logged_now[key] = value

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn where a value this monitor logged is not what Lightning reports: another source logged the
        same key in the same hook (the module's ``on_validation_epoch_end`` runs after the callbacks'),
        which :meth:`_log_value` cannot see coming, and Lightning averaged the two."""
        logged, self._logged_now = self._logged_now, {}
        metrics = getattr(trainer, "callback_metrics", None) or {}
        for key, value in logged.items():
            got = metrics.get(key)
            if got is None or not math.isfinite(value):
                continue
            reported = float(got)
            if not math.isclose(reported, value, rel_tol=1e-6, abs_tol=1e-12):  # float32 logging: ~6e-8
                self._problem(
                    f"mixed:{key}",
                    f"GeometryMonitor logged {key!r} = {value:.6g}, but Lightning reports {reported:.6g}: "
                    "something else logged the same key in the same hook (e.g. the LightningModule's "
                    "on_validation_epoch_end) and Lightning averaged the two, so that key does not hold "
                    f"the marker this epoch. Give the monitor another prefix (prefix='{self.prefix}_x') or "
                    "rename the other metric.",
                )

    def _compute_layer(
        self,
        name: str,
        hook: FeatureHook,
        sampler: PerClassSample,
        pl_module: L.LightningModule,
        trainer: L.Trainer,
    ) -> tuple[dict[str, float], dict[str, float], dict[int, dict[str, float]] | None]:
        """The layer's marker values, their standard errors and the per-class view (pairs protocol), as
        plain Python data (broadcast from rank 0 under DDP); writes the TensorBoard extras (rank 0)."""
        feats, labels = self._sample_for(name, hook, sampler)
        report = self.compute_markers(
            feats,
            labels,
            device=pl_module.device,
            layer=name,
            return_spectrum=self.log_spectrum and bool(self._tensorboards(trainer)),
        )
        values = {m: float(v) for m, v in report.values.items()}
        ses = {
            m: float(se)
            for m, se in report.standard_errors.items()
            if m in values and se is not None and math.isfinite(float(se))
        }
        heatmap = self.log_class_heatmap and bool(self._tensorboards(trainer))
        try:
            view = class_view(report.glue, heatmap=heatmap)  # per-class view (pairs protocol only)
        except Exception as err:  # the per-class view only: the markers above stand
            if self.strict:
                raise
            self._problem(
                f"class-view:{name}",
                f"GeometryMonitor skipped the per-class view of layer {name!r} at epoch "
                f"{trainer.current_epoch} ({error_reason(err)}); the markers are logged as usual.",
            )
            view = None
        self._log_tensorboard(trainer, name, report.spectrum, view)
        return values, ses, (view.to_dict() if view is not None and values else None)

    def _record_layer(
        self,
        name: str,
        values: dict[str, float],
        ses: dict[str, float],
        per_class: dict[int, dict[str, float]] | None,
        pl_module: L.LightningModule,
        trainer: L.Trainer,
        fresh: set[str],
    ) -> None:
        """Log a layer's values (and standard errors) and keep its per-class view: the same on every rank."""
        for marker, value in values.items():
            self._log_value(pl_module, self._key(name, marker), value, fresh)
        if self.log_standard_errors:
            for marker, se in ses.items():
                self._log_value(pl_module, self._key(name, marker + "_se"), se, fresh)
        if per_class is not None:
            epoch, step = self._epoch_and_step(trainer)
            self.per_class_history.append(
                {
                    "epoch": epoch,
                    "step": step,
                    "layer": name,
                    "per_class": per_class,
                }
            )

    def _sample_for(
        self,
        name: str,
        hook: FeatureHook,
        sampler: PerClassSample,
        *,
        where: str = "during validation",
        fix: str = "Pass `layers=` naming a module that runs in validation_step.",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's checked ``(features, labels)`` sample (live and offline): raises ``RuntimeError``
        naming the problem when nothing was captured (the layer never ran ``where``, its capture failed,
        or no batch had usable labels), else :meth:`_validate_sample`'s result."""
        feats, labels, _ = sampler.state()
        if sampler.num_stored == 0:
            if hook.error is not None:
                raise RuntimeError(f"feature capture failed: {hook.error}")
            if hook.calls == 0:
                raise RuntimeError(
                    f"layer {name!r} was never called {where}: it never ran, so no features were captured "
                    f"(is it used in forward()?). {fix}"
                )
            raise RuntimeError("no labelled features were captured (see the previous warnings).")
        return self._validate_sample(name, feats, labels)

    def _validate_sample(
        self, name: str, feats: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a layer's sample before computing: finite features, classes with >= 2 samples (others are
        left out, with a warning), at least 2 such classes. Raises ``RuntimeError`` naming the problem."""
        if not all_finite(feats):
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
        return feats, labels

    def compute_markers(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str | None = None,
        *,
        layer: str | None = None,
        return_spectrum: bool = False,
    ) -> MarkerReport:
        """The markers of one labelled feature sample with exactly this monitor's settings (no Trainer needed).

        Calls :func:`~lightning_geomarkers.functional.geometry_markers` with the monitor's ``markers``, GLUE
        protocol arguments and ``generator=seed``, on ``device`` (default: the features' device), so
        the values equal those the monitor logs for the same sample. Solver warnings and skipped markers are
        re-issued once (per epoch) as warnings naming ``layer``.

        Args:
            features: (S, N) features; labels: (S,) integer class ids (e.g. ``sampler.state()[:2]``).
            device: where to compute.
            layer: display name used in the warnings.
            return_spectrum: also return the feature spectrum (``report.spectrum``) when no spectral
                marker is computed (for the TensorBoard histogram).

        Returns:
            The :class:`~lightning_geomarkers.functional.MarkerReport` (``values`` are 0-dim tensors).

        Example:
            >>> import torch
            >>> from lightning_geomarkers.functional import participation_ratio
            >>> x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
            >>> y = torch.arange(4).repeat(10)
            >>> report = GeometryMonitor(markers=["participation_ratio"]).compute_markers(x, y)
            >>> bool(torch.isclose(report.values["participation_ratio"], participation_ratio(x)))
            True
        """
        where = "" if layer is None else f", layer {layer!r}"
        if device is not None:
            features, labels = features.to(device), labels.to(device)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = geometry_markers(
                features,
                labels,
                markers=self.markers,
                generator=self.seed,
                strict=False,
                return_spectrum=return_spectrum,
                num_threads=self.num_threads,
                workers=self.workers,
                **self.glue_kwargs,
            )
        for w in caught:  # re-issue the solver's warnings once per epoch, with context
            self._problem(
                f"solver:{layer}:{w.category.__name__}",
                f"GeometryMonitor{where}: {w.message}",
                w.category,
            )
        for marker, reason in report.skipped.items():
            hint = " Use fewer points per class (`points_per_class`)." if "separab" in reason else ""
            self._problem(
                f"skip:{layer}:{marker}",
                f"GeometryMonitor skipped {marker}{' for layer ' + repr(layer) if layer else ''}: {reason}.{hint}",
            )
        return report

    def _run_alerts(
        self,
        layer: str,
        values: dict[str, float],
        ses: dict[str, float],
        epoch: int,
        step: int,
        flags: dict[str, float],
    ) -> list[tuple[MarkerAlert, AlertEvent]]:
        """Update the layer's alerts with this evaluation's values; act on and return the ones that fired."""
        fired = []
        for alert, (a_layer, marker) in zip(self.alerts, self._alert_targets, strict=True):
            if a_layer != layer or marker not in values:
                continue
            se = ses.get(marker)
            if alert.min_standard_errors is not None and se is None:
                self._warn_run(
                    f"no-se:{alert.marker}",
                    f"GeometryMonitor: {alert!r} asks for min_standard_errors but {marker} has no standard "
                    "error here; the alert fires on the drop alone.",
                )
            logged = self._key(layer, marker)
            # The message names the logged key where the bare marker is ambiguous (several layers, or
            # several monitors told apart by their prefix).
            label = logged if len(self._hooks) > 1 or self.prefix != "geometry" else None
            event = alert.update(values[marker], epoch=epoch, step=step, se=se, key=logged, label=label)
            key = self._alert_key(alert.marker)
            flags[key] = max(flags.get(key, 0.0), float(event is not None))
            if event is None:
                continue
            fired.append((alert, event))
            self.alert_history.append(event.to_dict())
            if callable(alert.action):
                try:
                    alert.action(event)
                except Exception as err:
                    self._problem(
                        f"action:{alert.marker}",
                        f"GeometryMonitor: the alert action raised {err!r}.",
                        local=True,
                    )
            else:
                rank_zero_warn(event.message, category=GeometryWarning)
        return fired

    # ------------------------------------------------------------------ TensorBoard extras
    def _tensorboards(self, trainer: L.Trainer) -> list[Any]:
        """The writers of every ``TensorBoardLogger`` of the trainer (rank 0 only; none elsewhere)."""
        if not trainer.is_global_zero:
            return []
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _log_tensorboard(
        self,
        trainer: L.Trainer,
        layer: str,
        spectrum: torch.Tensor | None,
        view: Any = None,
    ) -> None:
        """Write the TensorBoard extras (spectrum histogram, heat map, layout and text table). Each extra
        runs on its own: one that raises (a writer without Pillow for images, a full disk) is skipped with
        one ``MonitorWarning`` per epoch, and the markers, history and alerts of the epoch are kept."""
        writers = self._tensorboards(trainer)
        if not writers:
            return
        failed: list[str] = []

        def guarded(what: str, write: Callable[[], Any]) -> None:
            try:
                write()
            except Exception as err:
                hint = (
                    " (images need Pillow: pip install pillow)"
                    if isinstance(err, ImportError) and "PIL" in str(err)
                    else ""
                )
                failed.append(f"{what}: {err!r}{hint}")

        step = self._log_step(trainer)
        single = len(self._hooks) == 1
        tag = self._key(layer, "feature_spectrum", single=single)  # the scalars' section
        heat = self._key(layer, "pairwise_capacity", single=single)
        for writer in writers:  # every TensorBoardLogger of the trainer gets the extras
            if self.log_spectrum and spectrum is not None:  # the markers' own decomposition, shared
                guarded(
                    "feature spectrum", functools.partial(writer.add_histogram, tag, spectrum.cpu(), step)
                )
            if self.log_class_heatmap and view is not None:
                guarded(
                    "pairwise-capacity heat map",
                    functools.partial(write_class_heatmap, writer, heat, view, step),
                )
            if self.custom_scalars and not self._layout_written:
                guarded("custom-scalars layout", functools.partial(self._write_layout, writer, step))
        if self.custom_scalars and not any(f.startswith("custom-scalars layout") for f in failed):
            self._layout_written = True  # (a failed layout is tried again at the next computation)
        if failed:
            self._problem(
                f"tensorboard:{layer}",
                f"GeometryMonitor skipped a TensorBoard extra for layer {layer!r} at epoch "
                f"{trainer.current_epoch} ({'; '.join(failed)}); the markers are logged and kept as usual. "
                "Switch the extra off (log_spectrum / log_class_heatmap / custom_scalars=False) if this persists.",
            )

    def _write_layout(self, writer: Any, step: int) -> None:
        # TensorBoard shows one custom-scalars layout per run, the last written: every monitor writing to
        # this writer adds its categories to one merged layout kept on the writer, so none hides another's.
        layouts = getattr(writer, _LAYOUTS_ATTR, None)
        if not isinstance(layouts, dict):
            layouts = {}
            setattr(writer, _LAYOUTS_ATTR, layouts)
        # Keyed by the monitor's checkpoint key (prefix and resolved layers): two monitors with one prefix
        # on different layers each keep their charts.
        layouts[self.state_key] = (self.prefix, self._layout(), self._marker_rows())
        merged: dict[str, dict[str, list[Any]]] = {}
        for _, layout, _ in layouts.values():  # one category name may hold charts of several monitors
            for category, charts in layout.items():
                merged.setdefault(category, {}).update(charts)
        writer.add_custom_scalars(merged)
        # What each marker measures, readable in TensorBoard's Text tab next to the charts: one table per
        # prefix, with the rows of every monitor using it.
        rows = [row for prefix, _, mine in layouts.values() if prefix == self.prefix for row in mine]
        table = "| tag | what it measures | better transfer in the literature |\n|---|---|---|\n"
        writer.add_text(f"{self.prefix}/markers", table + "\n".join(rows), step)

    def _marker_rows(self) -> list[str]:
        return [
            f"| `{self._key(layer, m)}` | {MARKERS[m].description} | {_SIGN[MARKERS[m].higher_is_better]} |"
            for layer in self._hooks
            for m in self.markers
        ]

    def _layout(self) -> dict[str, dict[str, list[Any]]]:
        """One chart per marker (markers differ in scale: a numerical rank of ~100 next to a participation
        ratio of ~5 would flatten the latter), except the three GLUE alignments, which share [0, 1]."""
        groups = {
            "GLUE": [m for m in self.markers if m in GLUE_MARKER_NAMES and "alignment" not in m],
            "Spectrum": [
                m for m in self.markers if m in ("participation_ratio", "numerical_rank", "effective_rank")
            ],
            "Collapse and intrinsic dimension": [
                m for m in self.markers if m in ("nc1", "lid", "lid_twonn", "within_class_distance")
            ],
        }
        alignments = [m for m in self.markers if m in GLUE_MARKER_NAMES and "alignment" in m]
        layout: dict[str, dict[str, list[Any]]] = {}
        for layer in self._hooks:
            head = f"{self.prefix} {metric_name(layer)}" if len(self._hooks) > 1 else self.prefix
            for group, names in groups.items():
                if names:
                    layout[f"{head}: {group}"] = {
                        f"{m}: {MARKERS[m].description}": ["Multiline", [_exact(self._key(layer, m))]]
                        for m in names
                    }
            if alignments:
                layout.setdefault(f"{head}: GLUE", {})["GLUE alignments (mean |cos|, 0 to 1)"] = [
                    "Multiline",
                    [_exact(self._key(layer, m)) for m in alignments],
                ]
        if self.alerts:
            layout[f"{self.prefix} alerts"] = {
                "alerts": [
                    "Multiline",
                    [_exact(k) for k in sorted({self._alert_key(a.marker) for a in self.alerts})],
                ]
            }
        return layout

    # ------------------------------------------------------------------ messages
    def _warn_run(self, key: str, message: str) -> None:
        """Warn once per ``fit`` (set-up advice that does not change from epoch to epoch)."""
        if key in self._run_warnings:
            return
        self._run_warnings.add(key)
        rank_zero_warn(message, category=MonitorWarning)

    def _problem(
        self, key: str, message: str, category: type[Warning] = MonitorWarning, *, local: bool = False
    ) -> None:
        """Warn once per epoch and problem kind (a 1000-batch epoch must not print 1000 warnings).

        ``local``: a problem of this process's own batches or actions (capture, labels, an alert action),
        which under DDP another rank need not have: warned by the rank that has it, tagged with its rank,
        instead of by rank 0 alone (which would leave another rank's problem unsaid)."""
        if key in self._epoch_problems:
            return
        self._epoch_problems.add(key)
        rank = getattr(rank_zero_only, "rank", 0)  # set by Lightning for each process
        if local and rank != 0:
            warnings.warn(f"[rank {rank}] {message}", category, stacklevel=2)
        else:
            rank_zero_warn(message, category=category)
