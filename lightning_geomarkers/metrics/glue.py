"""``GlueMarkers``: GLUE capacity, dimension, radius, utility and alignments as a torchmetrics Metric."""

from __future__ import annotations

from typing import Any

from lightning_geomarkers.metrics.suite import GeometryMarkers


class GlueMarkers(GeometryMarkers):
    """The seven GLUE markers of the sampled class manifolds: ``GeometryMarkers(markers="glue")``.

    ``compute()`` returns ``{"glue_capacity": ..., "glue_dimension": ..., ...}`` (0-dim float64 tensors).
    Keyword arguments: ``samples_per_class``, ``max_classes`` and ``seed`` of the bounded sample, and the
    protocol parameters of :func:`lightning_geomarkers.functional.geometry_markers` (``glue_protocol``,
    ``points_per_class``, ``n_pairs``, ``n_t``, ``center_features``, ``projection_dim``, ...). The signs
    differ between the GLUE markers (radius and two alignments: lower is better), so
    ``higher_is_better`` is None; see ``higher_is_better_per_marker``.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.metrics import GlueMarkers
        >>> metric = GlueMarkers(points_per_class=20, n_t=50)
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(30)
        >>> metric.update(3 * torch.randn(3, 64, generator=g)[y] + torch.randn(90, 64, generator=g), y)
        >>> sorted(metric.compute())[:2]
        ['glue_axis_alignment', 'glue_capacity']
        >>> metric.higher_is_better_per_marker["glue_radius"]
        False
    """

    def __init__(self, **kwargs: Any) -> None:
        if "markers" in kwargs:
            raise TypeError(
                "GlueMarkers computes the GLUE markers; for another selection use GeometryMarkers(markers=...)."
            )
        super().__init__("glue", **kwargs)
