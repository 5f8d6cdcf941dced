"""Independent reference implementations, for tests and benchmarks (not used by the package itself)."""

from lightning_geomarkers.testing.reference import reference_glue

__all__ = ["reference_glue"]
