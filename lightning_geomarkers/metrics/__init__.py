"""Stateful ``torchmetrics.Metric`` classes built on the functional layer (usable in any validation_step)."""

from lightning_geomarkers.metrics.glue import GlueMarkers
from lightning_geomarkers.metrics.markers import (
    EffectiveRank,
    LocalIntrinsicDimension,
    NeuralCollapse,
    NumericalRank,
    ParticipationRatio,
    WithinClassDistance,
)
from lightning_geomarkers.metrics.suite import GeometryMarkers

__all__ = [
    "EffectiveRank",
    "GeometryMarkers",
    "GlueMarkers",
    "LocalIntrinsicDimension",
    "NeuralCollapse",
    "NumericalRank",
    "ParticipationRatio",
    "WithinClassDistance",
]
