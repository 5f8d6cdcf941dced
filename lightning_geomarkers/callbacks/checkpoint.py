"""``MarkerCheckpoint``: checkpoint selection gated by geometry markers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["MarkerCheckpoint"]


class MarkerCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that selects checkpoints on geometry-marker thresholds.

    Two rules, usable together:

    - ``floors`` / ``ceilings``: an epoch is eligible only if every listed logged value (for example
      ``"geometry/glue_dimension"``) is at least its floor / at most its ceiling. Among eligible epochs
      the usual ``monitor`` / ``mode`` / ``save_top_k`` selection applies, e.g. keep the best ``val_acc``
      among epochs whose D_eff and Psi_eff stay above floors.
    - ``prefer_higher``: the paper's rule (Chou et al., ICLR 2026): keep the checkpoint of the latest
      epoch whose listed markers are *all* higher than those of the checkpoint kept so far (e.g.
      ``["geometry/glue_dimension", "geometry/glue_utility"]``). Only epochs where the markers were
      freshly computed count. Replaces ``monitor`` (leave it None); keeps one checkpoint.

    All other arguments are those of ``ModelCheckpoint``. A listed key that was never logged, or a marker
    not computed at this validation (``every_n_epochs``, a skipped computation), makes the epoch
    ineligible (with a message when ``verbose``): a floor is never checked against an earlier epoch's
    value. At setup every listed key that names a geometry marker must be one the trainer's
    monitors log (``"geometry/glue_dimension"``, not ``"glue_dimension"``), else a
    ``ValueError`` lists the valid keys.

    Example::

        MarkerCheckpoint(monitor="val_acc", mode="max", floors={"geometry/glue_dimension": 2.0})
        MarkerCheckpoint(prefer_higher=["geometry/glue_dimension", "geometry/glue_utility"])
    """

    def __init__(
        self,
        *,
        floors: Mapping[str, float] | None = None,
        ceilings: Mapping[str, float] | None = None,
        prefer_higher: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.floors = dict(floors or {})
        self.ceilings = dict(ceilings or {})
        for name, bounds in (("floors", self.floors), ("ceilings", self.ceilings)):
            for key, value in bounds.items():
                if not isinstance(key, str) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ValueError(
                        f"`{name}` must map logged keys to finite numbers, got {key!r}: {value!r}."
                    )
        # One key is a key, not a sequence of one-letter keys.
        self.prefer_higher = [prefer_higher] if isinstance(prefer_higher, str) else list(prefer_higher or [])
        bad = [key for key in self.prefer_higher if not isinstance(key, str) or not key]
        if bad:
            raise ValueError(f"`prefer_higher` must be logged keys (non-empty strings), got {bad!r}.")
        if self.prefer_higher:
            if kwargs.get("monitor") is not None:
                raise ValueError("`prefer_higher` replaces `monitor`; pass one or the other.")
            if kwargs.get("save_top_k", 1) != 1:
                raise ValueError("`prefer_higher` keeps a single checkpoint; leave `save_top_k` at 1.")
        elif not (self.floors or self.ceilings):
            raise ValueError(
                "Give `floors`, `ceilings` and/or `prefer_higher`; otherwise use ModelCheckpoint."
            )
        super().__init__(**kwargs)
        self.kept_marker_values: dict[str, float] | None = None
        self._keys_checked = False  # the marker keys checked against the monitors (at setup or later)

    @property
    def state_key(self) -> str:
        """The ``ModelCheckpoint`` key's fields (its schedule included, so two instances that differ only
        in ``every_n_epochs`` or the like can be used together, as two ``ModelCheckpoint``) and the
        floors, ceilings and ``prefer_higher`` keys."""
        return self._generate_state_key(**self._key_fields(schedule=True))

    @property
    def _legacy_state_key(self) -> Any:  # Lightning's fallback key when loading a checkpoint
        """The key of checkpoints written before ``state_key`` held the schedule, so they still restore."""
        return self._generate_state_key(**self._key_fields(schedule=False))

    def _key_fields(self, *, schedule: bool) -> dict[str, Any]:
        """The state key's fields, in the key's order (the legacy key: without the schedule)."""
        fields: dict[str, Any] = {"monitor": self.monitor, "mode": self.mode}
        if schedule:
            fields.update(
                every_n_train_steps=self._every_n_train_steps,
                every_n_epochs=self._every_n_epochs,
                train_time_interval=self._train_time_interval,
            )
        return {**fields, "floors": self.floors, "ceilings": self.ceilings, "prefer": self.prefer_higher}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._keys_checked = False
        self._check_keys(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._check_keys(trainer, pl_module)  # if a monitor resolved its layers only after setup

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._check_keys(trainer, pl_module)

    def _watched_keys(self) -> list[str]:
        """Every key this callback reads: the floors, ceilings and ``prefer_higher`` keys, and ``monitor``."""
        keys = [*self.floors, *self.ceilings, *self.prefer_higher]
        return keys if self.monitor is None else [*keys, self.monitor]

    def _check_keys(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse marker keys no monitor logs (a floor on a key that never appears saves nothing)."""
        from lightning_geomarkers.callbacks.monitor import GeometryMonitor
        from lightning_geomarkers.functional.suite import MARKERS

        if self._keys_checked:
            return
        monitors = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GeometryMonitor)]
        if any(m._deferred is not None for m in monitors):
            return  # a monitor waits for the model's layers (configure_model): checked at on_fit_start
        self._keys_checked = True
        valid = [k for m in monitors for k in m.logged_keys(pl_module)]
        prefixes = {m.prefix + "/" for m in monitors}
        for key in self._watched_keys():
            looks_like_marker = key.rsplit("/", 1)[-1].removesuffix("_se") in MARKERS or any(
                key.startswith(p) for p in prefixes
            )
            if key in valid or not looks_like_marker:
                continue
            name = key.rsplit("/", 1)[-1]
            close = [k for k in valid if k.endswith("/" + name)]
            computed = any(name.removesuffix("_se") in m.markers for m in monitors)
            if monitors and not close and not computed and name.removesuffix("_se") in MARKERS:
                fix = f"Add {name.removesuffix('_se')!r} to the monitor's `markers`, or drop it here"
            else:
                fix = "Use the logged key" + (f", e.g. {close[0]!r}" if close else "")
            raise ValueError(
                f"MarkerCheckpoint lists {key!r}, which no GeometryMonitor logs"
                + (" (there is no GeometryMonitor in Trainer(callbacks=...))" if not monitors else "")
                + f", so no epoch would ever be eligible. {fix}"
                + f". Keys logged: {valid[:12]}{' ...' if len(valid) > 12 else ''}."
            )

    def eligible(self, values: Mapping[str, Any]) -> tuple[bool, str]:
        """Whether logged ``values`` pass every floor and ceiling, and if not, why."""
        for key, bound in self.floors.items():
            if key not in values:
                return False, f"{key!r} was not logged"
            if values[key] is None:
                return False, f"{key!r} was not computed at this validation"
            if not float(values[key]) >= bound:
                return False, f"{key} = {float(values[key]):.4g} < floor {bound:.4g}"
        for key, bound in self.ceilings.items():
            if key not in values:
                return False, f"{key!r} was not logged"
            if values[key] is None:
                return False, f"{key!r} was not computed at this validation"
            if not float(values[key]) <= bound:
                return False, f"{key} = {float(values[key]):.4g} > ceiling {bound:.4g}"
        return True, ""

    def _fresh(self, trainer: L.Trainer) -> bool:
        """Were the geometry markers computed at this validation (not stale from an earlier one)?"""
        from lightning_geomarkers.callbacks.monitor import GeometryMonitor

        monitors = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GeometryMonitor)]
        return not monitors or any(m.last_computed_step == trainer.global_step for m in monitors)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        ok, why = self.eligible(monitor_candidates)
        ok = trainer.strategy.reduce_boolean_decision(ok, all=True)
        if not ok:
            if self.verbose:
                rank_zero_info(f"MarkerCheckpoint: epoch {trainer.current_epoch} not eligible ({why}).")
            return
        if not self.prefer_higher:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
            return
        if not self._fresh(trainer) or any(monitor_candidates.get(k) is None for k in self.prefer_higher):
            return
        current = {k: float(monitor_candidates[k]) for k in self.prefer_higher}
        better = self.kept_marker_values is None or all(
            current[k] > self.kept_marker_values[k] for k in self.prefer_higher
        )
        if not trainer.strategy.reduce_boolean_decision(better, all=True):
            return
        self.kept_marker_values = current
        self.best_model_score = torch.tensor(current[self.prefer_higher[0]])
        self._save_none_monitor_checkpoint(trainer, monitor_candidates)
        if self.verbose:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in current.items())
            rank_zero_info(f"MarkerCheckpoint: kept epoch {trainer.current_epoch} ({shown}).")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kept_marker_values"] = self.kept_marker_values
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.kept_marker_values = state_dict.get("kept_marker_values")
