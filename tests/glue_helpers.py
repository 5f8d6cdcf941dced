"""GLUE helpers shared by the solver and marker tests."""

from __future__ import annotations

from typing import Any

import torch

from lightning_geomarkers.functional.glue import _glue_groups


def engine_with_probes(
    points: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, probes: torch.Tensor
) -> dict[str, Any]:
    """The batched engine behind ``glue_pairs`` on (B, P, M, N) ``points`` with explicit (B, n_t, N)
    ``probes`` and (B, n_t, P) dichotomies ``labels`` (the defaults of the public functions otherwise),
    so each group can be compared with the per-probe reference on the same probes."""
    return _glue_groups(points, mask, labels, probes=probes, generators=(), eigen_cutoff=1e-9, max_iter=None)
