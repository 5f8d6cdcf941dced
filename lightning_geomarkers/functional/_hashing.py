"""Exact, order-independent integer hashing of samples: the keys behind partition-invariant sampling.

A row's key is a deterministic function of its exact bytes, its label and a seed (no floating point):
the bytes are read as int64 words, each word is mixed on its own (:func:`_spread`: every bit of the word
reaches the low bits), the mixed words are combined by multiply-and-sum with seeded odd coefficients
(wrap-around arithmetic, so the result does not depend on summation order or on the other rows of the
batch), then mixed with the label and the seed by a splitmix64 finalizer.

Why each word is mixed first: multiplying by an odd number modulo 2**64 keeps a word's trailing zero
bits, so a plain multiply-and-sum of words that all end in t zero bits carries only 64 - t bits. Such
words are common: float64 values with short mantissas (whole numbers, pixel values, powers of two) end in
about 45 zero bits, which left about 19 bits of key and made distinct samples collide (53 of sklearn's
1797 digits as float64; 34,000 of 200,000 distinct uint8-valued float64 rows). The keys of
``lightning_geomarkers.metrics.PerClassSample``, the bottom-k sample that the metric classes and the
monitor keep (public there as ``metrics.sample_keys`` / ``metrics.class_priority``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_geomarkers.utilities.checks import check_labels, check_seed

__all__ = ["sample_keys", "class_priority"]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _i64(v: int) -> int:
    """A Python int reduced mod 2**64 and written as a signed int64 value."""
    v &= _MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
# Distinct stream constants so that coefficients, sample keys and class priorities are independent hashes.
_STREAM_COEF = 0x243F6A8885A308D3
_STREAM_KEY = 0x13198A2E03707344
_STREAM_LABEL = 0xA4093822299F31D0
_STREAM_CLASS = 0x082EFA98EC4E6C89


def _py_splitmix64(x: int) -> int:
    """Reference splitmix64 on Python ints (unsigned 64-bit result)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _fmix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors (wrap-around multiplication)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def _spread(words: torch.Tensor) -> torch.Tensor:
    """A bijection of int64 words whose low bits depend on every bit of the word: fold the high half
    into the low half, multiply by an odd constant (spreads each bit upwards) and fold again."""
    z = (words ^ _srl(words, 32)) * _MIX1
    return z ^ _srl(z, 32)


def _seed_word(seed: int, stream: int) -> int:
    """A seeded, stream-specific signed 64-bit constant."""
    return _i64(_py_splitmix64((seed ^ stream) & _MASK64))


def _row_words(content: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each row's bytes as int64 words (zero-padded), plus the number of bytes per row."""
    b = content.shape[0]
    per_row = math.prod(content.shape[1:])
    rows = content.detach().reshape(b, per_row).contiguous()
    try:
        raw = rows.view(torch.uint8) if rows.dtype != torch.uint8 else rows
    except RuntimeError as err:  # pragma: no cover - exotic dtypes
        raise TypeError(f"Cannot hash content of dtype {content.dtype}: {err}") from err
    nbytes = raw.shape[1]
    pad = (-nbytes) % 8
    if pad:
        raw = torch.cat([raw, raw.new_zeros((b, pad))], dim=1)
    elif raw.storage_offset() % 8:  # a view at an odd offset cannot be reinterpreted as int64 in place
        raw = raw.clone()
    return raw.view(torch.int64), nbytes


def sample_keys(
    content: torch.Tensor, labels: Any, seed: int, *, chunk_elements: int = 1 << 16
) -> torch.Tensor:
    """Pseudo-random non-negative 63-bit int64 keys ``(B,)`` for the rows of ``content``.

    A row's key is a deterministic function of its exact bytes (dtype, values, trailing shape), its label
    and ``seed``; it does not depend on the other rows of the batch, their order, or the device (integer
    arithmetic is exact). Works for any dtype (float, half, int, bool) and trailing shape.

    Args:
        content: ``(B, ...)`` tensor identifying each sample, typically the raw model inputs.
        labels: ``(B,)`` integer class ids.
        seed: integer seed; changing it gives independent keys.
        chunk_elements: bound on the temporary int64 arrays (memory), in elements (small enough by
            default to stay in a CPU's cache: 512 KiB each).
    """
    if not isinstance(content, torch.Tensor):
        raise TypeError(f"`content` must be a tensor, got {type(content).__name__}.")
    if content.ndim == 0:
        raise ValueError("`content` must have a batch dimension (B, ...), got a 0-d tensor.")
    seed = check_seed(seed)
    b = content.shape[0]
    y = check_labels(labels, b, device=content.device)
    if b == 0:
        return torch.zeros(0, dtype=torch.int64, device=content.device)
    words, nbytes = _row_words(content)
    n_words = words.shape[1]
    h = torch.zeros(b, dtype=torch.int64, device=content.device)
    if n_words:
        coef_seed = _seed_word(seed, _STREAM_COEF)
        # Blocks of rows x words of about chunk_elements: rows in blocks too, so that a very large batch
        # still reads contiguous runs of words (one word per row at a time was 3.8x slower per byte).
        width = min(n_words, max(64, chunk_elements // b))
        rows = max(1, chunk_elements // width)
        for start in range(0, n_words, width):
            stop = min(n_words, start + width)
            idx = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=content.device)
            coef = _fmix64(idx * _GOLDEN + coef_seed) | 1  # odd: every word influences the sum
            for r0 in range(0, b, rows):
                r1 = min(b, r0 + rows)
                h[r0:r1] += (_spread(words[r0:r1, start:stop]) * coef).sum(dim=1)
    z = _fmix64(h + _i64(nbytes * _GOLDEN) + _seed_word(seed, _STREAM_KEY))
    z = z ^ _fmix64(y * _MIX1 + _seed_word(seed, _STREAM_LABEL))
    z = _fmix64(z + _GOLDEN)
    return z & _MASK63


def class_priority(labels: Any, seed: int) -> torch.Tensor:
    """Seeded pseudo-random non-negative 63-bit int64 priority of each class id in ``labels``.

    Used to keep a fixed, order-independent subset of classes: the ``max_classes`` with the smallest
    priority among those seen.
    """
    seed = check_seed(seed)
    y = check_labels(labels)
    z = _fmix64(y * _GOLDEN + _seed_word(seed, _STREAM_CLASS))
    return _fmix64(z + _GOLDEN) & _MASK63
