"""Preprocessing of pooled features before the geometry markers (``docs/markers.md`` section 5.3).

Features are ``(S, N)``: one row per sample. Three steps are provided:

* :func:`center` -- subtract the global mean row (ReLU features all lie in the positive orthant, so
  homogeneous hyperplanes and spectra need centred data);
* :func:`random_projection` -- an optional Gaussian random projection when ``N`` is large;
* :func:`per_class_subsample` -- a fixed number of points per class (the ``M`` of the GLUE protocols).

Random draws are made on the CPU from :func:`~lightning_geomarkers.utilities.seeds.as_generator`
and then moved, so results do not depend on the compute device.

The private helpers at the bottom (``_scaled64``, ``_centered64``) are shared by the
marker modules of this package: validation of a lone feature matrix and an overflow/underflow-safe float64
working copy.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_geomarkers.utilities.checks import (
    all_finite,
    check_features,
    check_features_labels,
    check_labels,
    check_positive_int,
)
from lightning_geomarkers.utilities.seeds import as_generator
from lightning_geomarkers.utilities.threads import SharedWork, ieee_float32_matmul

__all__ = ["center", "random_projection", "per_class_subsample"]


def center(features: Any) -> torch.Tensor:
    r"""Subtract the global mean row.

    .. math:: \tilde x_i = x_i - \frac{1}{S} \sum_{j=1}^{S} x_j

    The mean is accumulated in float64 (after subtracting the first row, so that exactly constant
    columns become exactly zero) and the result is cast back to the input's dtype. Works in 16 MiB float64
    row blocks: the only full-size allocation is the result.

    Args:
        features: ``(S, N)`` tensor or numpy array, rows are samples. Integer input is converted to
            float64 (exact up to 2**53).

    Returns:
        ``(S, N)`` tensor, same dtype and device as ``features``, with column means (numerically) zero.

    Raises:
        ValueError: ``features`` is not 2-D, is empty, holds NaN/Inf, or is so large that the centred
            values overflow the dtype.

    Example:
        >>> import torch
        >>> center(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([[-1., -2.],
                [ 1.,  2.]])
    """
    x = check_features(features)
    blocks = _Blocks(x, centered=True)
    out = torch.empty_like(x)
    step = _rows_per_block(x.shape[1])
    for start in range(0, x.shape[0], step):
        sl = slice(start, start + step)
        out[sl] = _unscale(blocks.block(sl, reuse=True), blocks.shift).to(x.dtype)
    if not all_finite(out):
        raise ValueError(
            f"Centring overflowed {x.dtype}: `features` values are too large (max |x| = "
            f"{float(x.abs().max()):.3g}). Rescale the features (e.g. divide by their norm) first."
        )
    return out


def random_projection(
    features: Any, out_dim: int, *, generator: torch.Generator | int | None = None
) -> torch.Tensor:
    r"""Project features to ``out_dim`` dimensions with a Gaussian random matrix.

    .. math:: Y = X R, \qquad R \in \mathbb{R}^{N \times d},\quad R_{ij} \sim \mathcal{N}(0, 1/d)

    so that :math:`\mathbb{E}\,\|x R\|^2 = \|x\|^2` (Johnson-Lindenstrauss). ``R`` is drawn in float64 on
    the CPU from ``generator`` and then moved to the features' device and dtype, so a fixed seed gives the
    same projection on every device and for every dtype.

    If ``N <= out_dim`` nothing is projected: ``features`` is returned unchanged (as a tensor; numpy input
    is converted) and the generator is not advanced.

    Args:
        features: ``(S, N)`` tensor or numpy array.
        out_dim: target dimension ``d >= 1`` (the paper's authors use 1000 when ``N > 1000``).
        generator: CPU ``torch.Generator``, an int seed, or ``None`` for the global torch RNG.

    Returns:
        ``(S, out_dim)`` tensor (or the ``(S, N)`` input when ``N <= out_dim``), same dtype and device.

    Raises:
        ValueError: bad shape, NaN/Inf, ``out_dim < 1``, or a projection that overflows the dtype.
        TypeError: ``out_dim`` is not an integer or ``generator`` is of the wrong type.

    Example:
        >>> import torch
        >>> x = torch.randn(8, 64)
        >>> random_projection(x, 16, generator=0).shape
        torch.Size([8, 16])
        >>> torch.equal(random_projection(x, 128, generator=0), x)  # N <= out_dim: unchanged
        True
    """
    x = check_features(features)
    out_dim = check_positive_int(out_dim, "out_dim")
    g = as_generator(generator)
    n_features = x.shape[1]
    if n_features <= out_dim:
        return x
    proj = torch.randn(n_features, out_dim, generator=g, dtype=torch.float64, device="cpu") / math.sqrt(
        out_dim
    )
    work = _projection_dtype(x)
    out = (x.to(work) @ proj.to(device=x.device, dtype=work)).to(x.dtype)
    if not all_finite(out):
        raise ValueError(
            f"The random projection overflowed {x.dtype}: `features` values are too large. "
            "Rescale the features (or cast them to float64) first."
        )
    return out


def _projection_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projection's matmul runs in: the features' own, except float32 where torch allows a
    TF32/bf16 shortcut for float32 matmuls (:func:`~lightning_geomarkers.utilities.ieee_float32_matmul`):
    then float64, so that the projected features (and the markers) do not depend on that setting (TF32
    moved the markers by up to 1e-5 relative in a CPU emulation, and would make GPU and CPU runs differ)."""
    if x.dtype == torch.float32 and not ieee_float32_matmul(x.device):
        return torch.float64
    return x.dtype


def _center_project(
    x: torch.Tensor, out_dim: int, *, centered: bool, generator: torch.Generator | int | None
) -> torch.Tensor:
    """``random_projection(center(x) if centered else x, out_dim, generator=generator)`` in row blocks.

    Same projection matrix (same draws from ``generator``) and the same per-row arithmetic, but the
    centred ``(S, N)`` copy never exists: each centred row block is projected at once, so the only
    full-size allocation is the ``(S, out_dim)`` result. ``x`` must already be validated.
    """
    return _CenterProjection(x, out_dim, centered=centered, generator=generator).result()


class _CenterProjection:
    """:func:`_center_project` as :class:`~lightning_geomarkers.utilities.threads.SharedWork`: its row
    blocks can be shared by several threads (``work.help()`` on idle ones, then :meth:`result`), with the
    same blocks, and so the same numbers, whoever computes them. Nothing is drawn or allocated before
    the first block is taken, and only the result is kept after :meth:`result`."""

    def __init__(
        self, x: torch.Tensor, out_dim: int, *, centered: bool, generator: torch.Generator | int | None
    ) -> None:
        self.x, self.out_dim, self.centered, self.generator = x, out_dim, centered, generator
        self.project = x.shape[1] > out_dim
        self.step = _rows_per_block(x.shape[1])
        # (projection matrix, centring blocks or None) once set up; ``out`` is the result being filled.
        self._state: tuple[torch.Tensor, _Blocks | None] | None = None
        self.out: torch.Tensor | None = None
        self.work = SharedWork(-(-x.shape[0] // self.step) if self.project else 1, self._block, self._setup)

    def _setup(self) -> None:
        x = self.x
        if self.project:
            g = as_generator(self.generator)
            proj = torch.randn(x.shape[1], self.out_dim, generator=g, dtype=torch.float64, device="cpu")
            proj = proj.div_(math.sqrt(self.out_dim)).to(device=x.device, dtype=_projection_dtype(x))
            self.out = x.new_empty((x.shape[0], self.out_dim))
            self._state = (proj, _Blocks(x, centered=True) if self.centered else None)

    def _block(self, i: int) -> None:
        x = self.x
        if self._state is None:  # no projection: one item
            self.out = center(x) if self.centered else x
            return
        proj, blocks = self._state
        assert self.out is not None  # allocated by _setup with the state
        sl = slice(i * self.step, (i + 1) * self.step)
        part = (
            _times_pow2_(blocks.block(sl, reuse=True), -blocks.shift).to(x.dtype)
            if blocks is not None
            else x[sl]
        )
        if proj.dtype == x.dtype:
            torch.matmul(part, proj, out=self.out[sl])  # a row slice of ``out`` is contiguous: no temporary
        else:  # float32 features where float32 matmuls may take a TF32/bf16 shortcut
            self.out[sl] = part.to(proj.dtype) @ proj

    def result(self) -> torch.Tensor:
        """The centred, projected features: the blocks not taken yet are computed on this thread."""
        self.work.finish()
        self._state = None
        out = self.out
        assert out is not None  # finish() ran every item (the input has rows) or raised
        if self.project and not all_finite(out):
            raise ValueError(
                f"Centring or the random projection overflowed {self.x.dtype}: `features` values are too "
                "large. Rescale the features (or cast them to float64) first."
            )
        return out


def per_class_subsample(
    features: Any,
    labels: Any,
    points_per_class: int,
    *,
    classes: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    generator: torch.Generator | int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    r"""Draw at most ``points_per_class`` rows of every class, without replacement.

    For class ``c`` with :math:`n_c` samples, :math:`M_c = \min(\text{points\_per\_class}, n_c)` rows are
    chosen by a CPU ``torch.randperm`` from ``generator`` (one permutation per class, in the order of
    ``classes``), so the draw is deterministic for a fixed seed and independent of the device.

    Args:
        features: ``(S, N)`` tensor or numpy array.
        labels: ``(S,)`` integer class labels.
        points_per_class: maximum number of points kept per class (``>= 1``).
        classes: the classes to draw, in this order. ``None``: every class present, sorted ascending.
            Every requested class must be present in ``labels``; duplicates are rejected.
        generator: CPU ``torch.Generator``, an int seed, or ``None`` for the global torch RNG.

    Returns:
        ``(manifolds, class_ids)``: a list of ``(M_c, N)`` tensors (same dtype/device as ``features``), one
        per class, and the ``(C,)`` int64 tensor of class ids in the same order (on the features' device).

    Raises:
        ValueError: bad shapes, NaN/Inf, mismatched lengths, ``points_per_class < 1``, an empty, duplicated
            or absent entry in ``classes``.
        TypeError: wrong argument types.

    Example:
        >>> import torch
        >>> x = torch.arange(12.0).reshape(6, 2)
        >>> y = torch.tensor([0, 0, 0, 1, 1, 2])
        >>> parts, ids = per_class_subsample(x, y, 2, generator=0)
        >>> [tuple(p.shape) for p in parts], ids.tolist()
        ([(2, 2), (2, 2), (1, 2)], [0, 1, 2])
    """
    x, y = check_features_labels(features, labels)
    points_per_class = check_positive_int(points_per_class, "points_per_class")
    g = as_generator(generator)
    present = torch.unique(y)
    if classes is None:
        class_ids = present
    else:
        class_ids = _as_class_ids(classes).to(y.device)
        missing = sorted(set(class_ids.tolist()) - set(present.tolist()))
        if missing:
            raise ValueError(
                f"Requested classes {missing} do not occur in `labels` (present: {present.tolist()}). "
                "Pass only classes that have samples, or classes=None for all of them."
            )
    parts = []
    for idx in _class_rows(y, class_ids):
        m = min(points_per_class, idx.numel())
        perm = torch.randperm(idx.numel(), generator=g, device="cpu")[:m].to(idx.device)
        parts.append(x[idx[perm]])
    return parts, class_ids


# ----------------------------------------------------------------------------------------------------
# Private helpers shared by the marker modules.
# ----------------------------------------------------------------------------------------------------


def _class_rows(y: torch.Tensor, classes: torch.Tensor) -> list[torch.Tensor]:
    """For each class of ``classes`` (in that order), the ascending indices of its rows in ``y``: the same
    as ``torch.nonzero(y == c)`` per class, from one stable sort of ``y`` instead of one pass over ``y`` per
    class (O(S log S) instead of O(C S): 20,000 classes took 2.8 s in the within-class distance)."""
    order = torch.argsort(y, stable=True)
    sorted_y = y[order]
    lo = torch.searchsorted(sorted_y, classes.to(y.device), right=False).tolist()
    hi = torch.searchsorted(sorted_y, classes.to(y.device), right=True).tolist()
    return [order[a:b] for a, b in zip(lo, hi, strict=True)]


def _as_class_ids(classes: Any) -> torch.Tensor:
    """Validate a ``classes`` argument: a non-empty 1-D sequence of distinct integers (``check_labels``)."""
    t = check_labels(classes, name="`classes`", device="cpu")
    if t.numel() == 0:
        raise ValueError("`classes` must be a non-empty 1-D sequence of class ids, got an empty one.")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"`classes` contains duplicates ({t.tolist()}); list every class once.")
    return t


def _times_pow2(t: torch.Tensor, shift: int) -> torch.Tensor:
    """``t * 2**shift``, in two steps so that no factor overflows a float64 (``|shift|`` can reach 1074)."""
    if shift == 0:
        return t
    half = shift // 2
    return t * math.ldexp(1.0, half) * math.ldexp(1.0, shift - half)


def _scaled64(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Float64 copy of ``x`` multiplied by a power of two so that ``max |x|`` lies in ``[0.5, 1)``.

    Returns ``(scaled, shift)`` with ``scaled = x * 2**shift``. Scaling by a power of two is exact (up to
    underflow of entries far below the maximum) and keeps squares and Gram matrices of any finite input
    clear of overflow and underflow. All-zero input is returned unscaled (``shift = 0``).
    """
    x64 = x.to(torch.float64)
    peak = float(x64.abs().max()) if x64.numel() else 0.0
    if peak == 0.0:
        return x64, 0
    shift = -math.frexp(peak)[1]
    return _times_pow2(x64, shift), shift


def _unscale(t: torch.Tensor, shift: int) -> torch.Tensor:
    """Undo :func:`_scaled64`: multiply by ``2**-shift``."""
    return _times_pow2(t, -shift)


def _center_scaled(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The one centring rule: ``x`` scaled to float64 by a power of two (:func:`_scaled64`), minus its column
    means, and the ``shift`` that :func:`_unscale` undoes. The first row is subtracted before the mean, so
    exactly constant columns centre to exactly zero."""
    xs, shift = _scaled64(x)
    shifted = xs - xs[:1]
    return shifted - shifted.mean(dim=0, keepdim=True), shift


def _centered64(x: torch.Tensor) -> torch.Tensor:
    """Centred float64 working copy of ``x`` with ``max |x|`` in ``[0.5, 1)`` (or exactly zero).

    Only for scale-invariant markers: the overall scale is not preserved.
    """
    return _scaled64(_center_scaled(x)[0])[0]


# Float64 elements of one temporary working block (16 MiB). Blocks stay below glibc's 32 MiB mmap
# threshold and are reused in shape, so the allocator recycles them instead of growing the heap.
_BLOCK_ELEMENTS = 2**21


def _block_elements() -> int:
    """The block budget, read at call time (tests shrink it to check that blocking changes nothing)."""
    return _BLOCK_ELEMENTS


def _rows_per_block(n_cols: int) -> int:
    """Rows of an ``(rows, n_cols)`` float64 block within the block budget (at least 1)."""
    return max(1, _block_elements() // max(1, n_cols))


def _pow2_shift(peak: float) -> int:
    """Power-of-two exponent that brings ``peak > 0`` into ``[0.5, 1)`` (0 for ``peak == 0``)."""
    return 0 if peak == 0.0 else -math.frexp(peak)[1]


def _safe_shift(peak: float) -> int:
    """0 when ``peak`` lies in ``[2**-300, 2**300]`` (squares and their sums over any realistic length
    stay clear of float64 overflow and underflow), else :func:`_pow2_shift`. Scaling by a power of two
    changes no rounding, so skipping it where it is not needed gives bit-identical results, faster."""
    return 0 if peak == 0.0 or 2.0**-300 <= peak <= 2.0**300 else _pow2_shift(peak)


def _abs_peak(x: torch.Tensor) -> float:
    """``max |x|`` without an ``|x|``-sized temporary."""
    low, high = torch.aminmax(x)
    return max(-float(low), float(high))


class _Blocks:
    """Centred (or not), power-of-two-rescaled float64 blocks of ``x``, made on demand.

    The same values :func:`_centered64` (``centered=True``) or ``_scaled64(x)[0]`` (``centered=False``)
    would give, up to summation order in the mean, but block by block, so no full float64 copy of ``x``
    ever exists: ``block(rows, cols)`` costs one ``(rows, cols)`` float64 temporary. The first row is
    subtracted before the mean, so exactly constant columns centre to exactly zero. Values are rescaled by
    a power of two only where squares could overflow or underflow (``shift1`` for the raw values,
    ``shift2`` for the centred ones; see :func:`_safe_shift`).

    ``shift`` is the total power of two: values of the working blocks are ``(x - mean) * 2**shift``.

    ``block(..., reuse=True)`` writes a slice-indexed block into a buffer of the calling thread that the
    next such call overwrites: loops that hold one block at a time then touch the same memory again
    instead of fresh memory per block (16 MiB of page faults each; NC1 alone made about 20,000 faults
    per call at 5000 x 2048).
    """

    def __init__(self, x: torch.Tensor, *, centered: bool = True, rows: torch.Tensor | None = None) -> None:
        self.x = x
        self._scratch = threading.local()  # per thread: the buffer behind ``reuse=True`` blocks
        self.rows = rows  # optional index of the rows in use (e.g. the distinct points)
        self.n_rows = x.shape[0] if rows is None else rows.numel()
        self.n_cols = x.shape[1]
        self.shift1 = _safe_shift(_abs_peak(x))  # any power of two that avoids overflow will do
        self.centered = centered
        self.shift2 = 0
        if centered:
            step = _rows_per_block(self.n_cols)
            self._first = self._raw(slice(0, 1), slice(None))[0]
            total = torch.zeros(self.n_cols, dtype=torch.float64, device=x.device)
            spread = 0.0  # max |x - first|
            for start in range(0, self.n_rows, step):
                part = self._raw(slice(start, start + step), slice(None), reuse=True).sub_(self._first)
                spread = max(spread, _abs_peak(part))
                total += part.sum(dim=0)
            self._mean = total / self.n_rows
            # The centred peak lies in [spread / 2, 2 spread] (row 0 centres to -mean, and |mean| <= spread):
            # when that whole range needs no rescaling, the second pass that measures it is skipped.
            if spread != 0.0 and not _safe_shift(spread / 4) == _safe_shift(spread * 4) == 0:
                peak = 0.0
                for start in range(0, self.n_rows, step):
                    part = self._raw(slice(start, start + step), slice(None), reuse=True)
                    peak = max(peak, _abs_peak(part.sub_(self._first).sub_(self._mean)))
                self.shift2 = _safe_shift(peak)
        self.shift = self.shift1 + self.shift2

    def _raw(self, rows: slice | torch.Tensor, cols: slice, reuse: bool = False) -> torch.Tensor:
        """``x[rows, cols] * 2**shift1`` as a fresh float64 tensor (with ``reuse`` and slice rows: in this
        thread's scratch buffer, see the class docstring)."""
        if self.rows is not None:
            rows = self.rows[rows]
        if isinstance(rows, torch.Tensor):  # a gather is already a fresh tensor
            part = self.x.index_select(0, rows)[:, cols].to(torch.float64)
        elif reuse:
            src = self.x[rows, cols]
            part = self._buffer(src.numel())[: src.numel()].view(src.shape).copy_(src)
        else:
            part = self.x[rows, cols].to(torch.float64, copy=True)
        return _times_pow2_(part, self.shift1)

    def _buffer(self, n: int) -> torch.Tensor:
        """This thread's float64 scratch of at least ``n`` elements (grown when a larger block comes)."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.numel() < n:
            buf = self._scratch.buf = torch.empty(n, dtype=torch.float64, device=self.x.device)
        return buf

    def raw_difference(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``(x[first] - x[second]) * 2**shift1`` in float64 (a fresh ``(len(first), N)`` tensor).

        The same numbers as ``_raw(first) - _raw(second)``: the rows are converted to float64 exactly and
        subtracted in float64, with one temporary fewer (the second gather is converted inside the
        subtraction). ``first`` and ``second`` index the rows in use (``rows``), like :meth:`block`.
        """
        if self.rows is not None:
            first, second = self.rows[first], self.rows[second]
        part = self.x.index_select(0, first).to(torch.float64)
        other = self.x.index_select(0, second)
        if self.shift1:  # scale before subtracting, as _raw does (float64 inputs near the overflow limit)
            _times_pow2_(part, self.shift1)
            other = _times_pow2_(other.to(torch.float64), self.shift1)
        return part.sub_(other)

    def block(
        self, rows: slice | torch.Tensor, cols: slice = slice(None), *, reuse: bool = False
    ) -> torch.Tensor:
        """Working block ``(x[rows, cols] - mean) * 2**shift`` in float64: a fresh tensor, or with ``reuse``
        (slice rows) one that this thread's next ``reuse`` block overwrites."""
        part = self._raw(rows, cols, reuse)
        if self.centered:
            part.sub_(self._first[cols]).sub_(self._mean[cols])
        return _times_pow2_(part, self.shift2)


def _times_pow2_(t: torch.Tensor, shift: int) -> torch.Tensor:
    """In-place ``t *= 2**shift`` in two exact steps (see :func:`_times_pow2`)."""
    if shift:
        half = shift // 2
        t.mul_(math.ldexp(1.0, half)).mul_(math.ldexp(1.0, shift - half))
    return t


def _gram64(blocks: _Blocks, *, mirror: bool = True) -> torch.Tensor:
    """Gram matrix of the working matrix ``W`` of ``blocks`` on its smaller side, accumulated in blocks.

    ``W^T W`` (``N x N``) when ``S > N``, else ``W W^T`` (``S x S``): the same non-zero eigenvalues, at
    ``min(S, N)^2`` memory plus one block, never a full float64 copy of the features. Only the upper
    triangle is multiplied, as one product per strip of :data:`_GRAM_TILE` rows (the strip times every
    column from its diagonal on: few, large products), and mirrored at the end (``mirror=False``: not
    mirrored, the lower triangle is not the Gram's).
    """
    n_rows, n_cols = blocks.n_rows, blocks.n_cols
    device = blocks.x.device
    n = min(n_rows, n_cols)
    gram = torch.zeros((n, n), dtype=torch.float64, device=device)
    tile = n if n <= 3 * _GRAM_TILE else _GRAM_TILE
    edges = list(range(0, n, tile))
    long_side, step = (
        (n_rows, _rows_per_block(n_cols)) if n_rows > n_cols else (n_cols, _rows_per_block(n_rows))
    )
    for start in range(0, long_side, step):
        if n_rows > n_cols:
            part = blocks.block(slice(start, start + step), reuse=True)  # (rows, n): accumulate part^T part
        else:
            part = blocks.block(slice(None), slice(start, start + step), reuse=True).T  # (cols, n): the same
        for i in edges:
            gram[i : i + tile, i:].addmm_(part[:, i : i + tile].T, part[:, i:])
    # Without ``mirror`` only the upper triangle is meaningful (for ``eigvalsh`` of the transpose): no
    # mirrored copy, which costs a pass and a temporary as large as the Gram.
    return gram.triu_().add_(gram.triu(1).T) if mirror else gram


# Rows per strip of the Gram's upper triangle in :func:`_gram64` (fastest measured at n = 2048).
_GRAM_TILE = 256
