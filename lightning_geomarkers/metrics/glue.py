"""``GlueMarkers``: GLUE capacity, dimension, radius, utility and alignments as a torchmetrics Metric."""

from __future__ import annotations

from typing import Any

from lightning_geomarkers.metrics.suite import GeometryMarkers


class GlueMarkers(GeometryMarkers):
    """The seven GLUE markers of the accumulated class manifolds: ``GeometryMarkers(markers="glue")``.

    ``compute()`` returns ``{"glue_capacity": ..., "glue_dimension": ..., ...}`` (0-dim float64 tensors).
    Keyword arguments are the protocol parameters of :func:`lightning_geomarkers.functional.geometry_markers`
    (``glue_protocol``, ``points_per_class``, ``n_pairs``, ``n_t``, ``center_features``,
    ``projection_dim``, ...); ``seed`` fixes every draw.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.metrics import GlueMarkers
        >>> metric = GlueMarkers(points_per_class=20, n_t=50)
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(30)
        >>> metric.update(3 * torch.randn(3, 64, generator=g)[y] + torch.randn(90, 64, generator=g), y)
        >>> sorted(metric.compute())[:2]
        ['glue_axis_alignment', 'glue_capacity']
    """

    higher_is_better = True

    def __init__(self, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__("glue", seed=seed, **kwargs)
