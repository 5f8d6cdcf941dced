"""Seeds and random streams shared by every layer of the package.

All random draws are made on the CPU from a ``torch.Generator`` and then moved, so results do not depend
on the compute device. Independent streams (probes vs. dichotomies, GLUE vs. projections, ...) are split
from one generator with :func:`split_seeds`, so adding a draw to one stream leaves the others unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_geomarkers.utilities.checks import check_seed

__all__ = ["as_generator", "split_seeds", "child_generators"]


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU generator from a seed, an existing generator, or (None) the global torch RNG.

    Random draws are made on the CPU and then moved, so results do not depend on the compute device.
    """
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError("Pass a CPU torch.Generator (draws are made on the CPU for reproducibility).")
        return generator
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
    elif isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        seed = check_seed(generator, "generator")
    else:
        raise TypeError(f"`generator` must be a torch.Generator, an int seed or None, got {generator!r}.")
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def split_seeds(generator: torch.Generator, n: int) -> list[int]:
    """``n`` independent 62-bit seeds drawn from ``generator`` (advances it by one draw).

    Example:
        >>> split_seeds(torch.Generator().manual_seed(0), 2) == split_seeds(torch.Generator().manual_seed(0), 2)
        True
    """
    return [int(s) for s in torch.randint(0, 2**62, (n,), generator=generator, device="cpu").tolist()]


def child_generators(generator: torch.Generator, n: int) -> list[torch.Generator]:
    """``n`` independent CPU generators seeded by :func:`split_seeds`."""
    return [torch.Generator().manual_seed(s) for s in split_seeds(generator, n)]
