"""The full marker suite on one labelled feature sample: what the monitor and the metric classes compute.

``geometry_markers(features, labels)`` runs the GLUE protocol (after the GLUE preprocessing: global
centering and, for wide features, a random projection) and the other markers on the raw features, and
returns one value per marker. ``MARKERS`` lists every marker with the sign the literature associates
with better out-of-distribution transfer (``docs/markers.md`` section 8), used as default alert direction.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lightning_geomarkers.errors import GeomarkersWarning, error_reason, outside_stacklevel
from lightning_geomarkers.functional.distances import _within_class_distance
from lightning_geomarkers.functional.glue import GLUE_MARKERS, GlueResult
from lightning_geomarkers.functional.intrinsic_dimension import _local_intrinsic_dimension
from lightning_geomarkers.functional.neural_collapse import _neural_collapse
from lightning_geomarkers.functional.preprocessing import _CenterProjection
from lightning_geomarkers.functional.protocols import GluePairsResult, _glue_pairs, glue_joint
from lightning_geomarkers.functional.spectral import (
    _effective_rank,
    _feature_spectrum,
    _numerical_rank,
    _participation_ratio,
)
from lightning_geomarkers.functional.uncertainty import glue_standard_errors
from lightning_geomarkers.utilities.checks import check_features_labels, check_positive_int, check_protocol
from lightning_geomarkers.utilities.seeds import as_generator, split_seeds
from lightning_geomarkers.utilities.threads import (
    TorchThreadPool,
    available_cpus,
    limit_threads,
    torch_thread_pool,
)

__all__ = ["MarkerInfo", "MARKERS", "MarkerReport", "geometry_markers", "resolve_marker_names"]


@dataclass(frozen=True)
class MarkerInfo:
    """A marker's name, what it measures, and the literature's sign.

    ``higher_is_better``: True/False where the literature found higher/lower values going with better
    (OOD or ID) generalization; None where the sign flips between settings (then alerts need a mode).
    """

    name: str
    description: str
    higher_is_better: bool | None


MARKERS: dict[str, MarkerInfo] = {
    m.name: m
    for m in [
        MarkerInfo("glue_capacity", "GLUE manifold capacity alpha = P / E[a]", True),
        MarkerInfo("glue_dimension", "GLUE effective dimension D_eff = E[b] / P", True),
        MarkerInfo("glue_radius", "GLUE effective radius R_eff = sqrt(E[c] / E[b - c])", False),
        MarkerInfo("glue_utility", "GLUE effective utility Psi_eff = E[c] / E[a]", True),
        MarkerInfo("glue_center_alignment", "mean |cos| between manifold centers", True),
        MarkerInfo("glue_axis_alignment", "mean |cos| between manifold axis parts", False),
        MarkerInfo("glue_center_axis_alignment", "mean |cos| between centers and other axes", False),
        MarkerInfo("participation_ratio", "(sum lambda)^2 / sum lambda^2 of the feature covariance", True),
        MarkerInfo("numerical_rank", "singular values >= 1e-3 x largest (centred)", True),
        MarkerInfo("effective_rank", "exp(entropy of normalised singular values), centred", True),
        MarkerInfo("nc1", "neural collapse NC1 = tr(S_W S_B^+) / C", None),
        MarkerInfo("lid", "local intrinsic dimension, Levina-Bickel MLE (k neighbours)", False),
        MarkerInfo("lid_twonn", "intrinsic dimension, TwoNN", False),
        MarkerInfo("within_class_distance", "mean pairwise distance within a class", None),
    ]
}
GLUE_MARKER_NAMES = tuple(f"glue_{name}" for name in GLUE_MARKERS)
SPECTRAL_MARKER_NAMES = ("participation_ratio", "numerical_rank", "effective_rank")
DEFAULT_MARKERS = tuple(name for name in MARKERS if name != "lid_twonn")


def resolve_marker_names(markers: str | Iterable[str]) -> tuple[str, ...]:
    """Validate a marker selection: "all", "glue", or an iterable of names from ``MARKERS``."""
    if isinstance(markers, str):
        if markers == "all":
            return DEFAULT_MARKERS
        if markers == "glue":
            return GLUE_MARKER_NAMES
        markers = [markers]
    names = tuple(markers)
    unknown = [m for m in names if m not in MARKERS]
    if unknown:
        raise ValueError(f"Unknown marker(s) {unknown}; choose from {list(MARKERS)} (or 'all', 'glue').")
    if not names:
        raise ValueError("No markers selected; pass 'all' or a list of names from MARKERS.")
    return tuple(dict.fromkeys(names))


@dataclass
class MarkerReport:
    """Values of the computed markers (0-dim float64 tensors) and, for those skipped, the reason.

    ``spectrum``: the descending singular values of the centred features (float64,
    :func:`~lightning_geomarkers.functional.spectral.feature_spectrum`), the one decomposition shared by
    the spectral markers; None when no spectral marker was asked and ``return_spectrum=False``.
    ``standard_errors``: marker name -> standard error of the GLUE markers (see
    :mod:`~lightning_geomarkers.functional.uncertainty`); markers without an SE are absent.
    ``seconds``: host wall-clock seconds per step ("glue", "spectrum", and each other marker; on CUDA
    they include only what the host waited for).
    """

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    glue: Any = None
    spectrum: torch.Tensor | None = None
    standard_errors: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def geometry_markers(
    features: Any,
    labels: Any,
    *,
    markers: str | Iterable[str] = "all",
    glue_protocol: str = "pairs",
    points_per_class: int = 50,
    n_pairs: int | None = 100,
    n_t: int = 200,
    dichotomies: str = "random",
    max_classes: int | None = None,
    center_features: bool = True,
    projection_dim: int | None = 1000,
    lid_k: int = 20,
    generator: torch.Generator | int | None = None,
    strict: bool = True,
    return_spectrum: bool = False,
    num_threads: int | None = None,
    workers: int = 1,
) -> MarkerReport:
    """Compute a selection of geometry markers on one labelled feature sample.

    GLUE runs on globally centred features (``center_features``), projected to ``projection_dim``
    dimensions by a Gaussian matrix when wider; the other markers use the features as given.

    Args:
        features: (S, N) features; labels: (S,) integer classes.
        markers: "all", "glue", or names from :data:`MARKERS`.
        glue_protocol: "pairs" (random class pairs, averaged) or "joint" (all classes at once; at most
            as many as keep P M <= 2 N, N after the projection: beyond that a ``GeomarkersWarning``
            says so and a fixed seeded subset of classes is used, see ``JOINT_CAP_POINTS_PER_FEATURE``).
        points_per_class, n_pairs, n_t, dichotomies, max_classes: GLUE protocol parameters. With
            ``center_features`` and exactly two classes (a binary task), ``dichotomies="random"`` draws
            only class-against-class (opposite-sign) dichotomies, as ``"balanced"``: its same-sign ones
            would ask the whole centred sample to lie on one side of a hyperplane through its own mean,
            which cannot be done.
        center_features: subtract the global mean before GLUE (ReLU features sit in one orthant, and
            GLUE's hyperplanes pass through the origin).
        projection_dim: random projection width for GLUE when N is larger (None: never project).
        lid_k: neighbours of the local intrinsic dimension estimate.
        generator: CPU generator or int seed.
        strict: raise on a marker that cannot be computed; otherwise record the reason in
            ``MarkerReport.skipped`` and carry on with the others. Markers that come out undefined
            (not finite, e.g. axis alignments of point-like manifolds) are always left out and listed in
            ``skipped``.
        return_spectrum: also compute ``MarkerReport.spectrum`` when no spectral marker is asked (it is
            always returned when one is: participation ratio, numerical and effective rank share it).
        num_threads: run with this many torch intra-op threads (restored afterwards; ``None`` leaves
            torch's setting). On a CPU shared with other busy processes ``1`` avoids large slow-downs
            (see ``docs/performance.md``).
        workers: on CPU, threads computing the markers concurrently (this one and ``workers - 1``
            helpers), each with ``num_threads`` intra-op threads. The helpers start LID and TwoNN (the kNN
            search) at once, while this thread runs the spectrum, NC1 and the within-class distance and
            then GLUE, whose centring and projection (in row blocks) and chunks of pairs each helper joins
            in as soon as it is idle. Torch releases the GIL inside
            its ops, so the threads really run in parallel. Values, ``skipped`` and the error raised under
            ``strict`` are the same for every ``workers``; the peak memory grows by about the kNN working
            set (about 100 MB at 5000 x 2048). Capped at the CPUs available to the process
            (:func:`~lightning_geomarkers.utilities.available_cpus`); on a GPU everything runs on this
            thread.
            ``GeometryMonitor`` uses 2.

    Memory is bounded: every non-GLUE marker works on 16 MiB float64 blocks (plus a ``min(S, N)^2``
    Gram for the spectrum, and ``O(S k)`` neighbour lists and at most 64 MiB of cached float32 blocks
    for LID); no full float64 copy of the features is made, and the GLUE input is centred and projected
    block by block.

    Returns:
        :class:`MarkerReport`.

    Example:
        >>> import torch
        >>> from lightning_geomarkers.functional import geometry_markers
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(40)
        >>> x = 4 * torch.randn(3, 32, generator=g)[y] + torch.randn(120, 32, generator=g)
        >>> report = geometry_markers(x, y, markers=["glue_dimension", "participation_ratio"], n_t=50,
        ...                           generator=0)
        >>> sorted(report.values)
        ['glue_dimension', 'participation_ratio']
    """
    names = resolve_marker_names(markers)
    protocol = check_protocol(
        glue_protocol,
        points_per_class=points_per_class,
        n_pairs=n_pairs,
        n_t=n_t,
        dichotomies=dichotomies,
        max_classes=max_classes,
        center_features=center_features,
        projection_dim=projection_dim,
        lid_k=lid_k,
    )
    if not isinstance(return_spectrum, bool):
        raise TypeError(f"`return_spectrum` must be a bool, got {return_spectrum!r}.")
    x, y = check_features_labels(features, labels, min_classes=2, min_per_class=2)
    gen = as_generator(generator)
    # Independent streams, so adding or removing one marker leaves the others' draws unchanged.
    seeds = split_seeds(gen, 2)
    workers = check_positive_int(workers, "workers")
    with limit_threads(num_threads):
        return _compute(
            x,
            y,
            names,
            seeds,
            **protocol,  # the validated arguments
            strict=strict,
            return_spectrum=return_spectrum,
            workers=workers,
        )


def _two_class_dichotomies(dichotomies: str, y: torch.Tensor, centered: bool) -> str:
    """``"balanced"`` in place of ``"random"`` when the globally centred sample has exactly two classes.

    ``"random"`` draws i.i.d. signs, so half of its dichotomies give both manifolds the same sign: they
    ask for both classes on one side of a hyperplane through the origin, which after centring is the
    sample's own mean. With only two classes the two manifolds are the whole centred sample, so those
    dichotomies cannot be separated (exactly so when every point is used; barely otherwise): half of the
    probes came out degenerate and the capacity was several times too low (0.063 against 0.68 on two
    Gaussian classes). The opposite-sign dichotomies, class against class, are the only ones that mean
    something there."""
    if dichotomies == "random" and centered and int(torch.unique(y).numel()) == 2:
        return "balanced"
    return dichotomies


#: The joint protocol takes at most this many points per feature dimension (Cover's 2 N: beyond it
#: generic points are not linearly separable, and the exact solver's supports, time and memory grow
#: with P M; see :func:`_joint_class_cap`).
JOINT_CAP_POINTS_PER_FEATURE = 2


def _joint_class_cap(
    y: torch.Tensor, n_feat: int, points_per_class: int, max_classes: int | None
) -> int | None:
    """``max_classes`` for the joint protocol: the caller's, or fewer where the P classes of M points
    would exceed ``JOINT_CAP_POINTS_PER_FEATURE`` x N points (N after the projection): then the largest P
    within it (at least 2), with a ``GeomarkersWarning`` that says so. The classes are the same seeded
    subset every time (as with ``max_classes``), so the values stay comparable across epochs.

    Why: beyond 2 N the supports of the exact solution grow towards N points. On ReLU features of 100
    classes x 50 points projected to 1000 dimensions one joint call takes about 220 s and 2.1 GB; the
    monitor's GLUE step on the 40 classes of the cap took about 4 s.
    """
    counts = torch.unique(y, return_counts=True)[1]
    n_classes = counts.numel() if max_classes is None else min(counts.numel(), max_classes)
    per_class = min(points_per_class, int(counts.max()))
    limit = JOINT_CAP_POINTS_PER_FEATURE * n_feat
    if n_classes * per_class <= limit:
        return max_classes
    cap = max(2, limit // per_class)
    if cap >= n_classes:
        return max_classes
    warnings.warn(
        f"GLUE (joint protocol): {n_classes} classes x {per_class} points = {n_classes * per_class} exceed "
        f"{JOINT_CAP_POINTS_PER_FEATURE} x N = {limit} (N = {n_feat} features after the projection), beyond "
        f"which generic points are not linearly separable and the exact solver's time and memory grow "
        f"with P M; it uses a fixed seeded subset of {cap} classes. Set `max_classes={cap}` (or fewer "
        "points per class) to choose this yourself, use the pairs protocol for all classes, or call "
        "`glue_joint` directly for the uncapped computation.",
        GeomarkersWarning,
        stacklevel=outside_stacklevel(),
    )
    return cap


def _compute(
    x: torch.Tensor,
    y: torch.Tensor,
    names: tuple[str, ...],
    seeds: Any,
    *,
    glue_protocol: str,
    points_per_class: int,
    n_pairs: int | None,
    n_t: int,
    dichotomies: str,
    max_classes: int | None,
    center_features: bool,
    projection_dim: int | None,
    lid_k: int,
    strict: bool,
    return_spectrum: bool,
    workers: int,
) -> MarkerReport:
    """The body of :func:`geometry_markers` on validated input.

    The work is split into independent tasks (GLUE; the spectrum with the markers read from it; each
    other marker), each filling its own partial report, run by :func:`_run_tasks` and merged in task
    order: values, skip reasons and the error raised under ``strict`` do not depend on the scheduling.
    With one worker they run in this order on the calling thread. With several, ``workers - 1`` helper
    threads start the kNN markers (LID, TwoNN: the largest single cost for wide features) at once, while
    the calling thread runs the spectrum, NC1 and the within-class distance, then GLUE, whose centring
    and projection (in row blocks) and chunks of pairs each helper joins in as soon as it is idle (the
    rest are done on the calling thread). GLUE's solver state
    and the spectrum's never overlap; a helper's blocks and chunks reuse what LID freed.
    """

    def attempt(
        part: MarkerReport, keys: tuple[str, ...], fn: Callable[[], dict[str, Any]], timer: str
    ) -> None:
        start = time.perf_counter()
        try:
            out = fn()
        except Exception as err:  # one marker's failure (out of memory included) leaves the others
            if strict or isinstance(err, Warning):  # a warning turned into an error is the caller's choice
                raise
            for key in keys:
                part.skipped[key] = error_reason(err)
            return
        finally:
            part.seconds[timer] = time.perf_counter() - start
        for key, val in out.items():
            part.values[key] = (
                val.detach().to(torch.float64)
                if isinstance(val, torch.Tensor)
                else torch.tensor(val, dtype=torch.float64, device="cpu")
            )

    def single(key: str, fn: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
        return lambda: {key: fn()}

    def marker_task(key: str, fn: Callable[[], Any], part: MarkerReport) -> None:
        attempt(part, (key,), single(key, fn), key)

    # Helper threads (workers - 1): they take the kNN markers at once, then join in GLUE's projection
    # blocks and chunks of pairs once idle (GLUE runs last on this thread when there are helpers).
    # Entered around the run below: on exit it waits for its calls (cancels the waiting ones on an error).
    stack = ExitStack()
    helpers = min(workers, available_cpus()) - 1  # more threads than CPUs would only take turns
    pool = stack.enter_context(torch_thread_pool(helpers)) if helpers and x.device.type == "cpu" else None
    tasks: list[tuple[Callable[[MarkerReport], None], str]] = []  # (task, "main" | "last" | "beside")
    glue_wanted = tuple(n for n in names if n in GLUE_MARKER_NAMES)
    if glue_wanted:

        def glue_task(part: MarkerReport) -> None:
            def run_glue() -> dict[str, Any]:
                # GLUE's input, centred and projected in row blocks that a helper takes too once it is
                # idle (after the kNN markers; never beside the spectrum, whose working set is large).
                projection = _CenterProjection(
                    x,
                    x.shape[1] if projection_dim is None else projection_dim,
                    centered=center_features,
                    generator=None if projection_dim is None else seeds[0],
                )
                if pool is not None and projection.project:
                    pool.submit(projection.work.help)
                z = projection.result()
                common: dict[str, Any] = dict(
                    points_per_class=points_per_class,
                    n_t=n_t,
                    dichotomies=_two_class_dichotomies(dichotomies, y, center_features),
                    max_classes=max_classes,
                    generator=seeds[1],
                )
                res: GluePairsResult | GlueResult
                if glue_protocol == "pairs":
                    res = _glue_pairs(z, y, n_pairs=n_pairs, num_threads=1, pool=pool, **common)
                else:
                    common["max_classes"] = _joint_class_cap(y, z.shape[1], points_per_class, max_classes)
                    res = glue_joint(z, y, **common)
                del z
                part.glue = res
                errors = glue_standard_errors(res)
                part.standard_errors.update(
                    {f"glue_{n}": float(v) for n, v in errors.items() if f"glue_{n}" in glue_wanted}
                )
                return {n: getattr(res, n.removeprefix("glue_")) for n in glue_wanted}

            attempt(part, glue_wanted, run_glue, "glue")

        tasks.append((glue_task, "last"))

    spectral_wanted = tuple(n for n in names if n in SPECTRAL_MARKER_NAMES)
    if spectral_wanted or return_spectrum:
        from_spectrum = {
            "participation_ratio": lambda s: _participation_ratio(x, s),
            "numerical_rank": lambda s: _numerical_rank(x, 1e-3, s),
            "effective_rank": lambda s: _effective_rank(x, True, s),
        }

        def spectrum_task(part: MarkerReport) -> None:
            def run_spectrum() -> dict[str, Any]:
                part.spectrum = _feature_spectrum(x)  # x is validated: no second pass over it
                return {}

            attempt(part, spectral_wanted, run_spectrum, "spectrum")
            spectrum = part.spectrum
            if spectrum is not None:  # otherwise every spectral marker is already listed as skipped
                for name in spectral_wanted:
                    attempt(part, (name,), single(name, partial(from_spectrum[name], spectrum)), name)

        tasks.append((spectrum_task, "main"))

    # x and y were validated once above (2+ classes, 2+ samples each): no second pass over them.
    others = {
        "nc1": (lambda: _neural_collapse(x, y, 1e-3), "main"),
        "lid": (lambda: _local_intrinsic_dimension(x, lid_k, "mle"), "beside"),
        "lid_twonn": (lambda: _local_intrinsic_dimension(x, 20, "twonn"), "beside"),
        "within_class_distance": (lambda: _within_class_distance(x, y), "main"),
    }
    for name in names:
        if name in others:
            fn, where = others[name]
            tasks.append((partial(marker_task, name, fn), where))

    with stack:
        parts = _run_tasks(tasks, pool)
    report = MarkerReport()
    for part in parts:
        report.values.update(part.values)
        report.skipped.update(part.skipped)
        report.standard_errors.update(part.standard_errors)
        report.seconds.update(part.seconds)
        report.glue = part.glue if part.glue is not None else report.glue
        report.spectrum = part.spectrum if part.spectrum is not None else report.spectrum
    report.values = {name: report.values[name] for name in names if name in report.values}
    for name, val in list(report.values.items()):
        if not math.isfinite(float(val)):  # e.g. alignments of point-like manifolds, which have no axes
            del report.values[name]
            report.standard_errors.pop(name, None)
            report.skipped[name] = "undefined for these features (the value is not finite)"
    return report


def _run_tasks(
    tasks: list[tuple[Callable[[MarkerReport], None], str]], pool: TorchThreadPool | None
) -> list[MarkerReport]:
    """Run each ``(task, where)`` of ``tasks`` on its own fresh :class:`MarkerReport`; return the
    reports in task order.

    Without ``pool`` they run in order on the calling thread. With it, the ``"beside"`` tasks are
    submitted to the pool at once, and the calling thread runs the ``"main"`` tasks in order, then the
    ``"last"`` ones (GLUE, whose chunks the pool's threads can take once they are idle). Once every task
    has ended, the first error in task order re-raises here (a ``KeyboardInterrupt`` or other
    non-``Exception`` before any error).
    """
    parts = [MarkerReport() for _ in tasks]
    if pool is None:
        for (task, _), part in zip(tasks, parts, strict=True):
            task(part)
        return parts
    futures = {i: pool.submit(task, parts[i]) for i, (task, where) in enumerate(tasks) if where == "beside"}
    here = [i for i, (_, where) in enumerate(tasks) if where == "main"]
    here += [i for i, (_, where) in enumerate(tasks) if where == "last"]
    errors: dict[int, BaseException] = {}
    for i in here:
        if errors and i > min(errors):  # a later task cannot change which error is raised: skip it
            continue
        try:
            tasks[i][0](parts[i])
        except BaseException as err:  # re-raised below, in task order, after the others ended
            errors[i] = err
    wait(futures.values())
    for i, future in futures.items():
        error = future.exception()
        if error is not None:
            errors[i] = error
    if errors:  # an interrupt (not an Exception) first, else the first error in task order
        interrupts = [i for i, err in errors.items() if not isinstance(err, Exception)]
        raise errors[min(interrupts or errors)]
    return parts
