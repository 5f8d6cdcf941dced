"""Warning classes shared by every layer of the package (a leaf module: imports nothing of ours)."""

from __future__ import annotations

__all__ = [
    "GeomarkersWarning",
    "NonSeparableWarning",
    "SolverWarning",
    "GeometryWarning",
    "MonitorWarning",
]


class GeomarkersWarning(UserWarning):
    """Base class of every warning raised by ``lightning_geomarkers``."""


class NonSeparableWarning(GeomarkersWarning):
    """Some GLUE probes were degenerate: the manifolds were not linearly separable for their dichotomy.

    Fix: use fewer points per class, fewer classes, or a larger feature dimension (roughly
    ``P * M <= 2 * N`` is needed for generic points).
    """


class SolverWarning(GeomarkersWarning):
    """The NNLS solver stopped before certifying optimality (see ``GlueResult.kkt_violation``)."""


class MonitorWarning(GeomarkersWarning):
    """The ``GeometryMonitor`` skipped a computation (bad features, too few samples, ...) and carried on."""


class GeometryWarning(GeomarkersWarning):
    """A ``MarkerAlert`` fired: a geometry marker crossed its threshold or dropped too far."""
