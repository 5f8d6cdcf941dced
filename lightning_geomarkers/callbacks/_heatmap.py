"""The monitor's per-class view: pair-averaged markers per class and a pairwise-capacity heat map image.

Rendering uses numpy only (no matplotlib): a viridis-like colormap by linear interpolation between
anchor colours, nearest-neighbour upscaling of the cells, a colour bar on the right, grey for pairs that
were not sampled. The image goes to TensorBoard with ``writer.add_image(..., dataformats="HWC")``; a text
summary next to it gives the class order and the colour scale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lightning_geomarkers.functional.per_class import PerClassGlue, per_class_glue
from lightning_geomarkers.functional.protocols import GluePairsResult

__all__ = ["HEATMAP_MAX_CLASSES", "class_view", "render_heatmap", "write_class_heatmap"]

#: The heat map is written for at most this many classes (a 50 x 50 grid is still readable).
HEATMAP_MAX_CLASSES = 50

# viridis at 0, 0.25, 0.5, 0.75, 1 (matplotlib's values, rounded)
_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_NAN_RGB = np.array([128, 128, 128], dtype=np.float64)
_GAP_RGB = np.array([255, 255, 255], dtype=np.float64)


def colormap(t: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (NaN allowed) to RGB in [0, 255]: linear interpolation between viridis anchors,
    grey for NaN. Shape ``t.shape + (3,)``, float64."""
    t = np.asarray(t, dtype=np.float64)
    nan = np.isnan(t)
    x = np.clip(np.where(nan, 0.0, t), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(_ANCHORS) - 2)
    frac = (x - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    rgb[nan] = _NAN_RGB
    return rgb


def render_heatmap(matrix: Any, *, cell: int | None = None, colorbar: bool = True) -> np.ndarray:
    """Render a (C, C) matrix (NaN = no value) as an ``(H, W, 3)`` uint8 image.

    Values are scaled linearly from the smallest finite value (dark purple) to the largest (yellow); a
    constant matrix is drawn mid-scale. Each cell is a ``cell x cell`` block (default: about 320 pixels in
    all, 2 to 32 per cell); a colour bar (top = largest) follows a white gap on the right.

    Example:
        >>> img = render_heatmap([[float("nan"), 1.0], [1.0, float("nan")]], cell=4)
        >>> img.shape, img.dtype.name
        ((8, 18, 3), 'uint8')
        >>> img[0, 0].tolist()  # a NaN cell is grey
        [128, 128, 128]
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"`matrix` must be 2-D, got shape {m.shape}.")
    n_rows, n_cols = m.shape
    if cell is None:
        cell = int(min(32, max(2, 320 // max(n_rows, n_cols, 1))))
    finite = np.isfinite(m)
    lo, hi = (float(m[finite].min()), float(m[finite].max())) if finite.any() else (0.0, 1.0)
    span = hi - lo
    t = np.where(finite, (m - lo) / span if span > 0 else 0.5, np.nan)
    img = np.repeat(np.repeat(colormap(t), cell, axis=0), cell, axis=1)
    if colorbar:
        height = img.shape[0]
        gap = np.broadcast_to(_GAP_RGB, (height, 4, 3))
        ramp = colormap(np.linspace(1.0, 0.0, height))[:, None, :]
        bar = np.repeat(ramp, max(6, cell), axis=1)
        img = np.concatenate([img, gap, bar], axis=1)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def class_view(glue_result: Any, *, heatmap: bool = True) -> PerClassGlue | None:
    """The per-class view of a pairs-protocol GLUE result; None for the joint protocol (no pairs). The
    capacity matrix is built only when a heat map will be drawn from it (``heatmap`` and at most
    :data:`HEATMAP_MAX_CLASSES` classes): it is quadratic in the classes, and the monitor keeps only the
    per-class values otherwise."""
    if not isinstance(glue_result, GluePairsResult):
        return None
    return per_class_glue(glue_result, max_matrix_classes=HEATMAP_MAX_CLASSES if heatmap else 0)


def write_class_heatmap(writer: Any, tag: str, view: PerClassGlue, step: int) -> bool:
    """Write the pairwise-capacity heat map of ``view`` as an image (and a legend as text) to a
    TensorBoard ``SummaryWriter``. Returns False (nothing written) above :data:`HEATMAP_MAX_CLASSES`."""
    matrix = view.capacity_matrix
    if matrix is None or matrix.shape[0] > HEATMAP_MAX_CLASSES or matrix.shape[0] < 2:
        return False
    m = matrix.cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    writer.add_image(tag, render_heatmap(m), step, dataformats="HWC")
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
    classes = view.classes.tolist()
    writer.add_text(
        f"{tag}_legend",
        f"Pairwise GLUE capacity of class pairs. Rows and columns (top to bottom, left to right): classes "
        f"{classes}. Colour: from {lo:.4g} (dark purple, hardest to separate) to {hi:.4g} (yellow); grey: "
        "pair not sampled (or the diagonal). Colour bar on the right, largest at the top.",
        step,
    )
    return True
