"""The user surface on top of the callbacks: offline ranking of checkpoints, as a command line and for code.

``python -m lightning_geomarkers rank CKPT ... --model MODULE:CLASS --data MODULE:FUNCTION`` (also the
console script ``lightning-geomarkers``) and :func:`rank_checkpoints` measure checkpoints with one
``GeometryMonitor`` configuration and rank them by the "both higher D_eff and Psi_eff" rule; see
docs/selection.md. Nothing else in the package imports this layer.
"""

from lightning_geomarkers.cli.rank import (
    CLIError,
    build_parser,
    load_dataloader,
    load_object,
    main,
    monitor_from_config,
    rank_checkpoints,
)
from lightning_geomarkers.cli.selection import (
    CheckpointScore,
    RankingResult,
    both_higher_counts,
    pareto_front,
    parse_threshold,
    rank_scores,
)

__all__ = [
    "CLIError",
    "CheckpointScore",
    "RankingResult",
    "both_higher_counts",
    "build_parser",
    "load_dataloader",
    "load_object",
    "main",
    "monitor_from_config",
    "pareto_front",
    "parse_threshold",
    "rank_checkpoints",
    "rank_scores",
]
