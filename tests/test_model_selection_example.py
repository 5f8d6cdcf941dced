"""``examples/model_selection.py --fast`` runs end to end: checkpoints ranked by the command line, the
rule's choice printed next to the transfer accuracy, and the choice consistent with the CSV it wrote."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
from tests.test_examples import load_example  # noqa: E402


def test_model_selection_fast(tmp_path, monkeypatch, capsys):
    example = load_example("model_selection", monkeypatch)
    out = example.main(["--fast", "--log-dir", tmp_path])
    printed = capsys.readouterr().out

    rows = out["rows"]
    assert len(rows) == len(out["checkpoints"]) == 6  # 3 variants x 2 checkpoints
    assert all(0.0 <= r["transfer"] <= 1.0 and 0.0 <= r["id_acc"] <= 1.0 for r in rows)
    ranking = Path(out["ranking_dir"])
    assert (ranking / "markers.csv").is_file() and (ranking / "ranking.md").is_file()

    # The choice is the checkpoint with the most "both higher" wins in the CSV the command line wrote.
    with (ranking / "markers.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    d = {Path(r["path"]).stem: float(r["geometry/glue_dimension"]) for r in table}
    u = {Path(r["path"]).stem: float(r["geometry/glue_utility"]) for r in table}
    wins = {a: sum(d[a] > d[b] and u[a] > u[b] for b in d) for a in d}
    assert wins[out["choice"]] == max(wins.values())
    assert (
        f"`{next(r['path'] for r in table if Path(r['path']).stem == out['choice'])}`"
        in (ranking / "ranking.md").read_text()
    )

    # What it prints: the table with the transfer accuracy, and the three picks.
    assert "transfer acc" in printed and "<- rule" in printed and "<- best transfer" in printed
    assert f"rule's choice:   {out['choice']}" in printed
    hits, pairs = out["rule_agreement"]
    assert 0 <= hits <= pairs


def test_a_variant_trains_the_same_whatever_trained_before_it_and_the_last_epoch_is_kept(
    tmp_path, monkeypatch
):
    """The train loader's shuffle generator carried on from the variants trained before, so a variant's
    model depended on the run order; and with an odd number of epochs the last epoch was not saved."""
    import torch

    example = load_example("model_selection", monkeypatch)
    alone = example.train_variants(["w16"], 3, tmp_path / "alone", seed=0)
    after = example.train_variants(["w8", "w16"], 3, tmp_path / "after", seed=0)
    assert [p.name for _, p in alone] == ["w16-epoch=0.ckpt", "w16-epoch=2.ckpt"]  # middle and last of 3
    w16_after = [p for name, p in after if name == "w16"]
    assert [p.name for p in w16_after] == [p.name for _, p in alone]
    for (_, a), b in zip(alone, w16_after, strict=True):
        sa = torch.load(a, map_location="cpu", weights_only=False)["state_dict"]
        sb = torch.load(b, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
