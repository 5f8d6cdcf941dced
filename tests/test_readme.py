"""The README's usage snippet runs as written (with a tiny model and loaders supplied)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.lightning_helpers import TinyMLP, gaussian_classes, loaders

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(tag: str) -> str:
    match = re.search(rf"<!-- ci: {tag} -->\s*```\w*\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no `ci: {tag}` block"
    return match.group(1)


def test_readme_usage_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ and checkpoints here
    x, y = gaussian_classes()
    train_loader, val_loader = loaders(x, y)
    namespace = {"model": TinyMLP(), "train_loader": train_loader, "val_loader": val_loader}
    exec(compile(snippet("snippet"), "README.md", "exec"), namespace)
    trainer, monitor = namespace["trainer"], namespace["monitor"]
    assert trainer.current_epoch == 10 and len(monitor.history) == 10
    assert "geometry/glue_dimension" in trainer.callback_metrics
    assert namespace["best_geometry"].best_model_path


def test_readme_setup_commands_are_what_ci_runs():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "readme_command install" in ci and "readme_command test" in ci
    assert "pip install torch==2.13.0" in snippet("install")
    assert "pytest" in snippet("test")
