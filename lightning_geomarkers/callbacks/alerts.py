"""``MarkerAlert``: EarlyStopping-like early warnings on one geometry marker."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from lightning_geomarkers.functional.suite import MARKERS
from lightning_geomarkers.utilities.checks import check_positive_int

__all__ = ["AlertEvent", "MarkerAlert"]

REFERENCES = ("best", "first", "moving_average")


@dataclass
class AlertEvent:
    """One firing of a :class:`MarkerAlert` (kept in ``GeometryMonitor.alert_history``)."""

    marker: str
    epoch: int
    step: int
    value: float
    reference: float | None
    message: str
    action: str
    #: The logged key of the value that fired (``"<prefix>/<layer>/<marker>"``), when a monitor ran it.
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MarkerAlert:
    """Watch one marker and fire when it crosses a threshold or drops too far from a reference.

    Semantics follow ``EarlyStopping``: every time the monitor computes the marker, the value is compared
    with an absolute ``threshold`` and/or a ``relative_drop`` from a reference (the ``best`` value so far,
    the ``first`` value, or the ``moving_average`` of the previous ``window`` values). A value that
    violates either test is *bad*; the alert fires when ``patience`` consecutive values are bad, and then
    stays quiet until a good value re-arms it. The first ``warmup`` computed values are ignored entirely
    (neither checked nor used as reference). ``mode="max"`` means higher is better (alert on drops),
    ``"min"`` the opposite (alert on rises); by default it follows the sign the literature reports
    for the marker (see ``lightning_geomarkers.functional.MARKERS``).

    Args:
        marker: marker name, e.g. ``"glue_dimension"``; with several monitored layers,
            ``"<layer>/<marker>"``.
        threshold: absolute floor (mode "max") or ceiling (mode "min").
        relative_drop: fraction, e.g. 0.2 fires when the value is 20% worse than the reference.
        reference: "best", "first" or "moving_average".
        window: values in the moving average.
        patience: consecutive bad values needed to fire.
        warmup: computed values to ignore at the start.
        mode: "max", "min", or None for the marker's literature sign.
        action: "warn" (a ``GeometryWarning``), "stop" (stop training on all ranks, and warn), or a
            callable receiving the :class:`AlertEvent`.
        min_standard_errors: ``k`` above (None: no noise test). GLUE markers (``glue_*``) only, the
            markers that carry a standard error.

    Example:
        >>> alert = MarkerAlert("glue_dimension", relative_drop=0.2, patience=2)
        >>> [alert.update(v, epoch=i, step=i) is not None for i, v in enumerate([10.0, 9.0, 7.5, 7.0, 6.0])]
        [False, False, False, True, False]

        With standard errors: a 30% drop with SE 1.5 on both values is 3 / sqrt(1.5**2 + 1.5**2) = 1.4
        standard errors of the difference, within the noise for ``k = 2``; with SE 0.5 it is 4.2:

        >>> noisy = MarkerAlert("glue_dimension", relative_drop=0.2, min_standard_errors=2.0)
        >>> [noisy.update(v, epoch=i, step=i, se=1.5) is not None for i, v in enumerate([10.0, 7.0])]
        [False, False]
        >>> sharp = MarkerAlert("glue_dimension", relative_drop=0.2, min_standard_errors=2.0)
        >>> [sharp.update(v, epoch=i, step=i, se=0.5) is not None for i, v in enumerate([10.0, 7.0])]
        [False, True]
    """

    def __init__(
        self,
        marker: str,
        *,
        threshold: float | None = None,
        relative_drop: float | None = None,
        reference: str = "best",
        window: int = 3,
        patience: int = 1,
        warmup: int = 0,
        mode: str | None = None,
        action: str | Callable[[AlertEvent], Any] = "warn",
        min_standard_errors: float | None = None,
    ) -> None:
        if not isinstance(marker, str) or not marker:
            raise TypeError(f"`marker` must be a marker name such as 'glue_dimension', got {marker!r}.")
        base = marker.rsplit("/", 1)[-1]
        if base not in MARKERS:
            raise ValueError(f"Unknown marker {marker!r}; choose from {list(MARKERS)}.")
        if threshold is None and relative_drop is None:
            raise ValueError("Give `threshold` and/or `relative_drop`; otherwise the alert can never fire.")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"`threshold` must be a finite number, got {threshold!r}.")
        if reference not in REFERENCES:
            raise ValueError(f"`reference` must be one of {REFERENCES}, got {reference!r}.")
        window = check_positive_int(window, "window")
        patience = check_positive_int(patience, "patience")
        warmup = check_positive_int(warmup, "warmup", minimum=0)
        if mode is None:
            sign = MARKERS[base].higher_is_better
            if sign is None:
                raise ValueError(
                    f"The literature's sign for {base!r} flips between settings; pass mode='max' or mode='min'."
                )
            mode = "max" if sign else "min"
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}.")
        if relative_drop is not None and not (0 < relative_drop and (relative_drop < 1 or mode == "min")):
            raise ValueError(
                f"`relative_drop` must be a fraction in (0, 1) (e.g. 0.2 for 20%), got {relative_drop!r}."
            )
        if min_standard_errors is not None:
            if (
                isinstance(min_standard_errors, bool)
                or not isinstance(min_standard_errors, int | float)
                or not math.isfinite(min_standard_errors)
                or min_standard_errors <= 0
            ):
                raise ValueError(
                    f"`min_standard_errors` must be a positive number (e.g. 2.0), got {min_standard_errors!r}."
                )
            if not base.startswith("glue_"):
                raise ValueError(
                    f"`min_standard_errors` needs a standard error, which only the GLUE markers (glue_*) carry; "
                    f"{base!r} has none. Drop min_standard_errors or alert on a glue_* marker."
                )
        if not (callable(action) or action in ("warn", "stop")):
            raise ValueError(f"`action` must be 'warn', 'stop' or a callable, got {action!r}.")
        self.marker = marker
        self.threshold = threshold
        self.relative_drop = relative_drop
        self.reference = reference
        self.window = window
        self.patience = patience
        self.warmup = warmup
        self.mode = mode
        self.action = action
        self.min_standard_errors = None if min_standard_errors is None else float(min_standard_errors)
        self.reset()

    def reset(self) -> None:
        """Forget every value seen (a new run); the configuration is kept."""
        self.n_values = 0
        self.wait = 0
        self.armed = True
        self.best: float | None = None
        self.first: float | None = None
        self.recent: deque[float] = deque(maxlen=self.window)
        self.best_se: float | None = None
        self.first_se: float | None = None
        self.recent_se: deque[float | None] = deque(maxlen=self.window)

    @property
    def action_name(self) -> str:
        return self.action if isinstance(self.action, str) else getattr(self.action, "__name__", "callable")

    def reference_value(self) -> float | None:
        """The value the next one is compared with (None before the first post-warmup value)."""
        if self.reference == "best":
            return self.best
        if self.reference == "first":
            return self.first
        return sum(self.recent) / len(self.recent) if self.recent else None

    def reference_se(self) -> float | None:
        """Standard error of :meth:`reference_value` (None if unknown)."""
        if self.reference == "best":
            return self.best_se
        if self.reference == "first":
            return self.first_se
        if not self.recent_se or any(se is None for se in self.recent_se):
            return None
        return math.sqrt(sum(se * se for se in self.recent_se if se is not None)) / len(self.recent_se)

    def _beyond_noise(self, distance: float, se: float | None) -> tuple[bool, str]:
        """Whether ``distance`` exceeds ``min_standard_errors`` times ``se`` (always, without a test)."""
        if self.min_standard_errors is None or se is None:
            return True, ""
        if se == 0:
            return distance > 0, ""
        z = distance / se
        return z > self.min_standard_errors, f" ({z:.1f} standard errors)"

    def _worse(self, value: float, bound: float) -> bool:
        return value < bound if self.mode == "max" else value > bound

    def update(
        self,
        value: float,
        *,
        epoch: int,
        step: int,
        se: float | None = None,
        key: str | None = None,
        label: str | None = None,
    ) -> AlertEvent | None:
        """Feed one computed value (and its standard error, if known); returns the :class:`AlertEvent` if
        the alert fires now. ``key`` (the logged key of the value) is kept in the event; ``label`` names the
        value in the message (default: the alert's ``marker``)."""
        value = float(value)
        if se is not None and not (math.isfinite(float(se)) and float(se) >= 0):
            se = None
        se = None if se is None else float(se)
        if not math.isfinite(value):
            return None
        self.n_values += 1
        if self.n_values <= self.warmup:
            return None
        ref = self.reference_value()
        reasons = []
        if self.threshold is not None and self._worse(value, self.threshold):
            beyond, z = self._beyond_noise(abs(value - self.threshold), se)
            if beyond:
                side = "below the floor" if self.mode == "max" else "above the ceiling"
                reasons.append(f"{side} {self.threshold:.4g}{z}")
        if self.relative_drop is not None and ref is not None:
            allowed = abs(ref) * self.relative_drop
            bound = ref - allowed if self.mode == "max" else ref + allowed
            ref_se = self.reference_se()
            diff_se = None if se is None or ref_se is None else math.sqrt(se * se + ref_se * ref_se)
            beyond, z = self._beyond_noise(abs(value - ref), diff_se)
            if self._worse(value, bound) and beyond:
                change = abs(value - ref) / abs(ref) if ref else math.inf
                word = "below" if self.mode == "max" else "above"
                reasons.append(
                    f"{change:.1%} {word} its {self.reference.replace('_', ' ')} value {ref:.4g} "
                    f"(allowed {self.relative_drop:.0%}){z}"
                )
        event = None
        if reasons:
            self.wait += 1
            if self.wait >= self.patience and self.armed:
                self.armed = False
                message = (
                    f"Geometry alert at epoch {epoch} (step {step}): {label or self.marker} = {value:.4g} is "
                    + " and ".join(reasons)
                    + (f" for {self.wait} consecutive evaluations" if self.patience > 1 else "")
                    + "."
                    + (
                        " Drops of GLUE dimension/utility forecast weaker out-of-distribution transfer."
                        if self.marker.rsplit("/", 1)[-1] in ("glue_dimension", "glue_utility")
                        else ""
                    )
                )
                event = AlertEvent(self.marker, epoch, step, value, ref, message, self.action_name, key)
        else:
            self.wait = 0
            self.armed = True
        if self.first is None:
            self.first, self.first_se = value, se
        if self.best is None or not self._worse(value, self.best):
            self.best, self.best_se = value, se
        self.recent.append(value)
        self.recent_se.append(se)
        return event

    def state_dict(self) -> dict[str, Any]:
        return {
            "marker": self.marker,
            "n_values": self.n_values,
            "wait": self.wait,
            "armed": self.armed,
            "best": self.best,
            "first": self.first,
            "recent": list(self.recent),
            "best_se": self.best_se,
            "first_se": self.first_se,
            "recent_se": list(self.recent_se),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("marker") != self.marker:
            raise ValueError(
                f"State of alert {state.get('marker')!r} cannot be loaded into alert {self.marker!r}."
            )
        self.n_values, self.wait, self.armed = state["n_values"], state["wait"], state["armed"]
        self.best, self.first = state["best"], state["first"]
        self.recent = deque(state["recent"], maxlen=self.window)
        # standard errors were added later: older checkpoints have none (reference SE unknown)
        self.best_se, self.first_se = state.get("best_se"), state.get("first_se")
        recent_se = state.get("recent_se") or [None] * len(self.recent)
        self.recent_se = deque(recent_se, maxlen=self.window)

    def __repr__(self) -> str:
        parts = [repr(self.marker)]
        for name in ("threshold", "relative_drop", "min_standard_errors"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        parts += [f"reference={self.reference!r}", f"patience={self.patience}", f"mode={self.mode!r}"]
        return f"MarkerAlert({', '.join(parts)})"
