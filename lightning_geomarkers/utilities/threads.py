"""Thread settings scoped to one computation, and the one reader of torch's float32 matmul precision.

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

__all__ = [
    "SharedWork",
    "TorchThreadPool",
    "available_cpus",
    "ieee_float32_matmul",
    "limit_threads",
    "torch_thread_pool",
]


def ieee_float32_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` run in IEEE float32, i.e. no TF32 or bf16 shortcut is allowed.

    Reads both of torch's interfaces: the legacy one (``torch.set_float32_matmul_precision("high")``,
    ``torch.backends.cuda.matmul.allow_tf32``) and the newer ``fp32_precision`` attributes
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``torch.backends.mkldnn.matmul.fp32_precision
    = "bf16"`` on the CPU, or ``torch.backends.fp32_precision``). Once the newer one has been set, torch
    raises on every read of the legacy one ("mix of the legacy and new APIs"), so this never lets that
    error escape: where neither can be read it answers False (the callers then compute in float64, which
    is always exact enough).

    Example:
        >>> import torch
        >>> ieee_float32_matmul(torch.device("cpu"))  # torch's default: "highest"
        True
    """
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
        return not (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # the newer fp32_precision interface is in use
        pass
    try:
        backends: Any = torch.backends  # the fp32_precision attributes are not in torch's type stubs
        backend = backends.cuda.matmul if device.type == "cuda" else backends.mkldnn.matmul
        precision = backend.fp32_precision
        if precision == "none":  # inherits the global setting
            precision = backends.fp32_precision
        return precision in ("ieee", "none")
    except (AttributeError, RuntimeError):
        return False


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


class SharedWork:
    """Items ``0 .. n - 1`` of one computation, each run exactly once by whichever threads take part.

    The owner calls :meth:`finish`; any thread with nothing else to do may call :meth:`help` before or
    meanwhile (e.g. a :class:`TorchThreadPool` call queued after other work). Both take the next item in
    index order until none is left, so the items are split between the threads that are actually free,
    and each item's arithmetic is the same whoever runs it. ``setup`` (optional) runs once, before the
    first item, on the thread that takes it (the others wait for it): allocations and random draws happen
    only when the work starts. After a failure (in ``setup`` or an item, on any thread) no further item is
    started, and :meth:`finish` re-raises the first error once the running items have ended.

    Args:
        n: number of items (``>= 0``).
        fn: ``fn(i)`` runs item ``i``.
        setup: called once, first.

    Example:
        >>> done = []
        >>> work = SharedWork(3, done.append)
        >>> with torch_thread_pool(1) as pool:
        ...     _ = pool.submit(work.help)
        ...     work.finish()  # runs what the helper has not taken, waits for what it has
        >>> sorted(done)
        [0, 1, 2]
    """

    def __init__(self, n: int, fn: Callable[[int], Any], setup: Callable[[], Any] | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"`n` must be a non-negative int (the number of items), got {n!r}.")
        self._n, self._fn, self._setup = n, fn, setup
        self._cond = threading.Condition()
        self._next = 0  # items taken
        self._ended = 0  # items that returned or raised
        self._error: BaseException | None = None

    def _take(self) -> int | None:
        with self._cond:
            if self._error is not None or self._next >= self._n:
                return None
            if self._setup is not None:  # the first taker sets up while the others wait on the lock
                setup, self._setup = self._setup, None
                try:
                    setup()
                except BaseException as err:
                    self._error = err
                    return None
            self._next += 1
            return self._next - 1

    def _work(self) -> None:
        try:
            self._run_items()
        except BaseException as err:  # interrupted outside an item (e.g. waiting for the lock in _take)
            with self._cond:
                if self._error is None:
                    self._error = err  # the others take no further item
                self._cond.notify_all()
            raise

    def _run_items(self) -> None:
        while (i := self._take()) is not None:
            error = None
            try:
                self._fn(i)
            except BaseException as err:
                error = err
            with self._cond:
                self._ended += 1
                if error is not None and self._error is None:
                    self._error = error
                self._cond.notify_all()

    def help(self) -> None:
        """Run items until none is left; never raises (errors are kept for :meth:`finish`)."""
        try:
            self._work()
        except BaseException:  # noqa: S110  (recorded by _work; finish() raises it)
            pass

    def finish(self) -> None:
        """Run the items left, wait for those other threads are running, re-raise the first error."""
        self._work()
        with self._cond:
            self._cond.wait_for(lambda: self._ended >= self._next)
            if self._error is not None:
                raise self._error


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
