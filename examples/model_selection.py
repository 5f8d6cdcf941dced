"""Model selection with geometry markers: rank checkpoints of several variants, then check the choice.

Trains a handful of CNN variants (widths, learning rates, weight decay, optimizers) on the digits 0-4,
saves their checkpoints, and ranks every checkpoint with the command line::

    lightning-geomarkers rank CKPT ... --model examples/_digits.py:DigitsCNN \\
        --data examples/model_selection.py:id_val_loader --out runs/model_selection/ranking

(run in-process here through ``lightning_geomarkers.cli.main``). The rule is the paper's: prefer the
checkpoint with both higher D_eff and higher Psi_eff on in-distribution validation data. The script then
measures what the rule is meant to forecast, the transfer to held-out classes: a few-shot linear probe
(standardised features, logistic regression; 10 images per class, 5 seeded splits averaged) trained on
the frozen penultimate features of the digits 5-9, never seen in training, and scored on the others. It prints the ranking next to the
transfer accuracy, and how often the rule and ID accuracy pick the better-transferring checkpoint of a
pair.

    python examples/model_selection.py           # 6 variants x 2 checkpoints, ~1-2 min on 2 CPU cores
    python examples/model_selection.py --fast    # 3 variants x 2 checkpoints, reduced settings (a smoke test)

Needs scikit-learn (the digits data and the probe); matplotlib for ``markers.png`` (optional).
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from _digits import (
    DigitsCNN,
    ExampleParser,
    cpu_threads,
    digits_loaders,
    digits_tensors,
    make_trainer,
    monitor_settings,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from lightning_geomarkers.cli import CheckpointScore, both_higher_counts, rank_scores
from lightning_geomarkers.cli import main as cli_main

ID_CLASSES = (0, 1, 2, 3, 4)
OOD_CLASSES = (5, 6, 7, 8, 9)
DATA_SEED = 0
PROBE_SHOTS = 10  # probe-training images per held-out class
PROBE_SPLITS = 5  # seeded probe splits averaged
EXAMPLES = Path(__file__).resolve().parent

#: name -> DigitsCNN arguments. Penultimate width: 8 * width (a 2 x 2 pooled grid of 2 * width channels).
VARIANTS: dict[str, dict[str, Any]] = {
    "w8": dict(width=8, lr=3e-3),
    "w16": dict(width=16, lr=3e-3),
    "w32": dict(width=32, lr=3e-3),
    "w16-lr3e-2": dict(width=16, lr=3e-2),
    "w16-wd": dict(width=16, lr=3e-3, optimizer="adamw", weight_decay=0.5),
    "w16-sgd": dict(width=16, lr=0.05, optimizer="sgd"),
}
FAST_VARIANTS = ("w8", "w16", "w16-lr3e-2")


def id_val_loader() -> DataLoader:
    """The in-distribution validation loader (digits 0-4, 30 % held out): the ``--data`` of the ranking."""
    return digits_loaders(batch_size=64, val_fraction=0.3, seed=DATA_SEED, classes=ID_CLASSES)[1]


def _cli_options(fast: bool) -> list[str]:
    """The monitor settings as command-line options (the defaults, or the examples' --fast settings)."""
    names = {
        "samples_per_class": "--samples-per-class",
        "n_pairs": "--n-pairs",
        "n_t": "--n-t",
        "lid_k": "--lid-k",
    }
    return [a for k, v in monitor_settings(fast).items() for a in (names[k], str(v))]


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings(
        "ignore", message=".*exists and is not empty.*"
    )  # one directory for every variant


def train_variants(names: Sequence[str], epochs: int, out: Path, seed: int) -> list[tuple[str, Path]]:
    """Train each variant on digits 0-4; keep a checkpoint at the middle and at the end of training."""
    train_loader, val_loader = digits_loaders(
        batch_size=64, val_fraction=0.3, seed=DATA_SEED, classes=ID_CLASSES
    )
    keep = {max(0, epochs // 2 - 1), epochs - 1}  # the middle and the last epoch (0-based)
    ckpt_dir = out / "checkpoints"
    saved: list[tuple[str, Path]] = []
    for name in VARIANTS:  # this script's own files from an earlier run (a --fast run leaves no full one)
        for stale in ckpt_dir.glob(f"{name}-epoch=*.ckpt"):
            stale.unlink()
    for name in names:
        L.seed_everything(seed, workers=True, verbose=False)
        # Every variant sees the same batch order: the loader's generator is reseeded for each (it would
        # otherwise carry on from the variants trained before, so a variant's model depended on them).
        train_loader.generator.manual_seed(DATA_SEED)
        model = DigitsCNN(num_classes=len(ID_CLASSES), **VARIANTS[name])
        ckpt = ModelCheckpoint(
            dirpath=ckpt_dir, filename=f"{name}-{{epoch}}", save_top_k=-1, every_n_epochs=1
        )
        trainer = make_trainer(epochs, [ckpt], logger=False, enable_checkpointing=True)
        with cpu_threads(1):
            trainer.fit(model, train_loader, val_loader)
        for path in sorted(ckpt_dir.glob(f"{name}-epoch=*.ckpt"), key=_epoch_of):
            if _epoch_of(path) in keep:
                saved.append((name, path))
            else:
                path.unlink()
    return saved


def _epoch_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


@torch.no_grad()
def _features(model: DigitsCNN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of ``x`` in eval mode."""
    model.eval()
    feats = model.features(x)
    return feats, model.fc(feats)


def transfer_and_id_accuracy(path: Path) -> tuple[float, float]:
    """(transfer accuracy on digits 5-9, ID validation accuracy) of a checkpoint.

    Transfer: a few-shot linear probe on the frozen penultimate features of the held-out digits 5-9,
    trained on ``PROBE_SHOTS`` images per class and scored on all the others, averaged over
    ``PROBE_SPLITS`` seeded splits. (A probe trained on half of the 5-9 digits scores ~0.98 for every
    checkpoint here: the task saturates, and the few-shot probe is where representations differ.)
    """
    model = DigitsCNN.load_from_checkpoint(path, map_location="cpu")
    ood_x, ood_y = digits_tensors(OOD_CLASSES)
    feats, labels = _features(model, ood_x)[0].numpy(), ood_y.numpy()
    scores = []
    for split in range(PROBE_SPLITS):
        tr, te = train_test_split(
            np.arange(len(labels)),
            train_size=PROBE_SHOTS * len(OOD_CLASSES),
            stratify=labels,
            random_state=DATA_SEED + split,
        )
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # convergence warnings on poor features: the accuracy reports them
            probe.fit(feats[tr], labels[tr])
            scores.append(float(probe.score(feats[te], labels[te])))
    correct = total = 0
    for x, y in id_val_loader():
        correct += int((_features(model, x)[1].argmax(1) == y).sum())
        total += len(y)
    return float(np.mean(scores)), correct / total


def _read_scores(csv_path: Path) -> list[CheckpointScore]:
    scores = []
    with csv_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            values = {k: float(v) for k, v in row.items() if k not in ("path", "epoch", "step") and v != ""}
            scores.append(
                CheckpointScore(row["path"], values, epoch=int(row["epoch"]), step=int(row["step"]))
            )
    return scores


def _pair_agreement(rows: Sequence[dict[str, Any]], key: str) -> tuple[int, int]:
    """Over pairs where the criterion prefers one checkpoint: (how often it transfers better, pairs)."""
    hits = pairs = 0
    for a in rows:
        for b in rows:
            if key == "rule":  # the package's both-higher test, on the pair (a, b)
                wins, _ = both_higher_counts([a["d_eff"], b["d_eff"]], [a["psi_eff"], b["psi_eff"]])
                prefers = bool(wins[0])
            else:
                prefers = a["id_acc"] > b["id_acc"]
            if prefers and a["transfer"] != b["transfer"]:
                pairs += 1
                hits += a["transfer"] > b["transfer"]
    return hits, pairs


def format_table(rows: Sequence[dict[str, Any]], marks: dict[str, str]) -> str:
    head = ["rank", "checkpoint", "ID acc", "D_eff", "Psi_eff", "beats", "Pareto", "transfer acc", ""]
    body = [
        [
            str(r["rank"]),
            r["label"],
            f"{r['id_acc']:.3f}",
            f"{r['d_eff']:.3f}",
            f"{r['psi_eff']:.3f}",
            str(r["wins"]),
            "yes" if r["pareto"] else "",
            f"{r['transfer']:.3f}",
            marks.get(r["label"], ""),
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = ExampleParser(
        __doc__.splitlines()[0],
        "runs/model_selection",
        8,
        2,
        seed_help="seeds the models and the markers (the data split and the batch order are fixed)",
    )
    args = parser.parse_args(argv)
    _quiet_lightning()
    out = Path(args.log_dir)
    names = FAST_VARIANTS if args.fast else tuple(VARIANTS)
    checkpoints = train_variants(names, args.epochs, out, args.seed)

    # Rank every checkpoint with the command line (in-process), one fixed monitor configuration.
    ranking_dir = out / "ranking"
    argv_cli = [
        "rank",
        *[str(p) for _, p in checkpoints],
        "--model",
        f"{EXAMPLES / '_digits.py'}:DigitsCNN",
        "--data",
        f"{Path(__file__).resolve()}:id_val_loader",
        *_cli_options(args.fast),
        "--seed",
        str(args.seed),
        "--device",
        "cpu",
        "--out",
        str(ranking_dir),
        "--quiet",
    ]
    print(
        "$ lightning-geomarkers " + " ".join(argv_cli[:1] + ["CKPT ..."] + argv_cli[1 + len(checkpoints) :])
    )
    with cpu_threads(1):
        code = cli_main(argv_cli)
    if code != 0:
        raise RuntimeError(f"lightning-geomarkers rank failed with exit status {code}")
    result = rank_scores(_read_scores(ranking_dir / "markers.csv"))  # the ranking the CLI wrote, re-read

    rows = []
    for s in result.scores:
        transfer, id_acc = transfer_and_id_accuracy(Path(s.path))
        rows.append(
            dict(
                rank=s.rank,
                label=Path(s.path).stem,
                path=s.path,
                epoch=s.epoch,
                id_acc=id_acc,
                d_eff=s.get(result.dimension_key),
                psi_eff=s.get(result.utility_key),
                wins=s.wins,
                pareto=s.pareto,
                transfer=transfer,
            )
        )
    choice = Path(result.choice.path).stem if result.choice is not None else None  # the rule's pick
    by_id = max(rows, key=lambda r: (r["id_acc"], -r["rank"]))["label"]
    best = max(rows, key=lambda r: r["transfer"])["label"]
    marks: dict[str, str] = {}
    for label, tag in ((choice, "<- rule"), (by_id, "<- ID acc"), (best, "<- best transfer")):
        if label is not None:
            marks[label] = (marks.get(label, "") + " " + tag).strip()
    rule_hits, rule_pairs = _pair_agreement(rows, "rule")
    acc_hits, acc_pairs = _pair_agreement(rows, "id_acc")
    transfer_of = {r["label"]: r["transfer"] for r in rows}

    print()
    print(
        f"{len(rows)} checkpoints of {len(names)} variants, ranked by 'both higher D_eff and Psi_eff' (digits 0-4);"
    )
    print(
        f"transfer acc: {PROBE_SHOTS}-shot linear probe on frozen features of the held-out digits 5-9 "
        f"(mean of {PROBE_SPLITS} splits)."
    )
    print(format_table(rows, marks))
    print()
    width = max(len(r["label"]) for r in rows)
    if choice is not None:
        print(f"rule's choice:   {choice:<{width}}  transfer {transfer_of[choice]:.3f}")
    print(f"highest ID acc:  {by_id:<{width}}  transfer {transfer_of[by_id]:.3f}")
    print(f"best transfer:   {best:<{width}}  transfer {transfer_of[best]:.3f}")
    if rule_pairs:
        print(
            f"pairs where the rule prefers one: {rule_hits}/{rule_pairs} transfer better ({rule_hits / rule_pairs:.0%})"
        )
    if acc_pairs:
        print(
            f"pairs where ID acc prefers one:   {acc_hits}/{acc_pairs} transfer better ({acc_hits / acc_pairs:.0%})"
        )
    print(
        f"Files: {ranking_dir / 'markers.csv'}, {ranking_dir / 'ranking.md'}, {ranking_dir / 'markers.png'}"
    )
    return {
        "rows": rows,
        "choice": choice,
        "by_id_acc": by_id,
        "best_transfer": best,
        "rule_agreement": (rule_hits, rule_pairs),
        "id_acc_agreement": (acc_hits, acc_pairs),
        "ranking_dir": str(ranking_dir),
        "checkpoints": [str(p) for _, p in checkpoints],
        "regret": (transfer_of[best] - transfer_of[choice]) if choice is not None else math.nan,
    }


if __name__ == "__main__":
    main()
