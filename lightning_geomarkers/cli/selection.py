"""Selection rules on measured checkpoints, and the files that report them (CSV, Markdown, PNG).

Rules (see docs/selection.md):

* **both-higher rule** (Chou et al., ICLR 2026): between two models, prefer the one with both higher
  D_eff (``glue_dimension``) and higher Psi_eff (``glue_utility``); for a pair where neither is higher on
  both, the rule makes no call. As a ranking over many checkpoints: ``wins[i]`` counts the checkpoints
  that ``i`` beats on both, ``losses[i]`` those that beat ``i`` on both; checkpoints are ordered by
  ``wins`` (descending), then ``losses`` (ascending), then D_eff (descending).
* **Pareto front** of (D_eff, Psi_eff): the checkpoints that no other checkpoint matches or exceeds on
  both with one strictly higher. Every checkpoint with ``losses == 0`` is on it (up to exact ties).
* **thresholds**: ``floors`` (marker >= value) and ``ceilings`` (marker <= value) make a checkpoint
  eligible or not; the choice is the best-ranked eligible checkpoint.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CheckpointScore",
    "RankingResult",
    "both_higher_counts",
    "pareto_front",
    "parse_threshold",
    "rank_scores",
    "write_csv",
    "write_markdown",
    "write_plot",
]

D_EFF, PSI_EFF = "glue_dimension", "glue_utility"


@dataclass
class CheckpointScore:
    """One measured checkpoint (or model) and its place in the ranking.

    ``values`` holds the markers under the monitor's logged keys (``geometry/glue_dimension``, ...).
    ``wins`` / ``losses``: how many other checkpoints it beats / is beaten by on both D_eff and Psi_eff.
    ``rank`` is 1-based (None before :func:`rank_scores`). ``failed`` lists the threshold rules it fails.
    """

    path: str
    values: dict[str, float]
    epoch: int | None = None
    step: int | None = None
    label: str = ""
    wins: int = 0
    losses: int = 0
    pareto: bool = False
    eligible: bool = True
    failed: list[str] = field(default_factory=list)
    rank: int | None = None

    def get(self, key: str) -> float:
        """The value under ``key``, NaN if it was not computed."""
        return float(self.values.get(key, math.nan))


@dataclass
class RankingResult:
    """The ranked checkpoints, the rule's choice and the files written.

    Attributes:
        scores: every checkpoint, in ranking order (``scores[0]`` has rank 1).
        dimension_key, utility_key: the keys of D_eff and Psi_eff the rules used.
        floors, ceilings: threshold rules, ``{key: value}``.
        choice: the best-ranked eligible checkpoint with both markers computed, or None.
        pareto: the checkpoints on the Pareto front of (D_eff, Psi_eff), by D_eff descending.
        settings: the monitor settings the markers were computed with.
        files: ``{"csv": path, "md": path, "png": path}`` for the files written (``png`` missing when
            matplotlib is not installed).
    """

    scores: list[CheckpointScore]
    dimension_key: str
    utility_key: str
    floors: dict[str, float] = field(default_factory=dict)
    ceilings: dict[str, float] = field(default_factory=dict)
    choice: CheckpointScore | None = None
    pareto: list[CheckpointScore] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text ranking table (what the command line prints)."""
        head = ["rank", "checkpoint", "D_eff", "Psi_eff", "beats", "beaten by", "Pareto", "eligible"]
        rows = [
            [
                str(s.rank),
                s.label or s.path,
                _fmt(s.get(self.dimension_key)),
                _fmt(s.get(self.utility_key)),
                str(s.wins),
                str(s.losses),
                "yes" if s.pareto else "",
                "yes" if s.eligible else "no: " + "; ".join(s.failed),
            ]
            for s in self.scores
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def both_higher_counts(dimension: Sequence[float], utility: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise "both higher" counts.

    ``wins[i] = #{j : D[i] > D[j] and U[i] > U[j]}`` and ``losses[i] = #{j : D[j] > D[i] and U[j] > U[i]}``
    (strict; a pair with a value that is not finite, NaN or infinite, never wins or loses, as in the
    ranking, where it counts as not measured).

    Example:
        >>> wins, losses = both_higher_counts([1.0, 2.0, 3.0], [0.5, 0.4, 0.6])
        >>> wins.tolist(), losses.tolist()
        ([0, 0, 2], [1, 1, 0])
    """
    d = np.asarray(dimension, dtype=np.float64)
    u = np.asarray(utility, dtype=np.float64)
    if d.shape != u.shape or d.ndim != 1:
        raise ValueError(
            f"`dimension` and `utility` must be 1-D of equal length, got {d.shape} and {u.shape}."
        )
    finite = np.isfinite(d) & np.isfinite(u)
    with np.errstate(invalid="ignore"):
        beats = (d[:, None] > d[None, :]) & (u[:, None] > u[None, :])  # beats[i, j]: i beats j
    beats &= finite[:, None] & finite[None, :]
    return beats.sum(axis=1), beats.sum(axis=0)


def pareto_front(dimension: Sequence[float], utility: Sequence[float]) -> np.ndarray:
    """Mask of the points on the Pareto front of (D_eff, Psi_eff), both to maximise.

    Point ``i`` (with finite values) is on the front if no finite ``j`` has ``D[j] >= D[i]`` and
    ``U[j] >= U[i]`` with at least one strict.

    Example:
        >>> pareto_front([1.0, 2.0, 3.0, 2.5], [0.5, 0.4, 0.3, 0.2]).tolist()
        [True, True, True, False]
    """
    d = np.asarray(dimension, dtype=np.float64)
    u = np.asarray(utility, dtype=np.float64)
    finite = np.isfinite(d) & np.isfinite(u)
    ge = (d[None, :] >= d[:, None]) & (u[None, :] >= u[:, None])
    gt = (d[None, :] > d[:, None]) | (u[None, :] > u[:, None])
    dominated = (ge & gt & finite[None, :]).any(axis=1)
    return finite & ~dominated


def parse_threshold(text: str) -> tuple[str, float]:
    """Parse ``"glue_dimension=2.0"`` into ``("glue_dimension", 2.0)``.

    Raises:
        ValueError: not of the form ``MARKER=NUMBER``.

    Example:
        >>> parse_threshold("glue_utility=0.3")
        ('glue_utility', 0.3)
    """
    name, sep, value = str(text).partition("=")
    name = name.strip()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not name or not math.isfinite(number):
        raise ValueError(
            f"Threshold {text!r} is not of the form MARKER=NUMBER; write e.g. glue_dimension=2.0 "
            "(the marker as logged, with or without the prefix)."
        )
    return name, number


def _find_key(name: str, keys: Sequence[str], prefix: str) -> str | None:
    """The logged key a marker name refers to: exact, ``prefix/name``, or the first ``.../name`` in ``keys``
    order (the monitor's layer order), or None."""
    if name in keys:
        return name
    if f"{prefix}/{name}" in keys:
        return f"{prefix}/{name}"
    for key in keys:  # several layers: the first monitored layer, as an unqualified alert
        if key.startswith(prefix + "/") and key.endswith("/" + name):
            return key
    return None


def _resolve_key(name: str, keys: Sequence[str], prefix: str) -> str:
    """:func:`_find_key` for a threshold rule; raises where the marker was not computed."""
    key = _find_key(name, keys, prefix)
    if key is not None:
        return key
    raise ValueError(
        f"Threshold on {name!r}, but no such marker was computed; computed: {sorted(keys)}. Use one of "
        "these names (or the bare marker name) and make sure the marker is in the monitor's `markers`."
    )


def rank_scores(
    scores: Sequence[CheckpointScore],
    *,
    prefix: str = "geometry",
    floors: Mapping[str, float] | None = None,
    ceilings: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
    key_order: Sequence[str] = (),
) -> RankingResult:
    """Rank measured checkpoints by the both-higher rule; mark the Pareto front and the thresholds.

    D_eff and Psi_eff are read under ``<prefix>/glue_dimension`` and ``<prefix>/glue_utility`` (with
    several layers, those of the first monitored layer: pass the monitor's ``logged_keys`` as
    ``key_order``; its keys that some checkpoint has come first, then the others in the order the
    checkpoints hold them, so the choice does not depend on the order of the checkpoints). Threshold
    names may be logged keys or bare marker names, resolved the same way. A checkpoint without both
    values is not eligible. Among checkpoints with equal wins and losses the higher D_eff, then the higher
    Psi_eff ranks first.

    Raises:
        ValueError: no checkpoint, no ``glue_dimension``/``glue_utility`` among the measured values, or a
            threshold on a marker that was not computed.

    Example:
        >>> s = [CheckpointScore("a.ckpt", {"geometry/glue_dimension": 2.0, "geometry/glue_utility": 0.3}),
        ...      CheckpointScore("b.ckpt", {"geometry/glue_dimension": 3.0, "geometry/glue_utility": 0.4})]
        >>> result = rank_scores(s, floors={"glue_dimension": 2.5})
        >>> [x.path for x in result.scores], result.choice.path, [x.eligible for x in result.scores]
        (['b.ckpt', 'a.ckpt'], 'b.ckpt', [True, False])
    """
    scores = list(scores)
    if not scores:
        raise ValueError("No checkpoints to rank; pass at least one checkpoint file.")
    measured = list(dict.fromkeys(k for s in scores for k in s.values))
    keys = list(dict.fromkeys([*(k for k in key_order if k in measured), *measured]))  # first layer first
    dim_key = _find_key(D_EFF, keys, prefix) if keys else f"{prefix}/{D_EFF}"
    util_key = _find_key(PSI_EFF, keys, prefix) if keys else f"{prefix}/{PSI_EFF}"
    if dim_key is None or util_key is None:
        missing = [m for m, k in ((D_EFF, dim_key), (PSI_EFF, util_key)) if k is None]
        raise ValueError(
            f"The ranking needs D_eff and Psi_eff, but no checkpoint has {missing} under the prefix "
            f"{prefix!r}; computed: {sorted(keys)}. Measure with markers that include glue_dimension and "
            "glue_utility (markers='glue' or 'all'), and pass the monitor's prefix."
        )
    floors = {_resolve_key(k, keys, prefix): float(v) for k, v in (floors or {}).items()}
    ceilings = {_resolve_key(k, keys, prefix): float(v) for k, v in (ceilings or {}).items()}
    d = [s.get(dim_key) for s in scores]
    u = [s.get(util_key) for s in scores]
    wins, losses = both_higher_counts(d, u)
    front = pareto_front(d, u)
    for i, s in enumerate(scores):
        s.wins, s.losses, s.pareto = int(wins[i]), int(losses[i]), bool(front[i])
        s.failed = (
            [] if math.isfinite(d[i]) and math.isfinite(u[i]) else ["D_eff and Psi_eff not both measured"]
        )
        s.failed += [f"{k} >= {v:g}" for k, v in floors.items() if not s.get(k) >= v]
        s.failed += [f"{k} <= {v:g}" for k, v in ceilings.items() if not s.get(k) <= v]
        s.eligible = not s.failed

    def order(i: int) -> tuple[Any, ...]:
        known = math.isfinite(d[i]) and math.isfinite(u[i])
        return (not known, -wins[i], losses[i], -d[i] if known else 0.0, -u[i] if known else 0.0, i)

    ranked = [scores[i] for i in sorted(range(len(scores)), key=order)]
    for r, s in enumerate(ranked, start=1):
        s.rank = r
    choice = next(
        (
            s
            for s in ranked
            if s.eligible and math.isfinite(s.get(dim_key)) and math.isfinite(s.get(util_key))
        ),
        None,
    )
    pareto = sorted((s for s in ranked if s.pareto), key=lambda s: -s.get(dim_key))
    return RankingResult(
        scores=ranked,
        dimension_key=dim_key,
        utility_key=util_key,
        floors=floors,
        ceilings=ceilings,
        choice=choice,
        pareto=pareto,
        settings=dict(settings or {}),
    )


# ------------------------------------------------------------------------------------------ writers


def write_csv(
    scores: Sequence[CheckpointScore], path: str | os.PathLike[str], marker_order: Sequence[str] = ()
) -> Path:
    """One row per checkpoint (in the given order): ``path, epoch, step`` and every marker key.

    Markers follow ``marker_order`` where given, then alphabetical; empty cells where a value is unknown.
    """
    path = Path(path)
    keys = {k for s in scores for k in s.values}
    ordered = [k for k in marker_order if k in keys] + sorted(keys - set(marker_order))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "epoch", "step", *ordered])
        for s in scores:
            writer.writerow(
                [
                    s.path,
                    "" if s.epoch is None else s.epoch,
                    "" if s.step is None else s.step,
                    *[repr(s.values[k]) if k in s.values else "" for k in ordered],
                ]
            )
    return path


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(result: RankingResult) -> str:
    """The ranking report as Markdown (the content of ``ranking.md``)."""
    d_key, u_key = result.dimension_key, result.utility_key
    n = len(result.scores)
    lines = ["# Checkpoint ranking", ""]
    lines.append(
        f"{n} checkpoint{'s' if n != 1 else ''} measured with one fixed monitor configuration (below), "
        f"ranked on D_eff (`{d_key}`) and Psi_eff (`{u_key}`)."
    )
    lines.append("")
    c = result.choice
    if c is not None:
        where = _epoch_step(c)
        lines.append(
            f"**Choice: `{_md_escape(c.path)}`**{f' ({where})' if where else ''}: rank {c.rank}, beats "
            f"{c.wins} of the other {n - 1} on both D_eff and Psi_eff, beaten on both by {c.losses}"
            f"{', on the Pareto front' if c.pareto else ''}"
            f"{', and meets every threshold' if (result.floors or result.ceilings) else ''}."
        )
    else:
        lines.append(
            "**No choice**: no checkpoint has both D_eff and Psi_eff computed"
            + (" and meets every threshold." if (result.floors or result.ceilings) else ".")
        )
    lines += ["", "## Ranking", ""]
    head = ["rank", "checkpoint", "epoch", "step", "D_eff", "Psi_eff", "beats on both", "beaten on both by"]
    head += ["Pareto front", "thresholds"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in result.scores:
        thr = (
            ""
            if not (result.floors or result.ceilings)
            else ("pass" if s.eligible else "fails " + "; ".join(s.failed))
        )
        row = [
            str(s.rank),
            f"`{_md_escape(s.path)}`",
            "" if s.epoch is None else str(s.epoch),
            "" if s.step is None else str(s.step),
            _fmt(s.get(d_key)),
            _fmt(s.get(u_key)),
            str(s.wins),
            str(s.losses),
            "yes" if s.pareto else "",
            _md_escape(thr),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Rules", ""]
    lines.append(
        "* **Both higher** (Chou et al., ICLR 2026): between two checkpoints, prefer the one with both higher "
        "D_eff and higher Psi_eff; where neither is higher on both, the rule makes no call. *beats on both* "
        "counts the checkpoints a checkpoint beats that way, *beaten on both by* those that beat it. The "
        "ranking orders by the first (descending), then the second (ascending), then D_eff."
    )
    front = ", ".join(f"`{_md_escape(s.label or s.path)}`" for s in result.pareto) or "(none)"
    lines.append(
        "* **Pareto front** of (D_eff, Psi_eff): checkpoints that no other checkpoint matches or exceeds on "
        f"both with one strictly higher: {front}."
    )
    if result.floors or result.ceilings:
        rules = [f"`{k}` >= {v:g}" for k, v in result.floors.items()]
        rules += [f"`{k}` <= {v:g}" for k, v in result.ceilings.items()]
        eligible = sum(s.eligible for s in result.scores)
        lines.append(
            f"* **Thresholds**: {', '.join(rules)}. {eligible} of {n} checkpoints meet them; the choice is the "
            "best-ranked of those."
        )
    else:
        lines.append("* **Thresholds**: none given (`--floor MARKER=VALUE`, `--ceiling MARKER=VALUE`).")
    if result.settings:
        lines += ["", "## Monitor settings", "", "Markers are comparable only within one configuration:", ""]
        lines += [f"* `{k}`: `{v!r}`" for k, v in result.settings.items()]
    lines += ["", "Every marker of every checkpoint: `markers.csv`. What the rules mean: docs/selection.md."]
    return "\n".join(lines) + "\n"


def _epoch_step(s: CheckpointScore) -> str:
    parts = []
    if s.epoch is not None:
        parts.append(f"epoch {s.epoch}")
    if s.step is not None:
        parts.append(f"step {s.step}")
    return ", ".join(parts)


def write_markdown(result: RankingResult, path: str | os.PathLike[str]) -> Path:
    """Write :func:`to_markdown` of ``result`` to ``path``."""
    path = Path(path)
    path.write_text(to_markdown(result), encoding="utf-8")
    return path


def write_plot(result: RankingResult, path: str | os.PathLike[str]) -> Path:
    """Scatter of D_eff (x) against Psi_eff (y), one labelled point per checkpoint, Pareto front drawn.

    The choice is circled; ineligible checkpoints (thresholds) are drawn hollow.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``, or the ``[plot]`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "markers.png needs matplotlib, which is not installed: `pip install matplotlib` "
            "(or `pip install lightning-geomarkers[plot]`)."
        ) from err
    path = Path(path)
    d_key, u_key = result.dimension_key, result.utility_key
    pts = [(s, s.get(d_key), s.get(u_key)) for s in result.scores]
    pts = [(s, x, y) for s, x, y in pts if math.isfinite(x) and math.isfinite(y)]
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for s, x, y in pts:
        ax.scatter(
            [x],
            [y],
            s=36,
            facecolors="tab:blue" if s.eligible else "none",
            edgecolors="tab:blue",
            zorder=3,
        )
        ax.annotate(
            s.label or Path(s.path).stem, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7
        )
    front = sorted(((x, y) for s, x, y in pts if s.pareto), key=lambda p: p[0])
    if front:
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            color="tab:orange",
            marker="o",
            markersize=9,
            markerfacecolor="none",
            linewidth=1.5,
            label="Pareto front",
            zorder=2,
        )
    c = result.choice
    if c is not None:
        ax.scatter(
            [c.get(d_key)],
            [c.get(u_key)],
            s=260,
            facecolors="none",
            edgecolors="tab:red",
            linewidths=2,
            label="choice (both-higher rule)",
            zorder=4,
        )
    ax.set_xlabel(f"D_eff ({d_key})")
    ax.set_ylabel(f"Psi_eff ({u_key})")
    ax.set_title("Checkpoints: effective dimension vs. utility")
    ax.grid(True, alpha=0.3)
    if front or c is not None:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
