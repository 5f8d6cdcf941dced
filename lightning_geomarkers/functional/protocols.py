"""GLUE measurement protocols on labelled features (``docs/markers.md`` section 5).

- Pairs protocol (the paper's CIFAR sweep): many random class pairs, P = 2, ``points_per_class`` points
  per class drawn afresh for each pair, ``n_t`` probes each; markers averaged over pairs, with the spread.
- Joint protocol: all (or a seeded subset of ``max_classes``) classes at once.

Absolute marker values depend on the protocol and its parameters: compare runs only within one fixed
configuration.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lightning_geomarkers.functional.glue import (
    GLUE_MARKERS,
    GlueResult,
    _glue_groups,
    _prepare_probes,
    glue,
    warn_diagnostics,
)
from lightning_geomarkers.functional.preprocessing import _abs_peak, _class_rows, _safe_shift, _times_pow2_
from lightning_geomarkers.utilities.checks import (
    check_eigen_cutoff,
    check_features_labels,
    check_positive_int,
)
from lightning_geomarkers.utilities.seeds import as_generator
from lightning_geomarkers.utilities.threads import (
    SharedWork,
    TorchThreadPool,
    available_cpus,
    limit_threads,
    torch_thread_pool,
)

__all__ = ["GluePairsResult", "glue_pairs", "glue_joint"]

#: Cap on the float64 elements of one chunk of pairs (its probes, points and solver state): 2^23, about
#: 64 MiB, whatever the number of pairs. At 100 pairs of 2 x 50 points in 1000 dimensions (the monitor's
#: 1000-class default) 2^23 took 0.92-0.93 s and 69-84 MB of peak memory, 2^24 0.99-1.12 s and 95-112 MB.
_CHUNK_ELEMENTS = 2**23


@dataclass
class GluePairsResult:
    """Pairs-protocol GLUE markers: the mean over class pairs, their spread and the per-pair values.

    Marker attributes are 0-dim float64 tensors (means over pairs); ``std[name]`` is the standard
    deviation over pairs and ``per_pair[name]`` the (n_pairs,) values; ``pairs`` is (n_pairs, 2) class ids.
    """

    capacity: torch.Tensor
    dimension: torch.Tensor
    radius: torch.Tensor
    utility: torch.Tensor
    center_alignment: torch.Tensor
    axis_alignment: torch.Tensor
    center_axis_alignment: torch.Tensor
    pairs: torch.Tensor
    n_probes: int
    n_degenerate: int
    iterations: int
    kkt_violation: float
    converged: bool
    std: dict[str, torch.Tensor] = field(default_factory=dict)
    per_pair: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        """Markers (means), their ``<name>_std`` and the scalar diagnostics as Python numbers."""
        out: dict[str, float] = {name: float(getattr(self, name)) for name in GLUE_MARKERS}
        out.update({f"{name}_std": float(self.std[name]) for name in GLUE_MARKERS})
        out.update(
            n_pairs=int(self.pairs.shape[0]),
            n_probes=self.n_probes,
            n_degenerate=self.n_degenerate,
            iterations=self.iterations,
            kkt_violation=self.kkt_violation,
        )
        return out


def _subsample_indices(
    members: torch.Tensor, points_per_class: int, generator: torch.Generator
) -> torch.Tensor:
    """A uniform draw of min(points_per_class, len) of ``members`` without replacement (CPU permutation)."""
    take = min(points_per_class, members.numel())
    return members[
        torch.randperm(members.numel(), generator=generator, device="cpu")[:take].to(members.device)
    ]


def _select_classes(
    present: torch.Tensor, max_classes: int | None, generator: torch.Generator
) -> torch.Tensor:
    """All present classes (sorted), or a seeded subset of ``max_classes`` of them (kept sorted)."""
    if max_classes is None or present.numel() <= max_classes:
        return present
    pick = torch.randperm(present.numel(), generator=generator, device="cpu")[:max_classes]
    return present[pick.to(present.device)].sort().values


def glue_pairs(
    features: Any,
    labels: Any,
    *,
    points_per_class: int = 50,
    n_pairs: int | None = 100,
    n_t: int = 200,
    dichotomies: str = "random",
    max_classes: int | None = None,
    generator: torch.Generator | int | None = None,
    eigen_cutoff: float = 1e-9,
    warn: bool = True,
    num_threads: int | None = 1,
    workers: int = 1,
) -> GluePairsResult:
    """GLUE markers by the pairs protocol: averaged over random class pairs (P = 2).

    Args:
        features: (S, N) features (rows are samples); no preprocessing is applied here.
        labels: (S,) integer class labels.
        points_per_class: points drawn per class for each pair (fewer if a class has fewer).
        n_pairs: number of distinct unordered class pairs drawn without replacement; ``None`` or a
            number >= C(C, 2) uses every pair.
        n_t: probes per pair (drawn in the span of the pair's points when ``2 M <= N``, with the law of
            ``X t`` and ``||t||`` for ``t ~ N(0, I_N)``: see :func:`glue`).
        dichotomies: dichotomy ensemble. With P = 2 ``"balanced"`` and ``"one_vs_rest"`` draw only
            opposite signs (class against class); ``"random"`` draws i.i.d. signs, half of them the same
            sign for both classes (the pair against the origin), so its values differ.
        max_classes: draw pairs only among a seeded subset of this many classes.
        generator: CPU generator or int seed (pairs, subsamples, probes and dichotomies).
        eigen_cutoff: see :func:`glue`.
        warn: emit warnings for degenerate probes / non-convergence.
        num_threads: torch intra-op threads on CPU for the computation (see :func:`glue`).
        workers: on CPU, threads solving chunks of pairs at once (the calling thread and ``workers - 1``
            more), each with ``num_threads`` intra-op threads, each taking the next chunk when it is
            free. The chunks (of equal sizes, fixed by the memory cap, not by ``workers``) and their
            random draws, made in pair order whichever thread solves them, are the same for every
            ``workers``, and so are the results, bit for bit. Memory: at most ``workers`` chunks at a
            time. Capped at the CPUs available to the process.

    Returns:
        :class:`GluePairsResult`. Computed in float64 on the features' device, pairs batched together
        in chunks of bounded memory (the results do not depend on the chunking).

    Example:
        >>> import torch
        >>> from lightning_geomarkers.functional import glue_pairs
        >>> g = torch.Generator().manual_seed(0)
        >>> means = 3 * torch.randn(4, 32, generator=g)
        >>> y = torch.arange(4).repeat_interleave(30)
        >>> x = means[y] + torch.randn(120, 32, generator=g)
        >>> res = glue_pairs(x, y, points_per_class=20, n_t=50, generator=0)
        >>> res.pairs.shape[0], bool(res.capacity > 0)
        (6, True)
    """
    workers = check_positive_int(workers, "workers")
    on_cpu = not (isinstance(features, torch.Tensor) and features.device.type != "cpu")
    with ExitStack() as stack:
        stack.enter_context(limit_threads(num_threads if on_cpu else None))
        helpers = min(workers, available_cpus()) - 1  # more threads than CPUs would only take turns
        pool = stack.enter_context(torch_thread_pool(helpers)) if helpers and on_cpu else None
        return _glue_pairs(
            features,
            labels,
            points_per_class=points_per_class,
            n_pairs=n_pairs,
            n_t=n_t,
            dichotomies=dichotomies,
            max_classes=max_classes,
            generator=generator,
            eigen_cutoff=eigen_cutoff,
            warn=warn,
            num_threads=None,
            pool=pool,
        )


def _pairs_at(index: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """The pairs at positions ``index`` of ``itertools.combinations(range(n), 2)``, computed directly.

    Pair (i, j), i < j, is at ``start(i) + (j - i - 1)`` with ``start(i) = i (2 n - i - 1) / 2``.

    Example:
        >>> import itertools, torch
        >>> _pairs_at(torch.tensor([0, 3, 5]), 4) == [list(itertools.combinations(range(4), 2))[k] for k in (0, 3, 5)]
        True
    """
    rows = torch.arange(n, dtype=torch.int64, device="cpu")
    start = rows * (2 * n - rows - 1) // 2
    i = torch.searchsorted(start, index.to(torch.int64), right=True) - 1
    j = index - start[i] + i + 1
    return list(zip(i.tolist(), j.tolist(), strict=True))


def _glue_pairs(
    features: Any,
    labels: Any,
    *,
    points_per_class: int,
    n_pairs: int | None,
    n_t: int,
    dichotomies: str,
    max_classes: int | None,
    generator: torch.Generator | int | None,
    eigen_cutoff: float = 1e-9,
    warn: bool = True,
    num_threads: int | None,
    pool: TorchThreadPool | None,
) -> GluePairsResult:
    """:func:`glue_pairs`, with the chunks of pairs shared with the threads of ``pool``: each joins in
    once it is idle, and the calling thread solves the chunks nobody else has taken."""
    x, y = check_features_labels(features, labels, min_classes=2, min_per_class=2)
    points_per_class = check_positive_int(points_per_class, "points_per_class", minimum=2)
    n_t = check_positive_int(n_t, "n_t", minimum=2)
    eigen_cutoff = check_eigen_cutoff(eigen_cutoff)
    if max_classes is not None:
        max_classes = check_positive_int(max_classes, "max_classes", minimum=2)
    gen = as_generator(generator)
    classes = _select_classes(torch.unique(y), max_classes, gen)
    n_cls = classes.numel()
    n_all = n_cls * (n_cls - 1) // 2
    if n_pairs is not None:
        n_pairs = check_positive_int(n_pairs, "n_pairs")
    if n_pairs is not None and n_pairs < n_all:
        # The pairs drawn are decoded from their indices in combinations order: no list of every pair
        # (77 bytes each: 2.4 GB for 8000 classes when 100 pairs are used).
        pick = torch.randperm(n_all, generator=gen, device="cpu")[:n_pairs].sort().values
        all_pairs = _pairs_at(pick, n_cls)
    else:
        all_pairs = list(itertools.combinations(range(n_cls), 2))
    members = _class_rows(y, classes)
    m_max = min(points_per_class, max(m.numel() for m in members))
    n_feat = x.shape[1]

    n_groups = len(all_pairs)
    # Pairs are processed in chunks of bounded size; each chunk's subsamples, probes and dichotomies are
    # drawn when it is processed, in pair order from the one generator, so the random streams (and the
    # results) do not depend on the chunk size and nothing of size n_pairs x n_t x N ever exists.
    per_pair_elements = n_t * (n_feat + 16 * 2 * m_max) + 2 * m_max * (n_feat + 2 * m_max)
    chunk = max(1, _CHUNK_ELEMENTS // per_pair_elements)
    chunk = -(-n_groups // -(-n_groups // chunk))  # as many chunks, of equal sizes (balanced workers)
    if x.device.type != "cpu":  # one CUDA stream: threads would only take turns
        pool = None
    # Probes enter only through X t and ||t||: with 2 M <= N they are drawn in the span of the pair's
    # points (``_span_probes``, the same law), which avoids n_t x N normals and the X t product per pair.
    in_span = 2 * m_max <= n_feat
    shift = _safe_shift(_abs_peak(x))  # a power of two only where squares could overflow or underflow
    chunks = [all_pairs[start : start + chunk] for start in range(0, n_groups, chunk)]

    def draw(chunk_pairs: list[tuple[int, int]]) -> Callable[[], dict[str, Any]]:
        """The chunk's subsamples, dichotomies and probes (drawn from ``gen`` in pair order), as a solve."""
        n_chunk = len(chunk_pairs)
        points = x.new_zeros((n_chunk, 2, m_max, n_feat), dtype=torch.float64)
        mask = torch.zeros((n_chunk, 2, m_max), dtype=torch.bool, device=x.device)
        probes = None if in_span else torch.empty((n_chunk, n_t, n_feat), dtype=torch.float64, device="cpu")
        labels_y = torch.empty((n_chunk, n_t, 2), dtype=torch.float64, device="cpu")
        probe_gens = []
        for g_i, pair in enumerate(chunk_pairs):
            for side, cls in enumerate(pair):
                idx = _subsample_indices(members[cls], points_per_class, gen)
                points[g_i, side, : idx.numel()] = x[idx]
                mask[g_i, side, : idx.numel()] = True
            t, labels_y[g_i], g_t = _prepare_probes(None, dichotomies, n_t, 2, n_feat, gen, draw=not in_span)
            probe_gens.append(g_t)
            if probes is not None and t is not None:
                probes[g_i] = t
        _times_pow2_(points, shift)
        return partial(
            _glue_groups,
            points,
            mask,
            labels_y.to(x.device),
            probes=None if probes is None else probes.to(x.device),
            generators=probe_gens,
            eigen_cutoff=float(eigen_cutoff),
            max_iter=None,
        )

    # The chunks are shared work: this thread takes them in order, and each pool thread joins in as soon
    # as it is idle (its call is queued behind the pool's other work), so a chunk never waits for a busy
    # thread while another is free. Whoever solves a chunk, it draws from ``gen`` only after the chunk
    # before it has drawn, so the random streams (and the results) are those of one thread. At most one
    # chunk per thread is in memory at once.
    outs: list[dict[str, Any]] = [{} for _ in chunks]
    turn = threading.Condition()
    drawn, failed = 0, False

    def solve_chunk(c: int) -> None:
        nonlocal drawn, failed
        try:
            with turn:
                turn.wait_for(lambda: drawn == c or failed)
                if failed:  # an earlier chunk's owner failed before drawing: this turn never comes
                    return
                try:
                    solve = draw(chunks[c])
                finally:
                    drawn += 1
                    turn.notify_all()
            outs[c] = solve()
        except BaseException:
            # Interrupted (or failed) anywhere, even before its turn: release every thread waiting for a
            # later turn (SharedWork keeps this error and re-raises it), so none waits forever.
            with turn:
                failed = True
                turn.notify_all()
            raise

    work = SharedWork(len(chunks), solve_chunk)
    with limit_threads(num_threads if x.device.type == "cpu" else None):
        if pool is not None:
            for _ in range(min(pool.workers, len(chunks) - 1)):
                pool.submit(work.help)
        work.finish()
    per_pair = {name: torch.cat([o[name] for o in outs]) for name in GLUE_MARKERS}
    means = {name: torch.nanmean(v) for name, v in per_pair.items()}
    stds = {
        name: (v[~v.isnan()].std(unbiased=False) if bool((~v.isnan()).any()) else v.new_tensor(math.nan))
        for name, v in per_pair.items()
    }
    res = GluePairsResult(
        **means,
        pairs=classes[torch.tensor(all_pairs, device=classes.device)],
        n_probes=n_groups * n_t,
        n_degenerate=int(sum(int(o["n_degenerate"].sum()) for o in outs)),
        iterations=max(o["iterations"] for o in outs),
        kkt_violation=max(float(o["kkt_violation"].max()) for o in outs),
        converged=all(bool(o["converged"].all()) for o in outs),
        std=stds,
        per_pair=per_pair,
    )
    if warn:
        n_zero = int((x == 0).all(1).sum()) if res.n_degenerate else 0
        warn_diagnostics(
            res.n_degenerate, res.n_probes, res.converged, res.kkt_violation, " (pairs protocol)", n_zero
        )
    return res


def glue_joint(
    features: Any,
    labels: Any,
    *,
    points_per_class: int = 50,
    max_classes: int | None = None,
    n_t: int = 200,
    dichotomies: str = "random",
    generator: torch.Generator | int | None = None,
    eigen_cutoff: float = 1e-9,
    warn: bool = True,
    num_threads: int | None = 1,
) -> GlueResult:
    """GLUE markers by the joint protocol: all classes (or a seeded subset of ``max_classes``) at once.

    Args are as in :func:`glue_pairs`; returns the :class:`GlueResult` of the P selected classes.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.functional import glue_joint
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(20)
        >>> x = 3 * torch.randn(3, 64, generator=g)[y] + torch.randn(60, 64, generator=g)
        >>> float(glue_joint(x, y, points_per_class=10, n_t=50, generator=0).capacity) > 0
        True
    """
    x, y = check_features_labels(features, labels, min_classes=2, min_per_class=2)
    points_per_class = check_positive_int(points_per_class, "points_per_class", minimum=2)
    if max_classes is not None:
        max_classes = check_positive_int(max_classes, "max_classes", minimum=2)
    gen = as_generator(generator)
    classes = _select_classes(torch.unique(y), max_classes, gen)
    manifolds = [x[_subsample_indices(rows, points_per_class, gen)] for rows in _class_rows(y, classes)]
    return glue(
        manifolds,
        n_t=n_t,
        dichotomies=dichotomies,
        generator=gen,
        eigen_cutoff=eigen_cutoff,
        warn=warn,
        num_threads=num_threads,
    )
