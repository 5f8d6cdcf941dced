"""Take the TensorBoard screenshot of the docs (``docs/images/tensorboard.png``) from a real run.

Steps: run the quickstart example (``examples/quickstart.py``) into a temporary log directory (or use
``--logdir``), start ``tensorboard`` on 127.0.0.1 at a free port, wait until the geometry markers are
served, take a screenshot of the dashboard with headless Chromium, and stop the server.

Usage (from the repository root)::

    python docs/scripts/screenshot_tensorboard.py                      # quickstart run + screenshot
    python docs/scripts/screenshot_tensorboard.py --logdir lightning_logs
    python docs/scripts/screenshot_tensorboard.py --page custom_scalars --height 900 \
        --out docs/images/tensorboard_custom_scalars.png

Needs Chromium (Debian: ``apt-get install -y chromium``; or pass ``--chromium /path/to/chrome``).
Only the loopback interface is used. If ``examples/quickstart.py`` is missing, a small built-in run
(a digits MLP with ``GeometryMonitor`` and a ``TensorBoardLogger``) produces the logs instead.

Pages: ``scalars`` (default) shows one chart per marker, filtered by ``--tag-filter`` (a regex);
``custom_scalars`` shows the layout ``GeometryMonitor`` writes (one chart per marker, titled with its description).

Display settings: smoothing is turned off through the page URL. TensorBoard keeps its "Ignore outliers
in chart scaling" setting (on by default, it clips the first epochs' values off the charts) in the
browser's localStorage, which a fresh headless profile cannot be given from the command line. So Chromium
loads the dashboard through a small loopback proxy that forwards every request to TensorBoard unchanged,
except that it adds one same-origin script to the page that sets the preference to off
(``--keep-outlier-clipping`` skips this and talks to TensorBoard directly).
"""

from __future__ import annotations

import argparse
import http.server
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.py"
DEFAULT_OUT = REPO / "docs" / "images" / "tensorboard.png"
DEFAULT_TAG_FILTER = (
    r"geometry/(glue_(capacity|dimension|radius|utility)|participation_ratio|effective_rank|nc1|lid)$"
)
REQUIRED_TAG = "geometry/glue_dimension"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def log(message: str) -> None:
    print(f"[screenshot] {message}", flush=True)


# --------------------------------------------------------------------------------------------- logs


def run_quickstart(logdir: Path, *, fast: bool, epochs: int | None) -> None:
    """Run ``examples/quickstart.py --log-dir logdir`` in a subprocess (output passed through)."""
    cmd = [sys.executable, str(QUICKSTART), "--log-dir", str(logdir)]
    if fast:
        cmd.append("--fast")
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    log("running " + " ".join(cmd[1:]))
    subprocess.run(cmd, cwd=REPO, check=True)


def run_builtin(logdir: Path, *, epochs: int) -> None:
    """Fallback when the quickstart is missing: a digits MLP with GeometryMonitor and a TensorBoardLogger."""
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(REPO))
    from lightning_geomarkers import GeometryMonitor, MarkerAlert

    class DigitsMLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    L.seed_everything(0, verbose=False)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1300], perm[1300:]
    monitor = GeometryMonitor(
        samples_per_class=30,
        n_pairs=20,
        n_t=100,
        alerts=[MarkerAlert("glue_dimension", relative_drop=0.3, patience=2)],
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[monitor],
        logger=TensorBoardLogger(str(logdir), name="digits"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    log(f"quickstart not found: built-in digits run, {epochs} epochs")
    trainer.fit(
        DigitsMLP(),
        DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=128),
    )


# --------------------------------------------------------------------------------------- tensorboard


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode("utf-8"))


def start_tensorboard(logdir: Path, port: int, log_path: Path) -> subprocess.Popen:
    """``tensorboard`` on 127.0.0.1:``port``; its output goes to ``log_path`` (a pipe could fill and block it)."""
    cmd = [
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
    ]
    log(f"starting tensorboard on 127.0.0.1:{port}")
    with open(log_path, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def wait_for_markers(proc: subprocess.Popen, base: str, timeout: float, log_path: Path) -> str:
    """Poll until the server answers and serves the marker tags; return the run that has them."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = log_path.read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}:\n{err[-3000:]}")
        try:
            tags = get_json(f"{base}/data/plugin/scalars/tags")
            runs = [run for run, run_tags in tags.items() if REQUIRED_TAG in run_tags]
            if runs:
                return runs[-1]
            last = tags
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            last = err
        time.sleep(0.5)
    raise RuntimeError(f"tensorboard did not serve {REQUIRED_TAG!r} within {timeout:.0f} s (last: {last!r})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------------------------- preference proxy

#: Served by the proxy as a same-origin script (TensorBoard's CSP forbids inline scripts).
PREFS_PATH = "/__screenshot_prefs.js"
PREFS_JS = b'window.localStorage.setItem("_ignoreYOutliers", "false");\n'


def start_prefs_proxy(upstream: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A loopback HTTP proxy to ``upstream`` that loads ``PREFS_JS`` before TensorBoard's own scripts."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == PREFS_PATH:
                self._reply(200, {"Content-Type": "application/javascript"}, PREFS_JS)
                return
            status, headers, body = self._forward(None)
            if self.path.split("?")[0] in ("/", "/index.html"):
                # Right after the doctype, so it runs before any of TensorBoard's scripts.
                tag = f'<script src="{PREFS_PATH}"></script>'.encode()
                at = body.lower().find(b"<!doctype html>")
                pos = at + len(b"<!doctype html>") if at >= 0 else 0
                body = body[:pos] + tag + body[pos:]
            self._reply(status, headers, body)

        def do_POST(self) -> None:  # noqa: N802 (the dashboards fetch some data by POST)
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._reply(*self._forward(data))

        def _forward(self, data: bytes | None) -> tuple[int, dict[str, str], bytes]:
            request = urllib.request.Request(upstream + self.path, data=data, method=self.command)
            if self.headers.get("Content-Type"):
                request.add_header("Content-Type", self.headers["Content-Type"])
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as err:
                return err.code, dict(err.headers), err.read()

        def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# ------------------------------------------------------------------------------------------ chromium


def find_chromium(explicit: str | None) -> str:
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(
        "Chromium not found. Install it (Debian/Ubuntu: `apt-get install -y chromium`) or pass --chromium PATH."
    )


def page_url(base: str, page: str, tag_filter: str) -> str:
    if page == "scalars":
        return f"{base}/#scalars&tagFilter={urllib.parse.quote(tag_filter, safe='')}&_smoothingWeight=0"
    return f"{base}/#custom_scalars&_smoothingWeight=0"


def screenshot(chromium: str, url: str, out: Path, *, size: tuple[int, int], budget_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            url,
        ]
        log(f"screenshot of {url}")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)


def looks_rendered(path: Path) -> bool:
    """A rough check that the page is not blank: enough bytes and, if Pillow is there, enough colours."""
    if not path.exists() or path.stat().st_size < 30_000:
        return False
    try:
        from PIL import Image
    except ImportError:
        return True
    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    return colours is None or len(colours) > 200


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, help="existing TensorBoard log directory (skip the run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG path (default {DEFAULT_OUT})")
    parser.add_argument("--page", choices=("scalars", "custom_scalars"), default="scalars")
    parser.add_argument("--tag-filter", default=DEFAULT_TAG_FILTER, help="regex of the scalars page")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the run (quickstart default)")
    parser.add_argument("--fast", action="store_true", help="pass --fast to the quickstart")
    parser.add_argument("--chromium", help="path of the Chromium/Chrome binary")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1300)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for tensorboard")
    parser.add_argument(
        "--keep-outlier-clipping",
        action="store_true",
        help="keep TensorBoard's default 'ignore outliers in chart scaling' (no proxy)",
    )
    args = parser.parse_args(argv)

    chromium = find_chromium(args.chromium)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="geomarkers-tb-") as tmp:
        logdir = args.logdir
        if logdir is None:
            logdir = Path(tmp) / "logs"
            logdir.mkdir()
            if QUICKSTART.exists():
                run_quickstart(logdir, fast=args.fast, epochs=args.epochs)
            else:
                run_builtin(logdir, epochs=args.epochs or 8)
        if not any(logdir.rglob("events.out.tfevents.*")):
            raise SystemExit(f"No TensorBoard event file under {logdir}.")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        tb_log = Path(tmp) / "tensorboard.log"
        proc = start_tensorboard(logdir, port, tb_log)
        proxy = None
        try:
            run = wait_for_markers(proc, base, args.timeout, tb_log)
            log(f"run {run!r} serves the markers")
            if not args.keep_outlier_clipping:
                proxy, base = start_prefs_proxy(base)
            url = page_url(base, args.page, args.tag_filter)
            for budget in (15_000, 30_000, 60_000):  # TensorBoard's pages are JS-heavy: give them time
                screenshot(chromium, url, args.out, size=(args.width, args.height), budget_ms=budget)
                if looks_rendered(args.out):
                    break
                log(f"page looked blank with a {budget} ms budget; retrying with more time")
            else:
                raise SystemExit(f"The screenshot {args.out} still looks blank; inspect it by hand.")
        finally:
            if proxy is not None:
                proxy.shutdown()
                proxy.server_close()
            stop(proc)
    log(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
