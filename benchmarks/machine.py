"""The line every benchmark prints first: the CPU, its cores, torch, the device, the load average, the
memory allocator's settings and OpenMP's wait policy (both move the solver's times: see
docs/performance.md, "Memory allocator" and "OpenMP wait policy")."""

from __future__ import annotations

import os
import platform


def allocator() -> str:
    """The C library's allocator and any settings that change it: ``MALLOC_*`` tunables in the
    environment, or a preloaded allocator (jemalloc, tcmalloc, mimalloc)."""
    libc, version = platform.libc_ver()
    name = f"{libc} {version}".strip() or "unknown libc"
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    tunables = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    if preload:
        return f"{name} with LD_PRELOAD={':'.join(preload)}" + (
            f", {', '.join(tunables)}" if tunables else ""
        )
    return f"{name} malloc, " + (", ".join(tunables) if tunables else "default settings")


def openmp() -> str:
    """OpenMP settings that change how intra-op threads wait for each other (``OMP_WAIT_POLICY``,
    ``GOMP_SPINCOUNT``; read by the OpenMP runtime when torch loads it), or "default wait policy"."""
    keys = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    settings = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return ", ".join(settings) if settings else "default wait policy"


def machine_line(device: str | None = None) -> str:
    """``machine: <cpu>, <n> CPUs, torch <version>[, device <device>], load <1-min average>; allocator: ...;
    OpenMP: ...``"""
    import torch  # here, so that importing this module costs nothing (bench_scale imports torch late)

    parts = [
        platform.processor() or platform.machine(),
        f"{os.cpu_count()} CPUs",
        f"torch {torch.__version__}",
    ]
    if device is not None:
        parts.append(f"device {device}")
    parts.append(f"load average at start {os.getloadavg()[0]:.1f}")
    return f"machine: {', '.join(parts)}; allocator: {allocator()}; OpenMP: {openmp()}"
