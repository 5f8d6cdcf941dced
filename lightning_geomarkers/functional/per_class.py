"""Per-class view of a pairs-protocol GLUE result: which class's manifold is collapsing.

The pairs protocol (:func:`~lightning_geomarkers.functional.glue_pairs`) solves one GLUE problem per
sampled class pair and keeps the per-pair values (``GluePairsResult.per_pair[name]``, shape
``(n_pairs,)``) with the pair's class ids (``GluePairsResult.pairs``, shape ``(n_pairs, 2)``). From them:

* **pair-averaged per-class markers**: for class ``c`` and marker ``m``,

      m_c = mean over the sampled pairs {c, d} that contain c of m({c, d})

  (NaN pair values, e.g. a radius undefined for point-like manifolds, are left out of the mean; a class
  whose pairs are all NaN gets NaN). With ``n_pairs=None`` (every pair) each class is averaged over its
  C - 1 pairs; with fewer pairs some classes appear in few pairs, and their values are noisier:
  ``PerClassGlue.n_pairs`` says how many.
* **the pairwise matrix** of one marker: ``matrix[i, j] = matrix[j, i] = m({c_i, c_j})``, NaN where the
  pair was not sampled (and on the diagonal). For capacity it shows which pairs of classes are hard to
  separate (low capacity: tangled manifolds).

The joint protocol solves one problem with all classes together and has no per-class decomposition, so
there is no per-class view for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_geomarkers.functional.glue import GLUE_MARKERS

__all__ = ["PER_CLASS_MARKERS", "PerClassGlue", "per_class_glue", "pairwise_matrix"]

#: The markers with a per-class view by default (the alignments are pair properties too, but rarely read
#: per class).
PER_CLASS_MARKERS: tuple[str, ...] = ("capacity", "dimension", "radius", "utility")


def _pairs_and_values(result: Any, markers: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Validate ``result.pairs`` / ``result.per_pair`` and return them (pairs int64, values float64, CPU)."""
    pairs = getattr(result, "pairs", None)
    per_pair = getattr(result, "per_pair", None)
    if not isinstance(pairs, torch.Tensor) or not isinstance(per_pair, dict):
        raise TypeError(
            f"Expected a pairs-protocol result (GluePairsResult, with `pairs` and `per_pair`), got "
            f"{type(result).__name__}. The joint protocol has no per-class decomposition: use "
            "glue_protocol='pairs' for a per-class view."
        )
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"`pairs` must have shape (n_pairs, 2), got {tuple(pairs.shape)}.")
    pairs = pairs.detach().to("cpu", torch.int64)
    if bool((pairs[:, 0] == pairs[:, 1]).any()):
        raise ValueError("`pairs` contains a class paired with itself; each pair must name two classes.")
    values: dict[str, torch.Tensor] = {}
    for name in markers:
        if name not in GLUE_MARKERS:
            raise ValueError(f"Unknown GLUE marker {name!r}; choose from {list(GLUE_MARKERS)}.")
        if name not in per_pair:
            raise ValueError(
                f"The result has no per-pair values for {name!r} (available: {sorted(per_pair)})."
            )
        v = per_pair[name].detach().to("cpu", torch.float64).reshape(-1)
        if v.numel() != pairs.shape[0]:
            raise ValueError(
                f"`per_pair[{name!r}]` has {v.numel()} values for {pairs.shape[0]} pairs; they must match."
            )
        values[name] = v
    return pairs, values


def _nan_mean_by_index(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of ``values`` grouped by ``index`` (both flat), NaN values left out; NaN for empty groups."""
    finite = ~torch.isnan(values)
    sums = torch.zeros(size, dtype=torch.float64, device=values.device).index_add_(
        0, index, torch.where(finite, values, 0.0)
    )
    counts = torch.zeros(size, dtype=torch.float64, device=values.device).index_add_(
        0, index, finite.to(torch.float64)
    )
    return torch.where(counts > 0, sums / counts.clamp(min=1), math.nan)


def pairwise_matrix(result: Any, marker: str = "capacity") -> tuple[torch.Tensor, torch.Tensor]:
    """The class-by-class matrix of one pairs-protocol marker.

    ``matrix[i, j] = matrix[j, i]`` is the marker of the GLUE problem of the pair ``{classes[i],
    classes[j]}``; NaN where the pair was not sampled, and on the diagonal. A pair listed twice gets the
    mean of its (non-NaN) values.

    Args:
        result: a :class:`~lightning_geomarkers.functional.GluePairsResult` (``pairs`` (n_pairs, 2) class
            ids, ``per_pair[marker]`` (n_pairs,) values).
        marker: a GLUE marker name without the ``glue_`` prefix (``"capacity"``, ``"dimension"``, ...).

    Returns:
        ``(classes, matrix)``: ``(C,)`` int64 class ids (ascending, every class in some pair) and the
        ``(C, C)`` float64 matrix, on the CPU.

    Raises:
        TypeError: ``result`` is not a pairs-protocol result (a joint-protocol ``GlueResult`` has no pairs).
        ValueError: unknown marker, or inconsistent ``pairs`` / ``per_pair`` shapes.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> res = SimpleNamespace(pairs=torch.tensor([[0, 1], [1, 3]]),
        ...                       per_pair={"capacity": torch.tensor([2.0, 4.0])})
        >>> classes, m = pairwise_matrix(res, "capacity")
        >>> classes.tolist()
        [0, 1, 3]
        >>> m.tolist()
        [[nan, 2.0, nan], [2.0, nan, 4.0], [nan, 4.0, nan]]
    """
    pairs, values = _pairs_and_values(result, [marker])
    classes = torch.unique(pairs)
    return classes, _pair_matrix(torch.searchsorted(classes, pairs), values[marker], classes.numel())


def _pair_matrix(idx: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) symmetric matrix of the values ``v`` of the pairs ``idx`` (positions in the classes, (pairs,
    2)), NaN-averaged over repeated pairs, NaN where no pair was measured and on the diagonal."""
    flat = torch.cat([idx[:, 0] * n + idx[:, 1], idx[:, 1] * n + idx[:, 0]])
    matrix = _nan_mean_by_index(torch.cat([v, v]), flat, n * n).reshape(n, n)
    matrix.fill_diagonal_(math.nan)
    return matrix


@dataclass
class PerClassGlue:
    """Pair-averaged GLUE markers per class, and the pairwise capacity matrix.

    Attributes:
        classes: ``(C,)`` int64 class ids, ascending (the classes that appear in a sampled pair).
        n_pairs: ``(C,)`` int64, how many sampled pairs contain each class.
        values: marker name (without ``glue_``) -> ``(C,)`` float64 pair-averaged values (NaN where all of a
            class's pair values are NaN).
        capacity_matrix: ``(C, C)`` float64 pairwise capacity (see :func:`pairwise_matrix`), or None where
            ``per_class_glue`` was asked not to build it (``max_matrix_classes``).
    """

    classes: torch.Tensor
    n_pairs: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    capacity_matrix: torch.Tensor | None = None

    def to_dict(self) -> dict[int, dict[str, float]]:
        """``{class_id: {"glue_<marker>": value, ..., "n_pairs": count}}`` with plain Python numbers.

        NaN values are left out (a marker undefined for a class has no entry), so the dict can be logged
        or saved as is.
        """
        out: dict[int, dict[str, float]] = {}
        for i, c in enumerate(self.classes.tolist()):
            entry: dict[str, float] = {}
            for name, v in self.values.items():
                value = float(v[i])
                if math.isfinite(value):
                    entry[f"glue_{name}"] = value
            entry["n_pairs"] = int(self.n_pairs[i])
            out[int(c)] = entry
        return out


def per_class_glue(
    result: Any, markers: Sequence[str] = PER_CLASS_MARKERS, *, max_matrix_classes: int | None = None
) -> PerClassGlue:
    """Per-class pair-averaged GLUE markers and the pairwise capacity matrix of a pairs-protocol result.

    For class ``c``: ``m_c = mean_{pairs p containing c} per_pair[m][p]`` (NaN values left out), for each
    marker ``m`` in ``markers``; ``n_pairs[c]`` counts the pairs containing ``c``. The capacity matrix
    is :func:`pairwise_matrix` of ``"capacity"``.

    Args:
        result: a :class:`~lightning_geomarkers.functional.GluePairsResult`, e.g. ``report.glue`` of
            :func:`~lightning_geomarkers.functional.geometry_markers` with ``glue_protocol="pairs"``.
        markers: GLUE marker names without the ``glue_`` prefix (default: capacity, dimension, radius,
            utility).
        max_matrix_classes: build the (C, C) capacity matrix only up to this many classes (``None``: always);
            above it ``capacity_matrix`` is None. The matrix takes ``8 C^2`` bytes (and about four times
            that while it is built: 5 GB at 12,500 classes) for at most ``n_pairs`` measured entries.

    Returns:
        :class:`PerClassGlue` (CPU tensors).

    Raises:
        TypeError: ``result`` is not a pairs-protocol result (the joint protocol has no per-class view).
        ValueError: unknown marker, or inconsistent ``pairs`` / ``per_pair`` shapes.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.functional import glue_pairs
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(20)
        >>> x = 4 * torch.randn(3, 32, generator=g)[y] + torch.randn(60, 32, generator=g)
        >>> res = glue_pairs(x, y, points_per_class=10, n_t=20, generator=0)
        >>> view = per_class_glue(res)
        >>> view.classes.tolist(), view.n_pairs.tolist()
        ([0, 1, 2], [2, 2, 2])
        >>> # class 0 is in pairs {0, 1} and {0, 2}: its dimension is the mean of theirs
        >>> d = res.per_pair["dimension"]
        >>> bool(torch.isclose(view.values["dimension"][0], (d[0] + d[1]) / 2))
        True
        >>> sorted(view.to_dict()[0])
        ['glue_capacity', 'glue_dimension', 'glue_radius', 'glue_utility', 'n_pairs']
    """
    pairs, values = _pairs_and_values(result, list(markers) + ["capacity"])
    classes = torch.unique(pairs)
    n = classes.numel()
    pair_idx = torch.searchsorted(classes, pairs)
    idx = pair_idx.reshape(-1)  # both members of every pair
    n_pairs = torch.bincount(idx, minlength=n)
    per_class = {
        name: _nan_mean_by_index(values[name].repeat_interleave(2), idx, n) for name in dict.fromkeys(markers)
    }
    build = max_matrix_classes is None or n <= max_matrix_classes
    matrix = _pair_matrix(pair_idx, values["capacity"], n) if build else None
    return PerClassGlue(classes=classes, n_pairs=n_pairs, values=per_class, capacity_matrix=matrix)
