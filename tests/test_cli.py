"""The ``lightning-geomarkers rank`` command line and ``rank_checkpoints``: files, values equal to the live
logs, the ranking rules against brute force, the YAML config, and clear errors. Run in-process (``main``),
plus one subprocess smoke test of ``python -m lightning_geomarkers``."""

from __future__ import annotations

import csv
import itertools
import math
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_geomarkers.cli.rank as rank_module
from lightning_geomarkers import GeometryMonitor
from lightning_geomarkers.cli import (
    CheckpointScore,
    CLIError,
    both_higher_counts,
    build_parser,
    load_object,
    main,
    monitor_from_config,
    pareto_front,
    rank_checkpoints,
    rank_scores,
)
from lightning_geomarkers.functional.suite import GLUE_MARKER_NAMES
from tests.lightning_helpers import TinyMLP, gaussian_classes, loaders, trainer

SETTINGS = dict(samples_per_class=20, n_t=30, n_pairs=None, lid_k=10, seed=1)
OPTIONS = ["--samples-per-class", "20", "--n-t", "30", "--n-pairs", "all", "--lid-k", "10", "--seed", "1"]
MODEL = "tests.lightning_helpers:TinyMLP"
DATA = "tests.test_cli:val_loader"


def val_loader() -> DataLoader:
    """The validation loader of the fixture's run (the --data function of these tests)."""
    x, y = gaussian_classes(per_class=30)
    return loaders(x, y)[1]


class ValData(L.LightningDataModule):
    def setup(self, stage: str) -> None:
        self.loader = val_loader()

    def val_dataloader(self):
        return self.loader


def needs_args(batch_size):
    return val_loader()


def needs_keyword(*, batch_size):
    return val_loader()


def one_pass():
    """A generator of batches: exhausted by the first checkpoint."""
    return (batch for batch in val_loader())


class BuildsOnlyForFit(L.LightningDataModule):
    """Lightning's docs pattern that builds the validation set only in setup('fit')."""

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.val = val_loader()

    def val_dataloader(self):
        return self.val


def train_and_val():
    """A loader factory of the common (train, val) shape."""
    return loaders(*gaussian_classes(per_class=30))


def dict_batches():
    return [{"pixels": x, "target": y} for x, y in val_loader()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three checkpoints of a monitored fit, and the values the monitor logged at each epoch."""
    tmp = tmp_path_factory.mktemp("fit")
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=30)
    monitor = GeometryMonitor(**SETTINGS)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, filename="e{epoch}")
    tr = trainer(tmp, [monitor, ckpt], max_epochs=3, logger=False)
    train, val = loaders(x, y)
    tr.fit(TinyMLP(), train, val)
    live = {h["epoch"]: {k: v for k, v in h.items() if k in monitor.markers} for h in monitor.history}
    return sorted((tmp / "ckpt").glob("*.ckpt")), live


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def brute_force_choice(rows, floor):
    """The both-higher ranking by explicit loops: most wins, then fewest losses, then highest D_eff."""
    best = None
    for r in rows:
        d, u = float(r["geometry/glue_dimension"]), float(r["geometry/glue_utility"])
        wins = sum(
            d > float(o["geometry/glue_dimension"]) and u > float(o["geometry/glue_utility"]) for o in rows
        )
        losses = sum(
            d < float(o["geometry/glue_dimension"]) and u < float(o["geometry/glue_utility"]) for o in rows
        )
        if d < floor:
            continue
        key = (-wins, losses, -d)
        if best is None or key < best[0]:
            best = (key, r["path"])
    return best[1]


def test_rank_writes_csv_markdown_png_with_the_live_values(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths, live = run
    out = tmp_path / "out"
    floor = sorted(v["glue_dimension"] for v in live.values())[0] + 1e-6  # excludes the lowest-D_eff epoch
    code = main(
        [
            "rank",
            *paths,
            "--model",
            MODEL,
            "--data",
            DATA,
            *OPTIONS,
            "--out",
            out,
            "--floor",
            f"glue_dimension={floor!r}",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    rows = read_csv(out / "markers.csv")
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for r, p in zip(rows, paths, strict=True):
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
        assert int(r["epoch"]) == ckpt["epoch"] and int(r["step"]) == ckpt["global_step"]
        for marker, value in live[ckpt["epoch"]].items():  # every marker, equal to the live log
            assert float(r[f"geometry/{marker}"]) == pytest.approx(value, rel=1e-5), (p.name, marker)
    assert len(rows[0]) == 3 + 13
    choice = brute_force_choice(rows, floor)
    md = (out / "ranking.md").read_text()
    assert f"**Choice: `{choice}`**" in md and "## Ranking" in md and "Pareto front" in md
    assert f"`geometry/glue_dimension` >= {floor:g}" in md and "fails geometry/glue_dimension" in md
    assert "`n_t`: `30`" in md and "`seed`: `1`" in md
    # --n-pairs all reached the monitor (not the default 100); the sample's max_classes (100) is reported,
    # not GLUE's internal None; input_fn is listed (it changes the sampling keys).
    assert "`n_pairs`: `None`" in md and "`max_classes`: `100`" in md and "`max_classes`: `None`" not in md
    assert "`input_fn`: `None`" in md and "num_threads" not in md
    assert (out / "markers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Choice (both-higher rule): {choice}" in printed.out
    assert "checkpoints" in printed.err  # the progress bar


def test_python_api_config_file_and_datamodule_give_the_same_values(run, tmp_path):
    paths, _ = run
    by_api = rank_checkpoints(
        paths,
        TinyMLP,
        val_loader,
        monitor=GeometryMonitor(**SETTINGS),
        out=None,
        device="cpu",
        progress=False,
    )
    assert [s.rank for s in by_api.scores] == [1, 2, 3] and by_api.files == {}
    assert by_api.choice is by_api.scores[0] and by_api.choice.losses == 0 and by_api.choice.pareto
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 3\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_top_k: -1}\n"
        "    - class_path: lightning_geomarkers.GeometryMonitor\n"
        "      init_args:\n"
        "        samples_per_class: 20\n"
        "        n_t: 30\n"
        "        n_pairs: null\n"
        "        lid_k: 10\n"
        "        seed: 1\n"
        "        every_n_epochs: 2\n"
        "        alerts:\n"
        "          - class_path: lightning_geomarkers.MarkerAlert\n"
        "            init_args: {marker: glue_dimension, relative_drop: 0.2}\n"
    )
    assert monitor_from_config(config) == dict(samples_per_class=20, n_t=30, n_pairs=None, lid_k=10, seed=1)
    out = tmp_path / "cfg"
    assert (
        main(
            [
                "rank",
                *paths,
                "--model",
                MODEL,
                "--data",
                "tests.test_cli:ValData",
                "--config",
                config,
                "--out",
                out,
                "--quiet",
                "--no-plot",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    rows = read_csv(out / "markers.csv")
    for score, row in zip(sorted(by_api.scores, key=lambda s: s.path), rows, strict=True):
        assert score.path == row["path"]
        assert {k: float(row[k]) for k in score.values} == pytest.approx(score.values, rel=1e-12)
    assert not (out / "markers.png").exists()
    # An option on the command line overrides the config file.
    out2 = tmp_path / "override"
    assert (
        main(
            [
                "rank",
                paths[0],
                "--model",
                MODEL,
                "--data",
                DATA,
                "--config",
                config,
                "--seed",
                "2",
                "--out",
                out2,
                "--quiet",
                "--no-plot",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert float(read_csv(out2 / "markers.csv")[0]["geometry/glue_dimension"]) != pytest.approx(
        float(rows[0]["geometry/glue_dimension"]), rel=1e-9
    )


def test_without_matplotlib_the_png_is_skipped_with_the_install_hint(run, tmp_path, monkeypatch, capsys):
    paths, _ = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.warns(UserWarning, match="pip install matplotlib"):
        code = main(
            [
                "rank",
                paths[0],
                "--model",
                MODEL,
                "--data",
                DATA,
                "--markers",
                "glue",
                *OPTIONS,
                "--out",
                tmp_path,
                "--device",
                "cpu",
            ]
        )
    assert code == 0
    assert (tmp_path / "ranking.md").is_file() and not (tmp_path / "markers.png").exists()
    assert "pip install matplotlib" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tests.lightning_helpers", "--data", DATA], "not of the form MODULE:NAME"),
        (
            ["--model", "no_such_pkg.models:Net", "--data", DATA],
            "could not import module 'no_such_pkg.models'",
        ),
        (["--model", "tests.lightning_helpers:TinyMPL", "--data", DATA], "Did you mean 'TinyMLP'"),
        (
            ["--model", "tests.lightning_helpers:gaussian_classes", "--data", DATA],
            "must name a LightningModule class",
        ),
        (["--model", MODEL, "--data", "tests.test_cli:needs_args"], "callable without arguments"),
        (["--model", MODEL, "--data", "tests.test_cli:GeometryMonitor"], "not a LightningDataModule"),
        (["--model", MODEL, "--data", DATA, "--floor", "glue_dimension"], "MARKER=NUMBER"),
        (
            ["--model", MODEL, "--data", DATA, "--floor", "glue_dim=2"],
            "computes no marker 'glue_dim' (did you mean",
        ),
        (["--model", MODEL, "--data", DATA, "--samples-per-class", "1"], "Invalid monitor settings"),
        (["--model", MODEL, "--data", DATA, "--layers", "body.9"], "no submodule named 'body.9'"),
        (["--model", MODEL, "--data", "tests.test_cli:needs_keyword"], "callable without arguments"),
        (["--model", MODEL, "--data", "tests.test_cli:one_pass"], "one-pass iterator"),
        (["--model", MODEL, "--data", "tests.test_cli:BuildsOnlyForFit"], "setup('validate')"),
        (["--model", MODEL, "--data", "tests.test_cli:dict_batches"], "forward_fn="),
    ],
)
def test_clear_errors_name_the_problem_and_the_fix(run, tmp_path, capsys, argv, message):
    paths, _ = run
    code = main(
        [
            "rank",
            paths[0],
            "--markers",
            "glue",
            *OPTIONS,
            *argv,
            "--out",
            tmp_path,
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-geomarkers rank: error:") and message in err, err
    assert "Traceback" not in err


def test_missing_checkpoint_bad_config_and_wrong_checkpoint(run, tmp_path, capsys):
    paths, _ = run
    base = ["--model", MODEL, "--data", DATA, "--out", tmp_path, "--quiet", "--device", "cpu"]
    assert main(["rank", paths[0], tmp_path / "nope.ckpt", *base]) == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("class_path: my.OtherCallback\ninit_args: {}\n")
    assert main(["rank", paths[0], *base, "--config", bad]) == 1
    assert "no GeometryMonitor entry" in capsys.readouterr().err
    bad.write_text("class_path: lightning_geomarkers.GeometryMonitor\ninit_args: {n_probes: 3}\n")
    assert main(["rank", paths[0], *base, "--config", bad]) == 1
    assert "unknown GeometryMonitor argument(s) ['n_probes']" in capsys.readouterr().err
    bad.write_text("class_path: somewhere.GeometryMonitor\n")
    assert main(["rank", paths[0], *base, "--config", bad]) == 1
    assert "is not the monitor" in capsys.readouterr().err
    wrong = tmp_path / "wrong.ckpt"  # a checkpoint of another architecture
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0, "global_step": 0}, wrong)
    assert main(["rank", wrong, *base]) == 1
    assert "Is --model the class the checkpoint was saved from?" in capsys.readouterr().err
    # A directory stands for its checkpoints.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.ckpt"):
        rank_checkpoints([empty], TinyMLP, val_loader, out=None, progress=False)
    assert main(["rank", paths[0]]) == 2  # usage error (--model and --data are required), returned
    assert "required" in capsys.readouterr().err
    assert main(["rank", "--help"]) == 0


def test_file_path_specs(tmp_path):
    module = tmp_path / "my_models.py"
    module.write_text("from helper_mod import VALUE\nclass Thing:\n    value = VALUE\n")
    (tmp_path / "helper_mod.py").write_text("VALUE = 41\n")
    assert load_object(f"{module}:Thing").value == 41  # the file's sibling import works
    with pytest.raises(CLIError, match="no file"):
        load_object(f"{tmp_path / 'missing.py'}:Thing")


def test_ranking_rules_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 9))
        d = rng.integers(0, 4, n).astype(float)  # ties on purpose
        u = rng.integers(0, 4, n).astype(float)
        if trial % 4 == 0 and n > 1:
            d[0] = math.nan
        if trial % 4 == 1 and n > 1:  # an infinite value counts as not measured, as NaN does
            d[0] = math.inf
        wins, losses = both_higher_counts(d, u)
        front = pareto_front(d, u)
        finite = [j for j in range(n) if math.isfinite(d[j]) and math.isfinite(u[j])]
        for i in range(n):
            assert wins[i] == sum(d[i] > d[j] and u[i] > u[j] for j in finite if i in finite)
            assert losses[i] == sum(d[j] > d[i] and u[j] > u[i] for j in finite if i in finite)
            dominated = any(d[j] >= d[i] and u[j] >= u[i] and (d[j] > d[i] or u[j] > u[i]) for j in finite)
            assert front[i] == (i in finite and not dominated)
        ranked = rank_scores(
            [
                CheckpointScore(str(i), {"geometry/glue_dimension": d[i], "geometry/glue_utility": u[i]})
                for i in range(n)
            ]
        )
        if ranked.choice is not None:  # the top of the ranking is never beaten on both
            assert ranked.choice is ranked.scores[0] and ranked.choice.losses == 0
    # the ranking: wins, then losses, then D_eff; unknown values last; thresholds pick the choice
    vals = [(3.0, 0.5), (2.0, 0.6), (1.0, 0.1), (math.nan, 0.9), (2.5, 0.55)]
    scores = [
        CheckpointScore(
            f"c{i}", {"geometry/glue_dimension": a, "geometry/glue_utility": b, "geometry/lid": 10.0 + i}
        )
        for i, (a, b) in enumerate(vals)
    ]
    res = rank_scores(scores, ceilings={"lid": 10.5})
    assert [s.path for s in res.scores] == ["c0", "c4", "c1", "c2", "c3"]
    assert [s.wins for s in res.scores] == [1, 1, 1, 0, 0]
    assert res.choice.path == "c0" and [s.eligible for s in res.scores] == [True, False, False, False, False]
    assert {s.path for s in res.pareto} == {"c0", "c1", "c4"}
    res = rank_scores(scores, floors={"geometry/glue_utility": 0.58})
    assert res.choice.path == "c1"
    with pytest.raises(ValueError, match="No checkpoints"):
        rank_scores([])


@pytest.mark.parametrize("module", ["lightning_geomarkers", "lightning_geomarkers.cli"])
def test_console_entry_point_help_in_a_subprocess(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "rank", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "--model MODULE:CLASS" in proc.stdout and "--floor MARKER=VALUE" in proc.stdout
    assert list(itertools.islice(proc.stdout.splitlines(), 1))[0].startswith(
        "usage: lightning-geomarkers rank"
    )


def _monitor(argv, tmp_path=None):
    args = build_parser().parse_args(["rank", "x.ckpt", "--model", MODEL, "--data", DATA, *argv])
    return rank_module._monitor_from_args(args)


def test_none_and_all_options_reach_the_monitor_and_override_the_config(tmp_path):
    default = _monitor([])
    assert (default.max_classes, default.glue_kwargs["n_pairs"], default.glue_kwargs["projection_dim"]) == (
        100,
        100,
        1000,
    )
    m = _monitor(["--max-classes", "none", "--n-pairs", "all", "--projection-dim", "none"])
    assert (
        m.max_classes is None and m.glue_kwargs["n_pairs"] is None and m.glue_kwargs["projection_dim"] is None
    )
    config = tmp_path / "m.yaml"
    config.write_text(
        "class_path: lightning_geomarkers.GeometryMonitor\n"
        "init_args: {max_classes: 7, n_pairs: 5, projection_dim: 64, n_t: 40, center_features: false}\n"
    )
    from_file = _monitor(["--config", str(config)])
    assert (from_file.max_classes, from_file.glue_kwargs["n_pairs"], from_file.glue_kwargs["n_t"]) == (
        7,
        5,
        40,
    )
    assert from_file.glue_kwargs["center_features"] is False  # an option not given keeps the file's value
    over = _monitor(
        ["--config", str(config), "--max-classes", "none", "--n-pairs", "all", "--projection-dim", "none"]
    )
    assert over.max_classes is None and over.glue_kwargs["n_pairs"] is None
    assert over.glue_kwargs["projection_dim"] is None and over.glue_kwargs["n_t"] == 40


def test_markers_glue_or_all_mix_with_names():
    assert _monitor(["--markers", "glue", "nc1"]).markers == (*GLUE_MARKER_NAMES, "nc1")
    assert _monitor(["--markers", "nc1", "glue", "glue_dimension"]).markers == ("nc1", *GLUE_MARKER_NAMES)
    assert _monitor(["--markers", "glue"]).markers == GLUE_MARKER_NAMES
    assert set(_monitor(["--markers", "all", "nc1"]).markers) == set(_monitor([]).markers)


def test_markers_without_d_eff_and_psi_eff_are_refused_before_measuring(run, tmp_path, capsys, monkeypatch):
    paths, _ = run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a checkpoint was measured")

    monkeypatch.setattr(rank_module, "evaluate_model", must_not_run)
    base = ["--model", MODEL, "--data", DATA, "--out", tmp_path / "out", "--quiet", "--device", "cpu"]
    assert main(["rank", *paths, *base, "--markers", "nc1", "glue_dimension"]) == 1
    err = capsys.readouterr().err
    assert "--markers must include glue_dimension and glue_utility (or 'glue'/'all')" in err, err
    assert "['glue_utility']" in err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"needs D_eff and Psi_eff.*\['glue_dimension', 'glue_utility'\]"):
        rank_scores([CheckpointScore("a.ckpt", {"geometry/nc1": 0.5})])


def test_several_layers_rank_on_the_first_monitored_layer(run, tmp_path):
    # Keys in the monitor's layer order ("fc" first), which is not the alphabetical one ("body" first).
    values = [
        {
            "geometry/fc/glue_dimension": 2.0,
            "geometry/fc/glue_utility": 0.1,
            "geometry/body/glue_dimension": 9.0,
            "geometry/body/glue_utility": 0.9,
        },
        {
            "geometry/fc/glue_dimension": 3.0,
            "geometry/fc/glue_utility": 0.2,
            "geometry/body/glue_dimension": 1.0,
            "geometry/body/glue_utility": 0.1,
        },
    ]
    res = rank_scores(
        [CheckpointScore(f"c{i}", v) for i, v in enumerate(values)], floors={"glue_utility": 0.15}
    )
    assert (res.dimension_key, res.utility_key) == ("geometry/fc/glue_dimension", "geometry/fc/glue_utility")
    assert res.choice.path == "c1" and list(res.floors) == ["geometry/fc/glue_utility"]
    # End to end: the monitor logs in its layer order, so --layers fc:input body.0 ranks on fc:input.
    paths, _ = run
    result = rank_checkpoints(
        paths[:2],
        TinyMLP,
        val_loader,
        monitor=GeometryMonitor(**SETTINGS, layers=["fc:input", "body.0"], markers="glue"),
        out=None,
        device="cpu",
        progress=False,
    )
    assert "body" not in result.dimension_key and result.dimension_key.endswith("/glue_dimension")
    assert any("body" in k for k in result.scores[0].values)


def test_unreadable_checkpoint_names_the_file_and_the_fix(run, tmp_path, capsys):
    paths, _ = run
    base = ["--model", MODEL, "--data", DATA, "--out", tmp_path / "out", "--quiet", "--device", "cpu"]
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(paths[0].read_bytes()[:300])
    listed = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], listed)
    for bad in (text, truncated, listed):
        assert main(["rank", paths[0], bad, *base]) == 1
        err = capsys.readouterr().err
        assert err.startswith("lightning-geomarkers rank: error:") and str(bad) in err, err
        assert "Traceback" not in err and ("save it again" in err or "ModelCheckpoint" in err), err


def test_input_fn_in_a_config_file_points_to_the_python_api(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "class_path: lightning_geomarkers.GeometryMonitor\n"
        "init_args:\n  input_fn: {class_path: my.module.get_inputs}\n"
    )
    with pytest.raises(CLIError, match="input_fn is a callable.*rank_checkpoints"):
        monitor_from_config(config)


def test_review_fixes_out_file_bare_state_dict_seed_warning_and_valueless_checkpoints(run, tmp_path, capsys):
    """--out naming a file is refused before any checkpoint is measured; a bare state_dict is named as
    such; the run's own monitor seed is pointed out when the ranking uses another; a checkpoint without
    values is not eligible."""
    paths, _ = run
    base = ["--model", MODEL, "--data", DATA, "--quiet", "--device", "cpu", *OPTIONS]
    a_file = tmp_path / "taken"
    a_file.write_text("")
    measured = []
    real = rank_module.evaluate_model
    try:
        rank_module.evaluate_model = lambda *a, **k: measured.append(1) or real(*a, **k)
        assert main(["rank", paths[0], *base, "--out", a_file]) == 1
    finally:
        rank_module.evaluate_model = real
    assert "cannot be used as the output directory" in capsys.readouterr().err and not measured
    argv = ["rank", paths[0], "--model", MODEL, "--data", DATA, "--quiet", "--out", tmp_path / "o"]
    assert main([*argv, "--device", "gpu0"]) == 1
    assert "'gpu0' is not a torch device" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"--data gave 2 loaders .* measured on loader 0"):
        rank_checkpoints(
            paths[:1], TinyMLP, train_and_val, monitor=GeometryMonitor(**SETTINGS), out=None, progress=False
        )
    link = tmp_path / "same.ckpt"  # one file under three spellings is measured once
    link.symlink_to(paths[0])
    respelt = paths[0].parent / ".." / paths[0].parent.name / paths[0].name
    assert rank_module._expand([paths[0], link, respelt]) == [paths[0]]
    bare = tmp_path / "bare.pt"
    torch.save(TinyMLP().state_dict(), bare)
    assert main(["rank", bare, *base, "--out", tmp_path / "out"]) == 1
    assert "without a 'state_dict' entry (a bare state_dict?)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"seed=1, and this ranking uses seed=0.*--seed 1"):
        rank_checkpoints(
            paths[:1],
            TinyMLP,
            val_loader,
            monitor=GeometryMonitor(**{**SETTINGS, "seed": 0}),
            out=None,
            progress=False,
        )
    scores = [
        CheckpointScore("a", {"geometry/glue_dimension": 2.0, "geometry/glue_utility": 0.3}),
        CheckpointScore("b", {}),
    ]
    result = rank_scores(scores)
    assert [s.eligible for s in result.scores] == [True, False] and result.choice.path == "a"
    assert "not both measured" in result.table()


def test_the_ranked_layer_and_ties_do_not_depend_on_the_checkpoint_order():
    """D_eff/Psi_eff are the first monitored layer's (key_order) even where the first checkpoint lacks
    them; an exact D_eff tie is broken by Psi_eff, so the choice stays on the Pareto front."""
    a = {"geometry/fc/glue_dimension": 3.0, "geometry/fc/glue_utility": 0.3}
    b = {"geometry/body/glue_dimension": 9.0, "geometry/body/glue_utility": 0.9}
    b.update({"geometry/fc/glue_dimension": 1.0, "geometry/fc/glue_utility": 0.1})
    c = {**b, "geometry/body/glue_dimension": 1.0, "geometry/fc/glue_dimension": 2.0}
    order = ["geometry/fc/glue_dimension", "geometry/fc/glue_utility", "geometry/body/glue_dimension"]
    choices = set()
    for perm in itertools.permutations(
        [("a", {"geometry/body/glue_dimension": 5.0} | a), ("b", b), ("c", c)]
    ):
        scores = [CheckpointScore(name, dict(v)) for name, v in perm]
        for score in scores:  # checkpoint "a" lacks the body layer's utility: skipped there
            score.values.pop("geometry/body/glue_utility", None) if score.path == "a" else None
        result = rank_scores(scores, key_order=order)
        assert result.dimension_key == "geometry/fc/glue_dimension"
        choices.add(result.choice.path)
    assert choices == {"a"}
    tied = [
        CheckpointScore("low", {"geometry/glue_dimension": 2.0, "geometry/glue_utility": 0.2}),
        CheckpointScore("high", {"geometry/glue_dimension": 2.0, "geometry/glue_utility": 0.4}),
    ]
    result = rank_scores(tied)
    assert result.choice.path == "high" and [s.path for s in result.pareto] == ["high"]


def test_a_misspelt_layer_stops_at_the_first_checkpoint_and_warnings_read_as_one_line(run, tmp_path, capsys):
    """A layer that the first checkpoint's model lacks is a typo (the same class builds every
    checkpoint): every checkpoint used to be measured and the same error printed once each, then a
    dict of them. Warnings of a command-line run read "lightning-geomarkers rank: warning: ..." instead
    of starting with the package's file and line."""
    paths, _ = run
    before = warnings.formatwarning
    measured = []
    real = rank_module.evaluate_model
    rank_module.evaluate_model = lambda *a, **k: measured.append(1) or real(*a, **k)
    try:
        argv = ["rank", *paths[:2], "--model", MODEL, "--data", DATA, *OPTIONS, "--quiet", "--out", tmp_path]
        assert main([*argv, "--layers", "body.9"]) == 1
    finally:
        rank_module.evaluate_model = real
    err = capsys.readouterr().err
    assert not measured and err.count("body.9") == 1 and "the first checkpoint" in err, err
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # Python's default printer, as in a terminal (pytest records warnings instead of printing them)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        )
        code = main([*argv[:-2], "--out", tmp_path / "w", "--seed", "5", "--markers", "glue"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "lightning-geomarkers rank: warning: " in err and "seed=1, and this ranking uses seed=5" in err
    assert "rank.py:" not in err
    assert warnings.formatwarning is before  # restored after the run


def test_ranking_with_other_settings_than_the_run_warns_naming_them(run):
    """The monitor's checkpoint state records its value settings; ranking with other ones (here n_t and
    samples_per_class) measures other numbers than the logged ones, and says so once, naming them."""
    paths, live = run
    with pytest.warns(
        UserWarning,
        match=r"other settings than this ranking's \(samples_per_class: logged 20, here 25; points_per_class: logged 20, here 25; n_t: logged 30, here 40\)",
    ) as record:
        rank_checkpoints(
            paths,
            TinyMLP,
            val_loader,
            monitor=GeometryMonitor(**{**SETTINGS, "n_t": 40, "samples_per_class": 25}),
            out=None,
            progress=False,
        )
    assert sum("other settings" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's own settings: no warning at all
        result = rank_checkpoints(
            paths[:1], TinyMLP, val_loader, monitor=GeometryMonitor(**SETTINGS), out=None, progress=False
        )
    (score,) = result.scores
    assert score.values["geometry/glue_dimension"] == pytest.approx(
        live[score.epoch]["glue_dimension"], rel=1e-9
    )


def test_settings_comparison_is_not_fooled_by_spellings_or_tensors():
    """layers=["fc"] and layers="fc" log the same keys and values (a one-layer list is recorded as the
    name); explicit dichotomies are tensors (their comparison raised 'Boolean value of Tensor ...')."""
    one = GeometryMonitor(layers=["fc:input"]).value_settings()
    assert one["layers"] == "fc:input" == GeometryMonitor(layers="fc:input").value_settings()["layers"]
    y = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    logged = GeometryMonitor(dichotomies=y).value_settings()
    assert GeometryMonitor(dichotomies=y.clone()).settings_differences(logged) == []
    differ = GeometryMonitor(dichotomies=-y).settings_differences(logged)
    assert [name for name, _, _ in differ] == ["dichotomies"]


class CastsToItsDtype(TinyMLP):
    """A model that casts its inputs to its own dtype (LightningModule.dtype)."""

    def forward(self, x):
        return super().forward(x.to(self.dtype))


@pytest.mark.parametrize(
    ("precision", "model_cls"), [("64-true", TinyMLP), ("bf16-true", TinyMLP), ("64-true", CastsToItsDtype)]
)
def test_ranking_measures_a_true_precision_checkpoint_in_its_own_dtype(tmp_path, precision, model_cls):
    """load_from_checkpoint builds the module in float32 and copies the weights into it: a 64-true
    checkpoint lost its float64 digits and a bf16-true one ran in float32, so the ranked values were not
    the logged ones (2.4% off on a bf16-true run in a review), without a word. Weights assigned as float64
    then left LightningModule.dtype at float32: a model casting its inputs to self.dtype failed."""
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=30)
    settings = dict(markers=["glue_dimension", "glue_utility"], samples_per_class=20, n_t=30, n_pairs=None)
    monitor = GeometryMonitor(**settings)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    tr = trainer(tmp_path, [monitor, ckpt], max_epochs=1, logger=False, precision=precision)
    tr.fit(model_cls(), *loaders(x, y))
    result = rank_checkpoints(
        [tmp_path / "ckpt" / "last.ckpt"],
        model_cls,
        val_loader,
        monitor=GeometryMonitor(**settings),
        out=None,
        progress=False,
    )
    (score,) = result.scores
    for marker in ("glue_dimension", "glue_utility"):
        assert score.values[f"geometry/{marker}"] == pytest.approx(monitor.history[-1][marker], rel=1e-9)


def test_misspelt_thresholds_and_unusable_devices_are_refused_before_measuring(run, monkeypatch):
    """A misspelt threshold was refused only after every checkpoint was measured; --device cuda on a
    machine without CUDA was reported as a checkpoint that --model could not load."""
    paths, _ = run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a checkpoint was measured")

    monkeypatch.setattr(rank_module, "evaluate_model", must_not_run)
    monitor = GeometryMonitor(**SETTINGS)
    with pytest.raises(CLIError, match=r"Threshold on 'glue_utilty'.*did you mean \['glue_utility',"):
        rank_checkpoints(paths, TinyMLP, val_loader, monitor=monitor, floors={"glue_utilty": 0.3}, out=None)
    with pytest.raises(CLIError, match=r"computes no marker 'nc1'"):
        glue_only = GeometryMonitor(markers="glue", **SETTINGS)
        rank_checkpoints(
            paths, TinyMLP, val_loader, monitor=glue_only, ceilings={"geometry/nc1": 1}, out=None
        )
    absent = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(CLIError, match=rf"--device '{absent}' cannot be used on this machine.*--device cpu"):
        rank_checkpoints(paths, TinyMLP, val_loader, monitor=monitor, out=None, device=absent)


def test_equivalent_layer_spellings_and_a_list_of_batches_give_no_false_warning(run):
    """layers="fc:input" measures what the run's layers=None logged, and a list of batches (what the
    generator error recommends) is one loader: both were warned about as if the values were off."""
    paths, live = run
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = rank_checkpoints(
            paths[:1],
            TinyMLP,
            lambda: list(val_loader()),
            monitor=GeometryMonitor("fc:input", **SETTINGS),
            out=None,
            progress=False,
        )
    (score,) = result.scores
    assert score.values["geometry/glue_dimension"] == pytest.approx(
        live[score.epoch]["glue_dimension"], rel=1e-9
    )
    with pytest.warns(
        UserWarning,
        match=r"other settings than this ranking's \(layer_ids: logged \['fc:input'\], here \['body.2:input'\]\)",
    ):
        rank_checkpoints(
            paths[:1],
            TinyMLP,
            val_loader,
            monitor=GeometryMonitor("body.2:input", **SETTINGS),
            out=None,
            progress=False,
        )


def test_when_every_checkpoint_fails_the_error_points_at_the_batches(run):
    paths, _ = run
    swapped = lambda: [(y, x) for x, y in val_loader()]  # noqa: E731  (labels first: a common slip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            CLIError, match=r"No checkpoint could be measured.*look at --data: batches of \(inputs, labels\)"
        ):
            rank_checkpoints(
                paths[:2], TinyMLP, swapped, monitor=GeometryMonitor(**SETTINGS), out=None, progress=False
            )


def test_a_threshold_on_a_standard_error_is_refused_before_measuring(run, monkeypatch):
    paths, _ = run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a checkpoint was measured")

    monkeypatch.setattr(rank_module, "evaluate_model", must_not_run)
    with pytest.raises(CLIError, match="computes no marker 'glue_dimension_se'"):
        rank_checkpoints(
            paths,
            TinyMLP,
            val_loader,
            monitor=GeometryMonitor(**SETTINGS),
            floors={"glue_dimension_se": 0.1},
            out=None,
        )
