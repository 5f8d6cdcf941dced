"""Draw the noise plot of the docs (``docs/images/noise_bands.png``): epoch-to-epoch noise vs real change.

Trains the quickstart's model (``examples/quickstart.py``: the digits CNN, same data split, seed and
monitor defaults) and records, at every validation epoch, the sample the monitor computed on. For each
epoch it plots

* the logged GLUE dimension and utility with a band of +-2 standard errors over class pairs
  (``std(per-pair values) / sqrt(n_pairs)``: ``MarkerReport.standard_errors``, the same ``<marker>_se``
  the monitor keeps in its history),
* the same markers recomputed on the same features with ``--reseeds`` other seeds (other probes and
  projection; all ~36 validation digits per class are in the sample, so the points do not change): the
  spread of these dots is the noise that remains at fixed weights.

Usage (from the repository root)::

    python docs/scripts/noise_plot.py                 # 15 epochs, 4 reseeds (a few minutes on 2 CPUs)
    python docs/scripts/noise_plot.py --epochs 4 --reseeds 1 --out /tmp/noise.png   # quick look

Prints, per epoch, the value, its SE and the reseed spread, and the median ratio of epoch-to-epoch
change to SE.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning.pytorch as L
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from _digits import DigitsCNN, cpu_threads, digits_loaders, make_trainer  # noqa: E402

from lightning_geomarkers import GeometryMonitor  # noqa: E402

MARKERS = ("glue_dimension", "glue_utility")


def pair_se(report, marker: str) -> float:
    return float(report.standard_errors[marker])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--reseeds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "noise_bands.png"))
    args = parser.parse_args()

    L.seed_everything(args.seed, workers=True, verbose=False)
    train_loader, val_loader = digits_loaders(batch_size=64, val_fraction=0.2, seed=args.seed)
    model = DigitsCNN(num_classes=10, lr=3e-3)
    monitor = GeometryMonitor(seed=args.seed, markers=list(MARKERS))
    samples: list[tuple[torch.Tensor, torch.Tensor]] = []
    reports = []
    compute = monitor.compute_markers

    def record(features, labels, device=None, **kwargs):
        report = compute(features, labels, device, **kwargs)
        samples.append((features.detach().cpu().clone(), labels.cpu().clone()))
        reports.append(report)
        return report

    monitor.compute_markers = record  # type: ignore[method-assign]
    trainer = make_trainer(args.epochs, [monitor], logger=False, enable_checkpointing=False)
    with cpu_threads(1):
        trainer.fit(model, train_loader, val_loader)

        rows = []
        for epoch, ((feats, labels), report) in enumerate(zip(samples, reports, strict=True)):
            row = {"epoch": epoch}
            for m in MARKERS:
                row[m] = float(report.values[m])
                row[m + "_se"] = pair_se(report, m)
                row[m + "_reseeds"] = [
                    float(
                        GeometryMonitor(seed=args.seed + 1000 + r, markers=[m])
                        .compute_markers(feats, labels)
                        .values[m]
                    )
                    for r in range(args.reseeds)
                ]
            rows.append(row)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MARKERS), figsize=(10, 3.6))
    epochs = [r["epoch"] for r in rows]
    for ax, m in zip(axes, MARKERS, strict=True):
        v = torch.tensor([r[m] for r in rows])
        se = torch.tensor([r[m + "_se"] for r in rows])
        ax.fill_between(epochs, v - 2 * se, v + 2 * se, alpha=0.25, label="logged value +- 2 SE (over pairs)")
        ax.plot(epochs, v, "o-", ms=3, label="logged value")
        for r in rows:
            ax.plot([r["epoch"]] * len(r[m + "_reseeds"]), r[m + "_reseeds"], "k.", ms=3, alpha=0.6)
        ax.plot([], [], "k.", ms=3, label="same weights, other seeds")
        ax.set_xlabel("epoch")
        ax.set_title(m)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Quickstart (digits CNN): marker noise at fixed weights vs change between epochs", fontsize=10
    )
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)

    print(f"threads=1 loadavg={os.getloadavg()}")
    for m in MARKERS:
        print(m)
        changes = []
        for prev, r in zip(rows, rows[1:], strict=False):
            diff_se = (r[m + "_se"] ** 2 + prev[m + "_se"] ** 2) ** 0.5
            changes.append(abs(r[m] - prev[m]) / diff_se)
        for r in rows:
            spread = (
                torch.tensor([r[m], *r[m + "_reseeds"]]).std().item() if r[m + "_reseeds"] else float("nan")
            )
            print(f"  epoch {r['epoch']:2d}: {r[m]:.4f}  SE {r[m + '_se']:.4f}  reseed std {spread:.4f}")
        if changes:
            print(
                f"  median |change between epochs| / SE of the difference: {sorted(changes)[len(changes) // 2]:.2f}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
