"""lightning-geomarkers: live representational-geometry markers for PyTorch Lightning."""

from lightning_geomarkers import functional
from lightning_geomarkers.errors import (
    GeomarkersWarning,
    GeometryWarning,
    MonitorWarning,
    NonSeparableWarning,
    SolverWarning,
)

__version__ = "0.1.0"

__all__ = [
    "functional",
    "GeomarkersWarning",
    "GeometryWarning",
    "MonitorWarning",
    "NonSeparableWarning",
    "SolverWarning",
    "__version__",
]
