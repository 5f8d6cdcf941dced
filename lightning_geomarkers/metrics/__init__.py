"""Stateful ``torchmetrics.Metric`` classes: the bounded per-class sample and the markers computed on it.

:class:`PerClassSample` is the one state layer: a bounded, seeded, partition-invariant per-class sample
(bottom-k by :func:`sample_keys`) that torchmetrics gathers under DDP. The marker classes accumulate into
it (usable in any ``validation_step``), and ``GeometryMonitor`` holds one per monitored layer.
"""

from lightning_geomarkers.metrics.glue import GlueMarkers
from lightning_geomarkers.metrics.markers import (
    EffectiveRank,
    LocalIntrinsicDimension,
    NeuralCollapse,
    NumericalRank,
    ParticipationRatio,
    WithinClassDistance,
)
from lightning_geomarkers.metrics.sample import PerClassSample, class_priority, sample_keys
from lightning_geomarkers.metrics.suite import GeometryMarkers

__all__ = [
    "EffectiveRank",
    "GeometryMarkers",
    "GlueMarkers",
    "LocalIntrinsicDimension",
    "NeuralCollapse",
    "NumericalRank",
    "ParticipationRatio",
    "PerClassSample",
    "WithinClassDistance",
    "class_priority",
    "sample_keys",
]
