"""lightning-geomarkers: live representational-geometry markers for PyTorch Lightning.

User surface: ``GeometryMonitor`` (the callback), ``MarkerAlert`` (early warnings), ``MarkerCheckpoint``
(checkpoint selection on markers); the layers below are ``metrics`` (torchmetrics classes) and
``functional`` (the math).
"""

from lightning_geomarkers import functional, metrics
from lightning_geomarkers.callbacks import AlertEvent, GeometryMonitor, MarkerAlert, MarkerCheckpoint
from lightning_geomarkers.errors import (
    GeomarkersWarning,
    GeometryWarning,
    MonitorWarning,
    NonSeparableWarning,
    SolverWarning,
)

__version__ = "0.1.0"

__all__ = [
    "AlertEvent",
    "GeomarkersWarning",
    "GeometryMonitor",
    "GeometryWarning",
    "MarkerAlert",
    "MarkerCheckpoint",
    "MonitorWarning",
    "NonSeparableWarning",
    "SolverWarning",
    "__version__",
    "functional",
    "metrics",
]
