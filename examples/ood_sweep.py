"""The paper's OOD-forecast protocol in miniature, on real data (sklearn's 8x8 digits).

Chou, Kirsanov, Yang & Chung (ICLR 2026) train many models, measure the GLUE geometry of the penultimate
layer on in-distribution (ID) data, and find that ID effective dimension D_eff and utility Psi_eff
forecast class-disjoint out-of-distribution (OOD) transfer better than ID accuracy does. This script
repeats that protocol at a scale that runs on a laptop CPU:

* ID task: classify digits 0-4 (stratified train / held-out split).
* OOD task: the class-disjoint digits 5-9. OOD accuracy is the test accuracy of a linear probe
  (standardised features, logistic regression with a fixed C) trained on the frozen penultimate features
  of digits 5-9 (stratified probe-train / probe-test split).
* A sweep of small models (a CNN and an MLP; SGD with momentum; several learning rates x weight decays x
  seeds) trained with plain PyTorch Lightning on the ID task.
* For each model: ID accuracy on the held-out ID data, every marker of
  :func:`lightning_geomarkers.functional.geometry_markers` on the frozen penultimate features (the input of
  the final ``nn.Linear``) of the held-out ID data (pairs protocol, one fixed configuration and seed for
  every model), and the OOD probe accuracy.
* Pearson and Spearman correlation of every marker, and of ID accuracy, with OOD accuracy, over all
  models and within each architecture; and the pairwise rule of the paper: over model pairs where one
  model has both higher D_eff and higher Psi_eff, how often does it transfer better, against how often
  the model with higher ID accuracy transfers better.

Outputs in ``--out`` (default ``runs/ood_sweep``): ``models.csv``, ``correlations.csv``, ``rules.csv``
and ``heatmap.png``.

Run::

    python examples/ood_sweep.py              # full sweep (60 models; see docs/reproduction.md)
    python examples/ood_sweep.py --quick      # 6 tiny models, a smoke test of every code path
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from lightning_geomarkers.functional import MARKERS, geometry_markers

ID_CLASSES = (0, 1, 2, 3, 4)
OOD_CLASSES = (5, 6, 7, 8, 9)
WIDTH = 64  # penultimate width N, the same for both architectures (GLUE pairs: P*M = 100 <= 2N)
DATA_SEED = 0  # the ID / OOD splits
MARKER_SEED = 0  # the GLUE pairs, subsamples, probes and dichotomies: identical for every model
PROBE_C = 1.0  # inverse L2 strength of the OOD linear probe
MARKER_NAMES = tuple(MARKERS)  # every marker of the suite, lid_twonn included
D_EFF, PSI_EFF = "glue_dimension", "glue_utility"


# ----------------------------------------------------------------------------------------------------
# Sweep configuration
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepConfig:
    """The grid (every combination is one model) and the measurement protocol."""

    archs: tuple[str, ...]
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int = 32
    momentum: float = 0.9
    points_per_class: int = 50
    n_t: int = 200
    lid_k: int = 20

    def models(self) -> list[dict[str, Any]]:
        return [
            {"arch": a, "lr": lr, "weight_decay": wd, "seed": s}
            for a, lr, wd, s in itertools.product(self.archs, self.lrs, self.weight_decays, self.seeds)
        ]


FULL = SweepConfig(
    archs=("cnn", "mlp"),
    lrs=(0.001, 0.003, 0.01, 0.03, 0.1),
    weight_decays=(0.0, 1e-3, 1e-2),
    seeds=(0, 1),
    epochs=15,
)
QUICK = SweepConfig(
    archs=("cnn", "mlp"),
    lrs=(0.001, 0.01, 0.1),
    weight_decays=(1e-3,),
    seeds=(0,),
    epochs=2,
    n_t=40,
)


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


@dataclass
class Data:
    id_train_x: torch.Tensor
    id_train_y: torch.Tensor
    id_test_x: torch.Tensor
    id_test_y: torch.Tensor
    ood_x: torch.Tensor
    ood_y: torch.Tensor
    ood_train_idx: np.ndarray
    ood_test_idx: np.ndarray


def load_data() -> Data:
    """Digits 0-4 (60 % train / 40 % held out) and digits 5-9 (50 % probe-train / 50 % probe-test)."""
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    id_mask = np.isin(y, ID_CLASSES)
    x_id, y_id = x[id_mask], y[id_mask]
    x_ood, y_ood = x[~id_mask], y[~id_mask] - min(OOD_CLASSES)
    tr, te = train_test_split(np.arange(len(y_id)), test_size=0.4, stratify=y_id, random_state=DATA_SEED)
    mean, std = x_id[tr].mean(), x_id[tr].std()  # one scalar normalisation, fitted on ID train only
    ood_tr, ood_te = train_test_split(
        np.arange(len(y_ood)), test_size=0.5, stratify=y_ood, random_state=DATA_SEED
    )

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).unsqueeze(1)  # (S, 1, 8, 8)

    return Data(
        id_train_x=t(x_id[tr]),
        id_train_y=torch.from_numpy(y_id[tr]),
        id_test_x=t(x_id[te]),
        id_test_y=torch.from_numpy(y_id[te]),
        ood_x=t(x_ood),
        ood_y=torch.from_numpy(y_ood),
        ood_train_idx=ood_tr,
        ood_test_idx=ood_te,
    )


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def make_backbone(arch: str) -> nn.Module:
    """Everything up to the penultimate representation (WIDTH features after a ReLU)."""
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (32, 4, 4)
            nn.Flatten(),
            nn.Linear(32 * 16, WIDTH),
            nn.ReLU(),
        )
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, WIDTH), nn.ReLU())
    raise ValueError(f"Unknown arch {arch!r}; choose 'cnn' or 'mlp'.")


class Classifier(L.LightningModule):
    def __init__(self, arch: str, lr: float, weight_decay: float, momentum: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = make_backbone(arch)
        self.head = nn.Linear(WIDTH, len(ID_CLASSES))  # the final Linear: its input is the penultimate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners and the tiny-dataset worker hints, restoring state afterwards."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def train_model(spec: dict[str, Any], cfg: SweepConfig, data: Data) -> Classifier:
    """Plain Lightning training on the ID train split; the torch global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = Classifier(spec["arch"], spec["lr"], spec["weight_decay"], cfg.momentum)
        loader = DataLoader(
            TensorDataset(data.id_train_x, data.id_train_y),
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(spec["seed"]),
        )
        with _quiet_lightning():
            trainer = L.Trainer(
                max_epochs=cfg.epochs,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(model, loader)
    return model.eval()


@torch.no_grad()
def penultimate(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits): the input of the final Linear, captured by a forward pre-hook, and the output."""
    captured: list[torch.Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured[0], logits


# ----------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------


def ood_probe_accuracy(features: np.ndarray, labels: np.ndarray, data: Data) -> float:
    """Test accuracy of a standardised logistic-regression probe on digits 5-9 (fixed C, fixed split)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=5000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on collapsed features: reported via accuracy
        probe.fit(features[data.ood_train_idx], labels[data.ood_train_idx])
        return float(probe.score(features[data.ood_test_idx], labels[data.ood_test_idx]))


def measure(model: Classifier, cfg: SweepConfig, data: Data) -> dict[str, Any]:
    """ID accuracy, every marker on held-out ID penultimate features, and the OOD probe accuracy."""
    feats, logits = penultimate(model, data.id_test_x)
    row: dict[str, Any] = {"id_acc": float((logits.argmax(1) == data.id_test_y).double().mean())}
    ood_feats, _ = penultimate(model, data.ood_x)
    finite = bool(torch.isfinite(feats).all() and torch.isfinite(ood_feats).all())
    row["diverged"] = int(not finite)
    row["ood_acc"] = ood_probe_accuracy(ood_feats.numpy(), data.ood_y.numpy(), data) if finite else math.nan
    row.update({name: math.nan for name in MARKER_NAMES})
    row["glue_n_degenerate"], row["skipped"] = math.nan, ""
    if not finite:
        row["skipped"] = "non-finite features"
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate probes are counted in glue_n_degenerate instead
        report = geometry_markers(
            feats,
            data.id_test_y,
            markers=MARKER_NAMES,
            glue_protocol="pairs",
            points_per_class=cfg.points_per_class,
            n_pairs=None,  # all C(5, 2) = 10 class pairs
            n_t=cfg.n_t,
            lid_k=cfg.lid_k,
            generator=MARKER_SEED,
            strict=False,
        )
    row.update({name: float(v) for name, v in report.values.items()})
    if report.glue is not None:
        row["glue_n_degenerate"] = report.glue.n_degenerate
    row["skipped"] = "; ".join(f"{k}: {v}" for k, v in report.skipped.items())
    return row


# ----------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------


def correlate(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman with two-sided p-values over the rows where both are finite (NaN if constant)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = {"n": int(ok.sum()), "pearson_r": math.nan, "pearson_p": math.nan}
    out.update(spearman_rho=math.nan, spearman_p=math.nan)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    out.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue))
    out.update(spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))
    return out


def pairwise_rules(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The paper's selection rules over all pairs of ``rows``.

    Geometry rule: among pairs where one model has both higher D_eff and higher Psi_eff, the fraction
    where that model has the higher OOD accuracy. ID rule: among pairs with different ID accuracy, the
    fraction where the model with the higher ID accuracy has the higher OOD accuracy. Pairs with equal
    OOD accuracy (no right answer) or non-finite values are left out of both.
    """
    geo_right = geo_n = id_right = id_n = ties = 0
    for a, b in itertools.combinations(rows, 2):
        vals = [a[k] for k in (D_EFF, PSI_EFF, "id_acc", "ood_acc")]
        vals += [b[k] for k in (D_EFF, PSI_EFF, "id_acc", "ood_acc")]
        if not all(math.isfinite(v) for v in vals):
            continue
        d_ood = a["ood_acc"] - b["ood_acc"]
        if d_ood == 0:
            ties += 1
            continue
        d_d, d_p = a[D_EFF] - b[D_EFF], a[PSI_EFF] - b[PSI_EFF]
        if d_d * d_p > 0:  # one model has both higher
            geo_n += 1
            geo_right += int(d_d * d_ood > 0)
        d_id = a["id_acc"] - b["id_acc"]
        if d_id != 0:
            id_n += 1
            id_right += int(d_id * d_ood > 0)
    return {
        "geometry_rule": geo_right / geo_n if geo_n else math.nan,
        "geometry_rule_pairs": geo_n,
        "id_accuracy_rule": id_right / id_n if id_n else math.nan,
        "id_accuracy_rule_pairs": id_n,
        "ood_ties_excluded": ties,
    }


def analyse(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Correlation table (per group: all models, then each architecture) and rule fractions per group."""
    groups: dict[str, list[dict[str, Any]]] = {"all": list(rows)}
    for arch in dict.fromkeys(r["arch"] for r in rows):
        groups[arch] = [r for r in rows if r["arch"] == arch]
    table: list[dict[str, Any]] = []
    rules: dict[str, dict[str, float]] = {}
    for group, members in groups.items():
        ood = np.array([r["ood_acc"] for r in members], dtype=float)
        for name in ("id_acc", *MARKER_NAMES):
            x = np.array([r[name] for r in members], dtype=float)
            sign = MARKERS[name].higher_is_better if name in MARKERS else None
            expected = {True: "+", False: "-", None: "?"}[sign]
            table.append({"group": group, "marker": name, "expected_sign": expected, **correlate(x, ood)})
        rules[group] = pairwise_rules(members)
    # Within-architecture pairs only, pooled over architectures (the paper's "versions of one model").
    within = [pairwise_rules(m) for g, m in groups.items() if g != "all"]
    if len(within) > 1:
        pooled: dict[str, float] = {}
        for kind in ("geometry_rule", "id_accuracy_rule"):
            n = sum(w[f"{kind}_pairs"] for w in within)
            right = sum(w[kind] * w[f"{kind}_pairs"] for w in within if w[f"{kind}_pairs"])
            pooled[kind] = right / n if n else math.nan
            pooled[f"{kind}_pairs"] = n
        pooled["ood_ties_excluded"] = sum(w["ood_ties_excluded"] for w in within)
        rules["within_arch"] = pooled
    return table, rules


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:  # repr keeps full float precision
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def plot_heatmap(table: Sequence[dict[str, Any]], path: Path, n_models: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in table))
    names = list(dict.fromkeys(r["marker"] for r in table))
    cols = [(g, stat) for g in groups for stat in ("pearson", "spearman")]
    lookup = {(r["group"], r["marker"]): r for r in table}
    vals = np.full((len(names), len(cols)), np.nan)
    pvals = np.full_like(vals, np.nan)
    for i, name in enumerate(names):
        for j, (g, stat) in enumerate(cols):
            r = lookup[(g, name)]
            key = "pearson_r" if stat == "pearson" else "spearman_rho"
            vals[i, j], pvals[i, j] = r[key], r[f"{stat}_p"]
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 3.2, 0.42 * len(names) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(vals), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for i, j in itertools.product(range(len(names)), range(len(cols))):
        v, p = vals[i, j], pvals[i, j]
        text = "n/a" if not np.isfinite(v) else f"{v:+.2f}" + ("*" if p < 0.05 else "")
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if abs(v) > 0.6 else "black")
    n_per = {g: lookup[(g, "id_acc")]["n"] for g in groups}
    ax.set_xticks(range(len(cols)), [f"{g} (n={n_per[g]})\n{s}" for g, s in cols], fontsize=8)
    labels = [f"{n} ({lookup[(groups[0], n)]['expected_sign']})" for n in names]
    ax.set_yticks(range(len(names)), labels, fontsize=8)
    ax.axhline(0.5, color="black", lw=1)
    ax.set_title(
        f"Correlation with class-disjoint OOD probe accuracy (digits 0-4 -> 5-9), {n_models} models\n"
        "* p < 0.05; (sign) = literature's sign for better transfer",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def format_table(table: Sequence[dict[str, Any]], rules: dict[str, dict[str, float]]) -> str:
    lines = []
    for group in dict.fromkeys(r["group"] for r in table):
        lines.append(f"\n[{group}]")
        lines.append(f"{'marker':<28}{'exp':>4}{'n':>4}{'pearson r':>11}{'p':>10}{'spearman':>10}{'p':>10}")
        for r in (r for r in table if r["group"] == group):
            lines.append(
                f"{r['marker']:<28}{r['expected_sign']:>4}{r['n']:>4}{r['pearson_r']:>+11.3f}"
                f"{r['pearson_p']:>10.2g}{r['spearman_rho']:>+10.3f}{r['spearman_p']:>10.2g}"
            )
    lines.append("\nPairwise rules (fraction of model pairs where the preferred model transfers better):")
    lines.append(f"{'pairs':<14}{'D_eff & Psi_eff':>17}{'n':>6}{'ID accuracy':>14}{'n':>6}{'OOD ties':>10}")
    for group, r in rules.items():
        lines.append(
            f"{group:<14}{r['geometry_rule']:>17.3f}{r['geometry_rule_pairs']:>6}"
            f"{r['id_accuracy_rule']:>14.3f}{r['id_accuracy_rule_pairs']:>6}{r['ood_ties_excluded']:>10}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ood_sweep"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="6 tiny models (CI smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these tiny models run much slower on 2 contended threads)",
    )
    return parser.parse_args(None if argv is None else [str(a) for a in argv])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns ``{"correlations": [...], "rules": {...}, "n_models", "elapsed_s", "out"}``."""
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.epochs is not None:
        cfg = SweepConfig(**{**asdict(cfg), "epochs": args.epochs})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(cfg, out, args)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: SweepConfig, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    data = load_data()
    rows: list[dict[str, Any]] = []
    bar = tqdm(cfg.models(), desc="models", unit="model", disable=args.no_progress)
    for spec in bar:
        t0 = time.perf_counter()
        model = train_model(spec, cfg, data)
        row = {**spec, "epochs": cfg.epochs, **measure(model, cfg, data)}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        bar.set_postfix(id=f"{row['id_acc']:.3f}", ood=f"{row['ood_acc']:.3f}", D=f"{row[D_EFF]:.2f}")
    table, rules = analyse(rows)
    elapsed = time.perf_counter() - start

    write_csv(out / "models.csv", rows)
    write_csv(out / "correlations.csv", table)
    write_csv(out / "rules.csv", [{"pairs": g, **r} for g, r in rules.items()])
    plot_heatmap(table, out / "heatmap.png", len(rows))

    print(
        f"\n{len(rows)} models ({sum(r['diverged'] for r in rows)} diverged) in {elapsed:.0f} s on "
        f"{platform.machine()} with {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). Protocol: pairs, M={cfg.points_per_class}, "
        f"n_t={cfg.n_t}, all 10 class pairs, seed {MARKER_SEED}; OOD probe C={PROBE_C}."
    )
    print(format_table(table, rules))
    print(f"\nWrote {out}/models.csv, correlations.csv, rules.csv, heatmap.png")
    return {
        "correlations": table,
        "rules": rules,
        "n_models": len(rows),
        "elapsed_s": elapsed,
        "out": str(out),
    }


if __name__ == "__main__":
    main()
