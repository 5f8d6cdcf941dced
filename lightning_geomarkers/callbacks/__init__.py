"""Lightning glue: the ``GeometryMonitor`` callback, its alerts and marker-based checkpoint selection."""

from lightning_geomarkers.callbacks.alerts import AlertEvent, MarkerAlert
from lightning_geomarkers.callbacks.checkpoint import MarkerCheckpoint
from lightning_geomarkers.callbacks.monitor import GeometryMonitor

__all__ = ["AlertEvent", "GeometryMonitor", "MarkerAlert", "MarkerCheckpoint"]
