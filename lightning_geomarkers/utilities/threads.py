"""Thread settings scoped to one computation.

The GLUE solver issues thousands of small tensor ops; with more than one intra-op thread each op opens a
parallel region, and on a CPU shared with other busy processes (DataLoader workers, other jobs) every
region waits for a descheduled thread: measured 13x slower at 2 threads than at 1 under load, while idle
2 threads gain only 1.4x. Large decompositions behave the same way under load. ``limit_threads`` sets
torch's intra-op thread count for the duration of a block and restores it afterwards.

``torch_thread_pool`` runs independent pieces of torch work in Python threads instead (torch releases the
GIL inside its ops): the threads never wait for each other inside an op, so a descheduled one stalls
only itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from lightning_geomarkers.utilities.checks import check_positive_int

__all__ = ["TorchThreadPool", "available_cpus", "limit_threads", "torch_thread_pool"]


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


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``).

    Example:
        >>> available_cpus() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return max(1, os.cpu_count() or 1)


class TorchThreadPool:
    """Threads that run torch work as the calling thread would: with its intra-op thread count (torch's
    and MKL's), grad mode and inference mode. Made by :func:`torch_thread_pool`.

    MKL's thread count is per thread, and torch syncs a new thread's MKL setting with its own only at its
    first parallel op: a thread that starts with a LAPACK call (an SVD, ``eigvalsh``) ran it on every core
    (measured on a 2-core VM), oversubscribing the CPU beside the other threads. So every thread sets its
    count first; grad and inference mode are thread-local in torch and are carried over per call.
    """

    def __init__(self, workers: int) -> None:
        self.workers = check_positive_int(workers, "workers")
        threads = torch.get_num_threads()
        self._grad, self._inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        self._lock = threading.Lock()
        self._busy = 0  # calls submitted and not finished
        self._pool = ThreadPoolExecutor(
            self.workers,
            thread_name_prefix="geomarkers",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            with torch.inference_mode(self._inference), torch.set_grad_enabled(self._grad):
                return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._busy -= 1

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a thread (queued while all are busy)."""
        with self._lock:
            self._busy += 1
        return self._pool.submit(self._call, fn, *args, **kwargs)

    def try_submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any] | None:
        """Like :meth:`submit` if a thread is idle now; else None (the caller runs ``fn`` itself)."""
        with self._lock:
            if self._busy >= self.workers:
                return None
            self._busy += 1
        return self._pool.submit(self._call, fn, *args, **kwargs)

    def shutdown(self, cancel: bool = False) -> None:
        """Wait for every submitted call; with ``cancel``, calls not started yet are cancelled instead."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)


@contextmanager
def torch_thread_pool(workers: int) -> Iterator[TorchThreadPool]:
    """A :class:`TorchThreadPool` of ``workers`` threads for the block, shut down on exit: it waits for
    every submitted call, or, when the block raises, for the running ones (the others are cancelled).

    Example:
        >>> import torch
        >>> with limit_threads(1), torch_thread_pool(2) as pool:
        ...     futures = [pool.submit(torch.get_num_threads) for _ in range(3)]
        >>> [f.result() for f in futures]
        [1, 1, 1]
    """
    pool = TorchThreadPool(workers)
    try:
        yield pool
    except BaseException:
        pool.shutdown(cancel=True)
        raise
    pool.shutdown()
