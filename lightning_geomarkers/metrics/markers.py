"""Single-marker metric classes (participation ratio, ranks, NC1, intrinsic dimension, distances).

Each accumulates into a bounded per-class sample (``samples_per_class``, ``max_classes``, ``seed``: see
:class:`~lightning_geomarkers.metrics._base.LabelledFeatureMetric`) and computes its marker on it.
``higher_is_better`` is the literature's sign from :data:`lightning_geomarkers.functional.MARKERS`
(None where it flips between settings).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_geomarkers.functional.distances import within_class_distance
from lightning_geomarkers.functional.intrinsic_dimension import local_intrinsic_dimension
from lightning_geomarkers.functional.neural_collapse import neural_collapse
from lightning_geomarkers.functional.spectral import effective_rank, numerical_rank, participation_ratio
from lightning_geomarkers.functional.suite import MARKERS
from lightning_geomarkers.metrics._base import LabelledFeatureMetric
from lightning_geomarkers.utilities.checks import check_bool, check_lid, check_rtol

__all__ = [
    "ParticipationRatio",
    "NumericalRank",
    "EffectiveRank",
    "NeuralCollapse",
    "LocalIntrinsicDimension",
    "WithinClassDistance",
]


class ParticipationRatio(LabelledFeatureMetric):
    """PR = (sum lambda)^2 / sum lambda^2 of the covariance of the sampled features.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.metrics import ParticipationRatio
        >>> m = ParticipationRatio(samples_per_class=400)
        >>> m.update(torch.randn(500, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(500))
        >>> m.num_stored  # 400 of the 500 rows of the single class are kept
        400
        >>> 6.5 < float(m.compute()) <= 8
        True
    """

    marker = "participation_ratio"
    higher_is_better = MARKERS[marker].higher_is_better

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return participation_ratio(features)


class NumericalRank(LabelledFeatureMetric):
    """Number of singular values of the centred features >= ``rtol`` x the largest."""

    marker = "numerical_rank"
    higher_is_better = MARKERS[marker].higher_is_better

    def __init__(self, rtol: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rtol = check_rtol(rtol)  # at construction, not at the epoch's end

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return numerical_rank(features, rtol=self.rtol)


class EffectiveRank(LabelledFeatureMetric):
    """Roy & Vetterli effective rank of the centred features (``centered=False``: RankMe, uncentred)."""

    marker = "effective_rank"
    higher_is_better = MARKERS[marker].higher_is_better

    def __init__(self, centered: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.centered = check_bool(centered, "centered")

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return effective_rank(features, centered=self.centered)


class NeuralCollapse(LabelledFeatureMetric):
    """NC1 = (1/C) tr(Sigma_W Sigma_B^+); higher means less collapse (the sign is setting-dependent)."""

    marker = "nc1"
    higher_is_better = MARKERS[marker].higher_is_better

    def __init__(self, rtol: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rtol = check_rtol(rtol)  # at construction, not at the epoch's end

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return neural_collapse(features, labels, rtol=self.rtol)


class LocalIntrinsicDimension(LabelledFeatureMetric):
    """Levina-Bickel MLE local intrinsic dimension with ``k`` neighbours (``method="twonn"``: TwoNN)."""

    marker = "lid"  # "lid_twonn" with method="twonn": the same sign
    higher_is_better = MARKERS[marker].higher_is_better

    def __init__(self, k: int = 20, method: str = "mle", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k, self.method = check_lid(k, method)

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return local_intrinsic_dimension(features, k=self.k, method=self.method)


class WithinClassDistance(LabelledFeatureMetric):
    """Mean pairwise Euclidean distance within a class, averaged over classes."""

    marker = "within_class_distance"
    higher_is_better = MARKERS[marker].higher_is_better

    def _compute(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return within_class_distance(features, labels)
