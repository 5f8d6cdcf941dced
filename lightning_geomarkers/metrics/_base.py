"""Shared state of the metric classes: labelled features accumulated into a bounded :class:`PerClassSample`."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from lightning_geomarkers.metrics.sample import PerClassSample
from lightning_geomarkers.utilities.checks import as_tensor, check_finite


class LabelledFeatureMetric(PerClassSample):
    """Accumulates (features, labels) into a bounded per-class sample; subclasses implement :meth:`_compute`.

    The state is that of :class:`PerClassSample`: per class the ``samples_per_class`` samples with the
    smallest seeded keys, from at most ``max_classes`` classes, so memory stays bounded however many
    batches are passed to ``update``, and the sample does not depend on batching, order or the split across
    DDP ranks (``compute()`` gathers and re-selects). ``compute()`` sees the sample in its canonical (label,
    key) order.

    Args:
        samples_per_class: samples kept per class (>= 2). Default 50, as ``GeometryMonitor``.
        max_classes: at most this many classes (>= 2; a fixed seeded subset), or None for all. Default
            100, as ``GeometryMonitor``.
        seed: seeds the sample's keys and class subset (and, for the marker suite, every random draw).
        **kwargs: torchmetrics ``Metric`` options.

    ``update(features, labels, keys=None)``: ``keys`` are :func:`~lightning_geomarkers.metrics.sample_keys`
    of the raw inputs, so the same inputs are kept whatever the model's weights; by default the features
    themselves are hashed.
    """

    def __init__(
        self, *, samples_per_class: int = 50, max_classes: int | None = 100, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(samples_per_class, max_classes, seed=seed, **kwargs)

    def update(self, features: torch.Tensor, labels: Any, keys: torch.Tensor | None = None) -> None:
        """Add a batch: ``features`` (B, N) finite floats, ``labels`` (B,) integer classes.

        An empty ``(0, N)`` batch is accepted (it records N for a later DDP sync, as on a rank without
        data). Array-likes and integer features are converted to a floating tensor; shape, dtype and
        labels are checked once, by :class:`PerClassSample`.
        """
        x = as_tensor(features, "features")
        if x.ndim == 2 and x.shape[0] > 0:
            check_finite(x, "features")
        super().update(x, labels, keys)

    def forward(self, features: torch.Tensor, labels: Any, keys: torch.Tensor | None = None) -> None:
        """``metric(features, labels)``: add the batch exactly as :meth:`update`, and return None.

        The markers are defined on the accumulated sample (an epoch's), not on one batch, which may hold too
        few points or classes for them. torchmetrics' default ``forward`` computes the metric on the batch
        alone (here the whole marker computation, on every batch) and, where that raises, leaves only the
        batch in the state: the samples accumulated before would be lost. Call :meth:`compute` at the end
        of the epoch, or log the metric object with ``self.log(name, metric, on_step=False,
        on_epoch=True)``.

        Raises:
            torchmetrics.utilities.exceptions.TorchMetricsUserError: the states are synced (call
                ``unsync()`` first), as torchmetrics' own ``forward``.
        """
        if self._is_synced:
            raise TorchMetricsUserError(
                f"{type(self).__name__} is synced: call `unsync()` before passing more batches."
            )
        # In a MetricCollection's compute group the members share their list states; its forward calls
        # every member, so appending to the shared lists would add the batch once per member (n_seen
        # counted it that often). Each member appends to its own lists (the tensors stay shared).
        for name in ("features", "labels", "keys", "seen_classes", "seen_counts"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, list(value))
        self.update(features, labels, keys)
        self._forward_cache = None

    def compute(self) -> Any:
        features, labels, _ = self.state()
        if features.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before update(); pass features first.")
        return self._compute(features, labels)

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> Any:  # pragma: no cover
        raise NotImplementedError
