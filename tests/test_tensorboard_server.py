"""End to end through a real TensorBoard server: a tiny Lightning run with ``GeometryMonitor`` and a
``TensorBoardLogger`` writes its event file, ``tensorboard`` serves it on the loopback interface, and the
marker scalars, their values and the custom-scalars layout come back through TensorBoard's HTTP API.

Loopback only (127.0.0.1, a free port); the server is always stopped. Runs in well under a minute on two
CPU cores (the run itself takes a few seconds; TensorBoard's start-up most of the rest).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import lightning.pytorch as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_geomarkers import GeometryMonitor, MarkerAlert
from tests.lightning_helpers import TinyMLP, free_port, gaussian_classes

MARKER_TAGS = (
    "geometry/glue_capacity",
    "geometry/glue_dimension",
    "geometry/glue_radius",
    "geometry/glue_utility",
    "geometry/participation_ratio",
    "geometry/effective_rank",
    "geometry/nc1",
    "geometry/lid",
)
START_TIMEOUT_S = 40.0


def _get_json(base: str, path: str, **params: str):
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base}{path}{query}", timeout=5) as resp:
        assert resp.status == 200
        return json.loads(resp.read().decode("utf-8"))


@pytest.fixture
def logdir(tmp_path):
    """A finished two-epoch run with the monitor (small GLUE settings) and an alert, logged to TensorBoard."""
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(n_classes=4, per_class=30)
    monitor = GeometryMonitor(
        samples_per_class=20,
        n_pairs=3,
        n_t=30,
        lid_k=5,
        alerts=[MarkerAlert("glue_dimension", relative_drop=0.5)],
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        callbacks=[monitor],
        logger=TensorBoardLogger(tmp_path / "logs", name="tiny"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    data = TensorDataset(x, y)
    trainer.fit(
        TinyMLP(n_classes=4), DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=40)
    )
    assert len(monitor.history) == 2
    return tmp_path / "logs"


@pytest.fixture
def server(logdir, tmp_path) -> Iterator[str]:
    """``tensorboard`` on 127.0.0.1:<free port> over ``logdir``; yields the base URL, always stopped."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path = tmp_path / "tensorboard.log"
    log_file = open(log_path, "wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                out = log_path.read_text(encoding="utf-8", errors="replace")
                pytest.fail(f"tensorboard exited with code {proc.returncode}:\n{out[-3000:]}")
            try:
                _get_json(base, "/data/runs")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"tensorboard did not answer on {base} within {START_TIMEOUT_S:.0f} s")
                time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log_file.close()


def _wait_for_tags(base: str, wanted, timeout: float = START_TIMEOUT_S) -> dict:
    """Poll the scalars plugin until every wanted tag is served (TensorBoard loads runs in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        tags = _get_json(base, "/data/plugin/scalars/tags")
        served = {tag for run_tags in tags.values() for tag in run_tags}
        if set(wanted) <= served or time.monotonic() > deadline:
            return tags
        time.sleep(0.25)


def test_tensorboard_serves_marker_scalars_and_layout(server):
    tags = _wait_for_tags(server, MARKER_TAGS)
    runs = [run for run, run_tags in tags.items() if "geometry/glue_dimension" in run_tags]
    assert len(runs) == 1, f"expected one run with marker tags, got {tags}"
    run = runs[0]
    served = set(tags[run])
    missing = [t for t in MARKER_TAGS if t not in served]
    assert not missing, f"marker tags not served: {missing}; served: {sorted(served)}"
    assert "geometry/alert/glue_dimension" in served

    for tag in ("geometry/glue_dimension", "geometry/glue_utility", "geometry/participation_ratio"):
        points = _get_json(server, "/data/plugin/scalars/scalars", run=run, tag=tag)
        assert len(points) == 2, (tag, points)  # one value per validation epoch
        steps = [step for _, step, _ in points]
        assert steps == sorted(steps) and len(set(steps)) == 2
        assert all(math.isfinite(value) for _, _, value in points), (tag, points)
    dims = _get_json(server, "/data/plugin/scalars/scalars", run=run, tag="geometry/glue_dimension")
    assert all(value >= 0 for _, _, value in dims)

    layout = _get_json(server, "/data/plugin/custom_scalars/layout")
    categories = {cat["title"]: cat for cat in layout["category"]}
    assert {"geometry: GLUE", "geometry: Spectrum"} <= set(categories), layout
    charts = {
        chart["title"]: chart["multiline"]["tag"]
        for title, cat in categories.items()
        if title.startswith("geometry:")
        for chart in cat["chart"]
    }
    # What each chart draws, as the Custom Scalars tab asks for it (chart tags are regular expressions).
    drawn = {
        title: sorted(
            key
            for tag in tags
            for key in _get_json(server, "/data/plugin/custom_scalars/scalars", run=run, tag=tag)[
                "tag_to_events"
            ]
        )
        for title, tags in charts.items()
    }
    by_keys = {tuple(keys): title for title, keys in drawn.items()}
    assert by_keys[("geometry/glue_dimension",)].startswith("glue_dimension: GLUE effective dimension")
    assert ("geometry/participation_ratio",) in by_keys  # a chart of its own, not next to the ranks
    assert all(keys for keys in drawn.values()), drawn  # every chart draws a served tag
    assert "geometry alerts" in categories

    plugins = _get_json(server, "/data/plugins_listing")
    assert plugins["custom_scalars"]["enabled"] and plugins["scalars"]["enabled"]
    assert plugins["histograms"]["enabled"]  # the feature-spectrum histogram
