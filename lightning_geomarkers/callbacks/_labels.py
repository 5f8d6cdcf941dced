"""Find the class labels (and the raw inputs) in whatever a validation dataloader yields."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_geomarkers.utilities.checks import check_labels

__all__ = ["LABEL_KEYS", "INPUT_KEYS", "extract_labels", "batch_inputs", "find_inputs"]

#: Dict keys searched, in order, for the labels of a dict batch.
LABEL_KEYS: tuple[str, ...] = ("label", "labels", "y", "target", "targets")
#: Dict keys searched, in order, for the input tensor of a dict batch.
INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "image", "images", "input_ids", "pixel_values")

_FIX = "Pass label_fn=<callable(batch) -> (B,) int tensor> to the monitor"


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        keys = list(batch.keys())
        shown = ", ".join(repr(k) for k in keys[:20]) + (", ..." if len(keys) > 20 else "")
        return f"a {type(batch).__name__} with keys [{shown}]"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of length {len(batch)}"
    if isinstance(batch, torch.Tensor):
        return f"a single tensor of shape {tuple(batch.shape)}"
    return f"a {type(batch).__name__}"


def _as_labels(raw: Any, source: str) -> torch.Tensor:
    return check_labels(raw, name=f"Labels from {source}", fix=f"{_FIX}.", allow_column=True)


def extract_labels(batch: Any, label_fn: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """Return the batch's class labels as a 1-D int64 tensor (on the batch's device).

    With ``label_fn``: ``label_fn(batch)``. Otherwise a dict batch gives the first of the keys
    :data:`LABEL_KEYS` present, a named tuple the first such field (else ``batch[1]``), and a tuple/list
    ``batch[1]``. ``(B, 1)`` labels are squeezed, 0-d ones become
    ``(1,)``, bool/integer/integral-float dtypes are converted; 2-D ``(B, C>1)`` (one-hot) and non-integer
    float labels are rejected with a message pointing to ``label_fn``.
    """
    if label_fn is not None:
        if not callable(label_fn):
            raise TypeError(f"`label_fn` must be callable, got {type(label_fn).__name__}.")
        return _as_labels(label_fn(batch), "label_fn(batch)")
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return _as_labels(batch[key], f"batch[{key!r}]")
        raise ValueError(
            f"Could not find labels in the batch: it is {_describe(batch)}, none of which is one of "
            f"{list(LABEL_KEYS)}. {_FIX}, e.g. label_fn=lambda batch: batch['my_key']."
        )
    fields = _named_fields(batch)
    if fields is not None:  # a named tuple: by field name first (its position 1 may be e.g. lengths)
        for key in LABEL_KEYS:
            if key in fields:
                return _as_labels(getattr(batch, key), f"batch.{key}")
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(
                f"Could not find labels in the batch: it is {_describe(batch)} (labels are expected at "
                f"index 1 of (inputs, labels, ...)). {_FIX}."
            )
        return _as_labels(batch[1], "batch[1]")
    raise ValueError(
        f"Could not find labels in the batch: it is {_describe(batch)}; labels are looked up at batch[1] "
        f"of a tuple/list or under one of the keys {list(LABEL_KEYS)} of a dict. {_FIX}."
    )


def batch_inputs(batch: Any) -> torch.Tensor | None:
    """The input tensor of a batch if recognisable, else None.

    A tuple/list gives ``batch[0]`` (if a tensor), a dict or a named tuple the first tensor under
    :data:`INPUT_KEYS` (a named tuple without such a field: ``batch[0]``), a bare tensor itself.
    """
    return find_inputs(batch)[0]


def find_inputs(batch: Any) -> tuple[torch.Tensor | None, str]:
    """:func:`batch_inputs` and where it was found, for messages (``"batch['input_ids']"``, ...)."""
    if isinstance(batch, torch.Tensor):
        return batch, "the batch tensor"
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            value = batch.get(key) if key in batch else None
            if isinstance(value, torch.Tensor):
                return value, f"batch[{key!r}]"
        return None, ""
    fields = _named_fields(batch)
    if fields is not None:
        for key in INPUT_KEYS:
            value = getattr(batch, key) if key in fields else None
            if isinstance(value, torch.Tensor):
                return value, f"batch.{key}"
    if isinstance(batch, (tuple, list)) and len(batch) > 0 and isinstance(batch[0], torch.Tensor):
        return batch[0], "batch[0]"
    return None, ""


def _named_fields(batch: Any) -> tuple[str, ...] | None:
    """The field names of a named tuple (``collections.namedtuple``, ``typing.NamedTuple``), else None."""
    fields = getattr(type(batch), "_fields", None) if isinstance(batch, tuple) else None
    return tuple(fields) if isinstance(fields, tuple) else None
