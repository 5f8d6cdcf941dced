"""``GeometryMarkers``: the whole marker suite as one torchmetrics Metric."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from lightning_geomarkers.functional.suite import geometry_markers, resolve_marker_names
from lightning_geomarkers.metrics._base import LabelledFeatureMetric


class GeometryMarkers(LabelledFeatureMetric):
    """Every selected marker of :data:`lightning_geomarkers.functional.MARKERS` on the accumulated
    features; ``compute()`` returns a dict ``{marker: 0-dim tensor}``.

    Args:
        markers: "all", "glue", or a list of marker names.
        seed: fixes every random draw (subsamples, probes, projections).
        **kwargs: protocol parameters of :func:`lightning_geomarkers.functional.geometry_markers`, plus
            the usual torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.metrics import GeometryMarkers
        >>> metric = GeometryMarkers(markers=["glue_dimension", "nc1"], n_t=50, points_per_class=20)
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(30)
        >>> metric.update(3 * torch.randn(3, 16, generator=g)[y] + torch.randn(90, 16, generator=g), y)
        >>> sorted(metric.compute())
        ['glue_dimension', 'nc1']
    """

    def __init__(self, markers: str | Iterable[str] = "all", *, seed: int = 0, **kwargs: Any) -> None:
        metric_keys = {
            "compute_on_cpu",
            "dist_sync_on_step",
            "process_group",
            "dist_sync_fn",
            "sync_on_compute",
        }
        super().__init__(seed=seed, **{k: v for k, v in kwargs.items() if k in metric_keys})
        self.markers = resolve_marker_names(markers)
        self.protocol = {k: v for k, v in kwargs.items() if k not in metric_keys}
        allowed = set(inspect.signature(geometry_markers).parameters) - {
            "features",
            "labels",
            "markers",
            "generator",
        }
        unknown = sorted(set(self.protocol) - allowed)
        if unknown:
            raise TypeError(
                f"Unknown argument(s) {unknown} for {type(self).__name__}; valid: {sorted(allowed)}."
            )

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return geometry_markers(
            features, labels, markers=self.markers, generator=self.seed, **self.protocol
        ).values
