"""``benchmarks/gpu_check.py`` is only ever run when a GPU is lent, with little device time: its self-test
(the CPU in the place of the GPU) and its comparison are checked here, so a broken script is found
before that time is spent."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_check_compare_flags_differences_and_nan(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    assert gpu_check.compare("same", {"a": 1.0, "b": math.nan}, {"a": 1.0 + 1e-9, "b": math.nan})
    assert not gpu_check.compare("off", {"a": 1.0}, {"a": 1.0 + 1e-5})  # above the 1e-6 tolerance
    assert not gpu_check.compare("nan", {"a": 1.0}, {"a": math.nan})  # NaN where the CPU has a value
    assert not gpu_check.compare("missing", {"a": 1.0}, {})  # a marker the GPU run did not return
    # A NaN, infinite or missing value is not forgotten when a later key has a finite error (it was:
    # the worst error was replaced by the next finite one), nor are extra keys or an empty comparison.
    assert not gpu_check.compare("nan first", {"a": 1.0, "b": 2.0}, {"a": math.nan, "b": 2.0})
    assert not gpu_check.compare("inf first", {"r": 5.0, "b": 2.0}, {"r": math.inf, "b": 2.0})
    assert not gpu_check.compare("missing first", {"a": 1.0, "b": 2.0}, {"b": 2.0})
    assert not gpu_check.compare("extra", {"a": 1.0}, {"a": 1.0, "b": 2.0})
    assert not gpu_check.compare("empty", {}, {})
    assert gpu_check.compare("inf both", {"r": math.inf, "b": 2.0}, {"r": math.inf, "b": 2.0})


def test_gpu_check_fails_when_the_second_side_differs(monkeypatch, capsys):
    """The self-test runs both sides on the CPU; its results were kept in a dict keyed by device, so the
    second side overwrote the first and every case compared a result with itself (it could not fail)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    calls = []

    def drifting(inputs, device):  # the second side (calls 3 and 4: warm-up, timed run) differs
        calls.append(device)
        return {"capacity": 1.0 if len(calls) <= 2 else 1.001}

    monkeypatch.setattr(gpu_check, "inputs_joint", lambda: None)
    monkeypatch.setattr(gpu_check, "case_joint", drifting)
    monkeypatch.setattr(gpu_check, "inputs_pairs", lambda: None)
    monkeypatch.setattr(gpu_check, "case_pairs", lambda inputs, device: {"x": 2.0})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--self-test", "--skip-monitor", "--repeats", "1"])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    assert "capacity: relative difference 1.00e-03" in out and out.strip().endswith(
        "MISMATCH between CPU self-test and CPU results"
    )


@pytest.mark.slow
def _run_script(name: str, *args: str) -> list[str]:
    """Run ``benchmarks/<name>`` with ``args``; its stdout lines, after checking it succeeded and printed
    the machine line first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), str(BENCHMARKS)])}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "load average" in lines[0]
    return lines


def test_gpu_check_self_test_runs_the_glue_cases():
    lines = _run_script("gpu_check.py", "--self-test", "--skip-monitor")
    assert lines[1].startswith("device: CPU (self-test)")
    assert sum(line.strip().endswith(": OK") for line in lines) == 2  # cases (a) and (b)
    assert lines[-1] == "all CPU self-test results equal the CPU results"


def test_machine_line_reports_the_allocator_and_openmp_settings(monkeypatch):
    """Every benchmark's first line names the allocator's settings and OpenMP's wait policy, which move
    the solver's times."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import machine

    for key in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD"]:
        monkeypatch.delenv(key, raising=False)
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(key, raising=False)
    assert machine.allocator().endswith("default settings")
    assert machine.machine_line().endswith("; OpenMP: default wait policy")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "268435456")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    line = machine.machine_line("cpu")
    assert line.startswith("machine: ") and "device cpu" in line
    assert line.endswith("MALLOC_TRIM_THRESHOLD_=268435456; OpenMP: OMP_WAIT_POLICY=PASSIVE")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert "LD_PRELOAD=/usr/lib/libjemalloc.so.2" in machine.allocator()


@pytest.mark.slow
def test_bench_scale_runs_a_case_with_its_environment_setting(monkeypatch):
    """The contention rows with ``OMP_WAIT_POLICY`` set must run their child under that setting (OpenMP
    reads it when the child loads torch): the child reports the setting it ran under."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BENCHMARKS.parent), str(BENCHMARKS)]))
    import bench_scale

    tiny = {"kind": "joint", "P": 2, "M": 5, "N": 8, "n_t": 5, "repeats": 1, "threads": 2}
    with_env = dict(tiny, env=bench_scale.PASSIVE)
    assert bench_scale.describe(with_env) == "joint P=2 M=5 N=8 n_t=5 OMP_WAIT_POLICY=PASSIVE"
    assert bench_scale.in_subprocess(with_env)["openmp"] == "OMP_WAIT_POLICY=PASSIVE"
    result = bench_scale.in_subprocess(tiny)
    assert result["openmp"] == "default wait policy" and result["ours_s"] > 0


@pytest.mark.slow
def test_bench_sync_runs_both_gathers_and_checks_them_against_one_process():
    args = ["--world", "2", "--classes", "6", "--per-class", "5", "--width", "16", "--repeats", "1"]
    lines = _run_script("bench_sync.py", *args)
    rows = [line.split() for line in lines if line.startswith(("this package", "torchmetrics cat"))]
    assert len(rows) == 2 and all(row[-1] == "True" for row in rows)  # both equal the single process
    assert lines[-1].startswith("ratio (torchmetrics cat / this package): time ")
