"""Independent reference implementations and shared synthetic data, for tests and benchmarks (not used by
the package itself)."""

from lightning_geomarkers.testing.data import geometry_clouds
from lightning_geomarkers.testing.reference import reference_glue

__all__ = ["geometry_clouds", "reference_glue"]
