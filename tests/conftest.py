"""Shared pytest set-up for the whole suite.

* Torch runs single-threaded (intra-op and inter-op). The suite's work is many small tensor ops; on a
  busy shared CPU every multi-threaded op waits for descheduled threads, which made the suite several
  times slower under load. ``OMP_NUM_THREADS=1`` is also exported, so subprocesses (examples, DDP
  workers spawned by ``ddp_spawn``/``mp.spawn``) inherit it. Override with ``GEOMARKERS_TEST_THREADS=n``.
* Every test starts from the same global torch seed, so tests that draw from the global RNG are
  reproducible on their own and in any order.

Helpers shared between test files (tiny models, data, trainers, event-file readers, free ports) live in
``tests/lightning_helpers.py``.
"""

from __future__ import annotations

import os

_THREADS = os.environ.get("GEOMARKERS_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
os.environ.setdefault("MKL_NUM_THREADS", _THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(_THREADS))
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set (or parallel work already started) in this process
    pass


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Make the tests that draw from the global torch RNG reproducible."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count (e.g. ``limit_threads``) cannot leak it into the next."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
