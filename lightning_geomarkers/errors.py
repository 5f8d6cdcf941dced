"""Warning classes shared by every layer of the package, and how an error is said in a skip reason (a leaf
module: imports nothing of ours)."""

from __future__ import annotations

import os
import sys
from types import FrameType

__all__ = [
    "GeomarkersWarning",
    "NonSeparableWarning",
    "SolverWarning",
    "GeometryWarning",
    "MonitorWarning",
    "error_reason",
    "outside_stacklevel",
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


#: Paths of the frames :func:`outside_stacklevel` skips: this package and torchmetrics (whose wrapper
#: sits between a user's ``update()`` and the metric's).
_INTERNAL_PATHS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,  # this package's directory (not a user folder
    # that happens to share its name)
    f"{os.sep}torchmetrics{os.sep}",
    f"{os.sep}torch{os.sep}nn{os.sep}modules{os.sep}",  # Module.__call__ of metric(x, y)
)
#: Where a helper thread's stack ends (its caller is not on it).
_THREAD_PATHS = (f"{os.sep}threading.py", f"concurrent{os.sep}futures{os.sep}")


def outside_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued by the caller of this function that points at the first frame
    outside this package (the user's call), however deep the package's own calls go (``glue_pairs`` ->
    the engine -> the diagnostics; torchmetrics' and ``nn.Module``'s call wrappers are skipped too). On a
    helper thread of ``workers``, whose stack does not hold the user's call, the warning's own line.

    Example:
        >>> outside_stacklevel() >= 1
        True
    """
    frame: FrameType | None = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame is not None and any(p in frame.f_code.co_filename for p in _INTERNAL_PATHS):
        frame, level = frame.f_back, level + 1
    if frame is None or any(p in frame.f_code.co_filename for p in _THREAD_PATHS):
        return 1  # a helper thread (``workers``): the user's call is on another stack; the package's line
    return level
