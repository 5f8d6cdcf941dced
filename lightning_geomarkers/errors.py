"""Warning classes shared by every layer of the package, and how an error is said in a skip reason (a leaf
module: imports nothing of ours)."""

from __future__ import annotations

__all__ = [
    "GeomarkersWarning",
    "NonSeparableWarning",
    "SolverWarning",
    "GeometryWarning",
    "MonitorWarning",
    "error_reason",
]


class GeomarkersWarning(UserWarning):
    """Base class of every warning raised by ``lightning_geomarkers``."""


class NonSeparableWarning(GeomarkersWarning):
    """Some GLUE probes were degenerate: the manifolds were not linearly separable for their dichotomy.

    Fix: use fewer points per class or fewer classes (roughly ``P * M <= 2 * r`` is needed for generic
    points, ``r`` the rank of the features: the feature dimension ``N`` at most).
    """


class SolverWarning(GeomarkersWarning):
    """The NNLS solver stopped before certifying optimality (see ``GlueResult.kkt_violation``)."""


class MonitorWarning(GeomarkersWarning):
    """The ``GeometryMonitor`` skipped a computation (bad features, too few samples, ...) and carried on."""


class GeometryWarning(GeomarkersWarning):
    """A ``MarkerAlert`` fired: a geometry marker crossed its threshold or dropped too far."""


def error_reason(err: BaseException) -> str:
    """How a skipped computation's error is said: its message, prefixed with its type unless it is one of
    the ``ValueError``/``RuntimeError`` this package raises with a full sentence (an out-of-memory error,
    a ``TypeError`` or an ``AssertionError`` without a message would say nothing otherwise).

    Example:
        >>> error_reason(ValueError("fewer than 2 classes")), error_reason(MemoryError())
        ('fewer than 2 classes', 'MemoryError')
    """
    text = str(err)
    if type(err) in (ValueError, RuntimeError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
