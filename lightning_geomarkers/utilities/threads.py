"""Thread settings scoped to one computation.

The GLUE solver issues thousands of small tensor ops; with more than one intra-op thread each op opens a
parallel region, and on a CPU shared with other busy processes (DataLoader workers, other jobs) every
region waits for a descheduled thread: measured 13x slower at 2 threads than at 1 under load, while idle
2 threads gain only 1.4x. Large decompositions behave the same way under load. ``limit_threads`` sets
torch's intra-op thread count for the duration of a block and restores it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lightning_geomarkers.utilities.checks import check_positive_int

__all__ = ["limit_threads"]


@contextmanager
def limit_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``; ``None`` leaves the setting alone.

    The previous value is restored on exit, also when the block raises. Only CPU ops are affected.

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with limit_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    if num_threads is None:
        yield
        return
    num_threads = check_positive_int(num_threads, "num_threads")
    previous = torch.get_num_threads()
    if previous == num_threads:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
