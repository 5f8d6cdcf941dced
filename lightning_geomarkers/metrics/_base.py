"""Shared state handling of the metric classes: labelled features accumulated as ``cat`` states."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_geomarkers.functional._hashing import sample_keys
from lightning_geomarkers.utilities.checks import check_features_labels


class LabelledFeatureMetric(Metric):
    """Accumulates (features, labels) over ``update`` calls; subclasses implement :meth:`_compute`.

    States are lists concatenated across processes (``dist_reduce_fx="cat"``; torchmetrics pads uneven
    sizes when gathering). Before computing, samples are put in a canonical order, sorted by (label,
    exact hash of the feature row), so the result does not depend on how samples were split across
    ranks or batches. Memory grows with the samples passed to ``update``: feed a subsample for long
    validation sets (the ``GeometryMonitor`` callback does this for you).
    """

    is_differentiable = False
    full_state_update = False
    features: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __init__(self, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = int(seed)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``features`` (B, N), ``labels`` (B,) integer classes."""
        x, y = check_features_labels(features, labels)
        self.features.append(x.detach())
        self.labels.append(y.detach())

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        # A list before synchronisation; torchmetrics replaces it by one concatenated tensor after.
        empty = len(self.features) == 0 if isinstance(self.features, list) else self.features.numel() == 0
        if empty:
            raise ValueError(f"{type(self).__name__}.compute() called before update(); pass features first.")
        x = dim_zero_cat(self.features)
        y = dim_zero_cat(self.labels).long()
        keys = sample_keys(x, y, self.seed)
        order = torch.argsort(keys, stable=True)
        order = order[torch.argsort(y[order], stable=True)]
        return x[order], y[order]

    def compute(self) -> Any:
        return self._compute(*self._gathered())

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> Any:  # pragma: no cover
        raise NotImplementedError
