"""Smoke test of examples/ood_sweep.py (the paper's OOD-forecast protocol on sklearn digits), --quick mode."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lightning_geomarkers.functional import MARKERS  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ood_sweep.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("ood_sweep_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ood_sweep")
    result = _load_script().main(["--quick", "--no-progress", "--out", str(out)])
    return out, result


def test_outputs_exist_with_columns(quick_run):
    out, result = quick_run
    for name in ("models.csv", "correlations.csv", "rules.csv", "heatmap.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    models = _read(out / "models.csv")
    assert len(models) == result["n_models"] >= 4
    expected = {"arch", "lr", "weight_decay", "seed", "epochs", "id_acc", "ood_acc", *MARKERS}
    assert expected <= set(models[0])
    assert {r["arch"] for r in models} == {"cnn", "mlp"}
    for r in models:
        assert 0.0 <= float(r["id_acc"]) <= 1.0
        assert 0.0 <= float(r["ood_acc"]) <= 1.0

    corr = _read(out / "correlations.csv")
    assert {"group", "marker", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"} <= set(corr[0])
    assert {r["marker"] for r in corr} == {"id_acc", *MARKERS}
    assert {r["group"] for r in corr} == {"all", "cnn", "mlp"}
    assert len(corr) == len(result["correlations"])

    rules = _read(out / "rules.csv")
    assert {"pairs", "geometry_rule", "id_accuracy_rule"} <= set(rules[0])
    assert {r["pairs"] for r in rules} == {"all", "cnn", "mlp", "within_arch"}


def test_correlations_and_rules_in_range(quick_run):
    _, result = quick_run
    by_key = {(r["group"], r["marker"]): r for r in result["correlations"]}
    for key in (("all", "id_acc"), ("all", "glue_dimension"), ("all", "glue_utility")):
        assert math.isfinite(by_key[key]["pearson_r"]) and math.isfinite(by_key[key]["spearman_rho"]), key
    for r in result["correlations"]:
        for stat in ("pearson_r", "spearman_rho"):
            v = r[stat]
            assert math.isnan(v) or -1.0 - 1e-12 <= v <= 1.0 + 1e-12, (r["group"], r["marker"], stat, v)
        for p in ("pearson_p", "spearman_p"):
            assert math.isnan(r[p]) or 0.0 <= r[p] <= 1.0
    all_pairs = result["rules"]["all"]
    assert all_pairs["id_accuracy_rule_pairs"] > 0 and all_pairs["geometry_rule_pairs"] > 0
    for group, r in result["rules"].items():
        for kind in ("geometry_rule", "id_accuracy_rule"):
            assert math.isnan(r[kind]) or 0.0 <= r[kind] <= 1.0, (group, kind)


def test_correlation_matches_numpy(quick_run):
    out, result = quick_run
    models = _read(out / "models.csv")
    for marker in ("glue_dimension", "id_acc"):
        x = np.array([float(r[marker]) for r in models])
        y = np.array([float(r["ood_acc"]) for r in models])
        ok = np.isfinite(x) & np.isfinite(y)
        expected = np.corrcoef(x[ok], y[ok])[0, 1]
        from_result = next(r for r in result["correlations"] if r["group"] == "all" and r["marker"] == marker)
        from_csv = next(
            r for r in _read(out / "correlations.csv") if r["group"] == "all" and r["marker"] == marker
        )
        assert from_result["n"] == int(ok.sum())
        assert from_result["pearson_r"] == pytest.approx(expected, abs=1e-10)
        assert float(from_csv["pearson_r"]) == pytest.approx(expected, abs=1e-10)


def test_pairwise_rule_matches_brute_force(quick_run):
    out, result = quick_run
    models = _read(out / "models.csv")
    d = np.array([float(r["glue_dimension"]) for r in models])
    psi = np.array([float(r["glue_utility"]) for r in models])
    ood = np.array([float(r["ood_acc"]) for r in models])
    right = total = 0
    for i in range(len(models)):
        for j in range(len(models)):
            if d[i] > d[j] and psi[i] > psi[j] and ood[i] != ood[j]:
                total += 1
                right += ood[i] > ood[j]
    assert result["rules"]["all"]["geometry_rule_pairs"] == total
    assert result["rules"]["all"]["geometry_rule"] == pytest.approx(right / total)
