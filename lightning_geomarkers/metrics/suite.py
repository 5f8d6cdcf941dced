"""``GeometryMarkers``: the whole marker suite as one torchmetrics Metric."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from lightning_geomarkers.functional.suite import MARKERS, geometry_markers, resolve_marker_names
from lightning_geomarkers.metrics._base import LabelledFeatureMetric
from lightning_geomarkers.utilities.checks import check_protocol

_METRIC_OPTIONS = frozenset(
    {
        "compute_on_cpu",
        "dist_sync_on_step",
        "process_group",
        "dist_sync_fn",
        "distributed_available_fn",
        "sync_on_compute",
        "compute_with_cache",
    }
)


class GeometryMarkers(LabelledFeatureMetric):
    """Every selected marker of :data:`lightning_geomarkers.functional.MARKERS` on a bounded per-class
    sample of the features passed to ``update``; ``compute()`` returns a dict ``{marker: 0-dim tensor}``.

    The sample (see :class:`~lightning_geomarkers.metrics.PerClassSample`) keeps per class the
    ``samples_per_class`` samples with the smallest seeded keys, from at most ``max_classes`` classes, so
    memory is bounded and the result does not depend on batching, order or the DDP split. GLUE then draws
    ``points_per_class`` points per class from it (default: ``samples_per_class``), like ``GeometryMonitor``.

    The markers' signs differ (e.g. GLUE dimension: higher is better; GLUE radius: lower), so
    ``higher_is_better`` is None and :attr:`higher_is_better_per_marker` gives each selected marker's sign.

    Args:
        markers: "all", "glue", or a list of marker names.
        samples_per_class: samples kept per class (>= 2); default 50.
        max_classes: at most this many classes (>= 2, a fixed seeded subset; GLUE uses every kept class),
            None for all; default 100.
        seed: fixes the sample and every random draw (subsamples, probes, projections).
        **kwargs: protocol parameters of :func:`lightning_geomarkers.functional.geometry_markers`
            (``glue_protocol``, ``points_per_class``, ``n_pairs``, ``n_t``, ``dichotomies``,
            ``center_features``, ``projection_dim``, ``lid_k``, ``strict``), plus the usual torchmetrics
            ``Metric`` options.

    Raises:
        TypeError: an unknown keyword argument (the message lists the valid ones).
        ValueError: an unknown marker name.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.metrics import GeometryMarkers
        >>> metric = GeometryMarkers(markers=["glue_dimension", "nc1"], n_t=50, samples_per_class=20)
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(30)
        >>> metric.update(3 * torch.randn(3, 16, generator=g)[y] + torch.randn(90, 16, generator=g), y)
        >>> metric.num_stored  # 20 of the 30 samples of each class
        60
        >>> sorted(metric.compute())
        ['glue_dimension', 'nc1']
        >>> metric.higher_is_better, metric.higher_is_better_per_marker
        (None, {'glue_dimension': True, 'nc1': None})
    """

    higher_is_better = None

    def __init__(
        self,
        markers: str | Iterable[str] = "all",
        *,
        samples_per_class: int = 50,
        max_classes: int | None = 100,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            samples_per_class=samples_per_class,
            max_classes=max_classes,
            seed=seed,
            **{k: v for k, v in kwargs.items() if k in _METRIC_OPTIONS},
        )
        self.markers = resolve_marker_names(markers)
        self.protocol = {k: v for k, v in kwargs.items() if k not in _METRIC_OPTIONS}
        allowed = set(inspect.signature(geometry_markers).parameters) - {
            "features",
            "labels",
            "markers",
            "generator",
            "max_classes",
        }
        unknown = sorted(set(self.protocol) - allowed)
        if unknown:
            raise TypeError(
                f"Unknown argument(s) {unknown} for {type(self).__name__}; valid: "
                f"{sorted(allowed | {'samples_per_class', 'max_classes', 'seed'} | _METRIC_OPTIONS)}."
            )
        self.protocol.setdefault("points_per_class", self.samples_per_class)
        checked = set(inspect.signature(check_protocol).parameters)  # at construction, not at compute()
        check_protocol(**{k: v for k, v in self.protocol.items() if k in checked})

    @property
    def higher_is_better_per_marker(self) -> dict[str, bool | None]:
        """Each selected marker's sign from ``MARKERS`` (True: higher is better; None: setting-dependent)."""
        return {m: MARKERS[m].higher_is_better for m in self.markers}

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return geometry_markers(
            features, labels, markers=self.markers, generator=self.seed, **self.protocol
        ).values
