"""``PerClassSample``: a bounded, seeded, partition-invariant per-class sample as a torchmetrics ``Metric``.

Under DDP every rank sees a shard of the data, yet the markers must equal those of a single process on the
same data. Reservoir sampling depends on arrival order and partition, so the sample is **bottom-k
(priority) sampling**: every sample gets a pseudo-random 63-bit key that is a deterministic function of
(its content, its label, the seed) (:func:`sample_keys`), and per class the ``samples_per_class`` samples
with the smallest keys are kept. Bottom-k of a union equals bottom-k of the union of per-shard bottom-k's,
so "sample each rank, gather, re-select" gives exactly the single-process selection; with i.i.d. uniform
keys the kept set is a uniform sample without replacement (the distribution of reservoir sampling).
Classes are subset the same way (``max_classes``): the classes with the smallest seeded
:func:`class_priority` among those seen are kept, a fixed subset independent of arrival order.

The sample is held in torchmetrics states (``add_state(..., dist_reduce_fx="cat")``), so pickling,
``clone()``, ``state_dict()`` (after ``persistent(True)``), ``reset()``, ``to(device)`` and the DDP gather
(torchmetrics' ``sync()``/``unsync()``, ``compute()``) work as for any torchmetrics metric. The DDP-specific
logic is the gather itself: labels and keys first, from which every rank computes the same bottom-k
selection, then the features of the selected rows only (one store's worth, not every rank's store). The
metric classes of this package accumulate into it, and ``GeometryMonitor`` holds one per monitored layer.
"""

from __future__ import annotations

import functools
import struct
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import Module
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_geomarkers.errors import GeomarkersWarning, outside_stacklevel
from lightning_geomarkers.functional._hashing import (
    _MASK63,
    class_priority,
    sample_keys,
)
from lightning_geomarkers.utilities.checks import check_labels, check_positive_int, check_seed

__all__ = ["PerClassSample", "sample_keys", "class_priority"]

_DTYPE_CODES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_THRESHOLD = _MASK63
_INT_STATES = ("labels", "keys", "seen_classes", "seen_counts", "sample_config")
#: The states the sample's own two-phase sync gathers (a subclass's others go through torchmetrics').
_SAMPLE_STATES = ("features", *_INT_STATES)


def _lexsort(labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting rows by (label, key); stable, so equal pairs keep their relative order."""
    order = torch.argsort(keys, stable=True)
    return order[torch.argsort(labels[order], stable=True)]


def _first_of_duplicates(sorted_labels: torch.Tensor, sorted_keys: torch.Tensor) -> torch.Tensor:
    """Mask keeping the first of each run of equal (label, key) pairs in (label, key)-sorted rows.

    Equal pairs are the same sample (same content and label), e.g. the copies DistributedSampler adds to
    even out the ranks' shards: counting them twice would bias the sample and break the equality with a
    single process.
    """
    keep = torch.ones(sorted_labels.shape[0], dtype=torch.bool, device=sorted_labels.device)
    if sorted_labels.numel() > 1:
        keep[1:] = (sorted_labels[1:] != sorted_labels[:-1]) | (sorted_keys[1:] != sorted_keys[:-1])
    return keep


def _rank_in_run(sorted_labels: torch.Tensor) -> torch.Tensor:
    """Position of each element inside its run of equal (sorted) labels."""
    if sorted_labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=sorted_labels.device)
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_labels.numel(), device=sorted_labels.device) - torch.repeat_interleave(
        starts, counts
    )


def _bottom_k(labels: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest distinct keys of every label, sorted by (label, key): the selection
    rule of :class:`PerClassSample` (duplicated (label, key) pairs count once)."""
    order = _lexsort(labels, keys)
    order = order[_first_of_duplicates(labels[order], keys[order])]
    return order[_rank_in_run(labels[order]) < k]


def _pair_member(
    labels: torch.Tensor, keys: torch.Tensor, ref_labels: torch.Tensor, ref_keys: torch.Tensor
) -> torch.Tensor:
    """Mask of the rows whose (label, key) pair is one of the ``ref`` pairs."""
    both_l, both_k = torch.cat([ref_labels, labels]), torch.cat([ref_keys, keys])
    order = _lexsort(both_l, both_k)
    run = torch.cumsum(_first_of_duplicates(both_l[order], both_k[order]).to(torch.int64), 0) - 1
    run_of = torch.empty_like(run).scatter_(0, order, run)  # each row's run of equal pairs
    in_ref = torch.zeros(int(run[-1]) + 1 if run.numel() else 0, dtype=torch.bool, device=labels.device)
    in_ref[run_of[: ref_labels.numel()]] = True
    return in_ref[run_of[ref_labels.numel() :]]


def _cat(chunks: Any) -> torch.Tensor:
    """A list state (chunks) or an already concatenated tensor state as one tensor."""
    return chunks if isinstance(chunks, torch.Tensor) else torch.cat(list(chunks))


#: Bytes of one temporary of :func:`_gather_rows`: small enough for the allocator to hand the same
#: memory back for the next one, where a temporary as large as the store is fresh memory (page faults)
#: every time.
_GATHER_BYTES = 1 << 22


def _gather_rows(chunks: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``torch.cat(chunks)[rows]`` without the concatenation: only the selected rows are copied (the
    chunks are many batches' worth of feature rows, most of them dropped by a compaction), through
    temporaries of at most ``_GATHER_BYTES``."""
    if len(chunks) == 1:
        return chunks[0].index_select(0, rows)
    sizes = torch.tensor([c.shape[0] for c in chunks], device=rows.device)
    ends = torch.cumsum(sizes, 0)
    which = torch.bucketize(rows, ends, right=True)  # the chunk of each selected row
    out = chunks[0].new_empty((rows.numel(), chunks[0].shape[1]))
    step = max(1, _GATHER_BYTES // max(1, out.shape[1] * out.element_size()))
    for i, chunk in enumerate(chunks):
        pos = torch.nonzero(which == i).squeeze(1)
        for part in pos.split(step):
            out.index_copy_(0, part, chunk.index_select(0, rows[part] - (ends[i] - sizes[i])))
    return out


def _sum_by_class(classes: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique classes (ascending) and their summed counts."""
    uniq, inverse = torch.unique(classes, return_inverse=True)
    return uniq, torch.zeros_like(uniq).index_add_(0, inverse, counts.to(uniq.dtype))


def _first_row(stacked: torch.Tensor) -> torch.Tensor:
    """Reduction of the configuration state: every process holds the same, keep one."""
    return stacked[0]


class PerClassSample(Metric):
    """Keep, per class, the ``samples_per_class`` samples with the smallest keys (bottom-k sampling).

    The kept set depends only on the multiset of (features, label, key) offered, not on their order, their
    batching or how the data were split between processes: after torchmetrics' ``sync()`` (or inside
    ``compute()``) every rank holds exactly the selection one process fed all the data would hold.

    Memory is bounded whatever the number of updates: a batch is first filtered (classes outside the
    ``max_classes`` subset, samples beyond the k-th smallest key of their class in the batch, samples whose
    key is not below their full class's current k-th key), the rest goes to a pending buffer that is merged
    into the store (one vectorised sort, no Python loop over classes) once it is as large as the store (or
    ``compact_min_rows`` rows, or holds ``compact_max_chunks`` chunks). So at most
    ``C * k + max(C * k, compact_min_rows)`` rows of features plus one batch are held (``C`` classes kept,
    ``k = samples_per_class``), plus one count per class seen. Readers (:meth:`state`,
    :attr:`num_stored`, ...) merge first, so they always see at most k samples per class.

    Args:
        samples_per_class: ``k``, samples kept per class (>= 2).
        max_classes: keep only this many classes (>= 2), those with the smallest :func:`class_priority`
            among the classes seen; None keeps every class.
        seed: seeds the class subset and the default keys (:meth:`update` without ``keys``).
        **kwargs: torchmetrics ``Metric`` options (``process_group``, ``dist_sync_fn``, ``compute_on_cpu``,
            ...).

    States (torchmetrics list states, gathered with ``cat``): ``features`` (S, N), ``labels`` and ``keys``
    (S,) int64, ``seen_classes``/``seen_counts`` (int64); and ``sample_config`` (the arguments, so that a
    ``MetricCollection`` shares one sample only between metrics with the same arguments, and a loaded
    state is checked against them). Features are stored detached in the widest floating dtype offered
    (a float32 batch after float16 ones widens what is kept; a narrower batch is widened, never the
    reverse); labels and keys live on the features' device (a collective needs them there).

    Example:
        >>> import torch
        >>> from lightning_geomarkers.metrics import PerClassSample, sample_keys
        >>> sample = PerClassSample(samples_per_class=3, seed=0)
        >>> x = torch.arange(40.0).reshape(20, 2)
        >>> y = torch.arange(20) % 2
        >>> for part in torch.arange(20).split(6):  # any batching or order gives the same sample
        ...     sample.update(x[part], y[part], sample_keys(x[part], y[part], seed=0))
        >>> feats, labels, keys = sample.state()  # sorted by (label, key)
        >>> feats.shape, labels.tolist(), sample.n_seen
        (torch.Size([6, 2]), [0, 0, 0, 1, 1, 1], {0: 10, 1: 10})
        >>> bool((keys[:3].diff() > 0).all())
        True
    """

    is_differentiable = False
    full_state_update = False

    features: list[torch.Tensor]
    labels: list[torch.Tensor]
    keys: list[torch.Tensor]
    seen_classes: list[torch.Tensor]
    seen_counts: list[torch.Tensor]
    sample_config: torch.Tensor

    #: The pending buffer is merged once it holds max(stored rows, this many) rows.
    compact_min_rows: int = 1024
    #: ... or once it holds this many chunks (many tiny batches).
    compact_max_chunks: int = 256

    def __init__(
        self,
        samples_per_class: int = 50,
        max_classes: int | None = 100,
        *,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.samples_per_class = check_positive_int(samples_per_class, "samples_per_class", minimum=2)
        self.max_classes = (
            None if max_classes is None else check_positive_int(max_classes, "max_classes", minimum=2)
        )
        self.seed = check_seed(seed)
        for name in ("features", "labels", "keys", "seen_classes", "seen_counts"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # The configuration as a state too: a MetricCollection then groups (shares the state of) only
        # samples with the same configuration, and a loaded state is checked against it.
        self.add_state("sample_config", default=self._config_tensor(), dist_reduce_fx=_first_row)
        # Derived, never a state: (the store's labels tensor it was computed from, classes, k-th keys).
        self._thr_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Derived, never a state: the admitted classes (max_classes) for the seen counts as they were, keyed
        # by (the seen_classes list object, its length, its first chunk): torchmetrics' reset, sync and
        # unsync replace the list, and every update below refreshes the key, so a stale entry is never used.
        self._admit_cache: tuple[tuple[Any, int, Any], torch.Tensor] | None = None
        # The features' dtype fixed by set_dtype() (None: the widest dtype offered).
        self._fixed_dtype: torch.dtype | None = None
        self._warned_keys = False  # said once per metric: rows sharing their default key, negative labels
        self._warned_negative = False

    def _config_tensor(self) -> torch.Tensor:
        """The arguments as the 24 bytes of three int64 (one int64 element per byte, 0..255):
        torchmetrics' ``MetricCollection`` shares state between metrics whose states are
        ``torch.allclose`` (relative tolerance 1e-5), which took seeds 1_700_000_000 and 1_700_000_001
        (or any two large, close arguments) as equal; bytes differ by at least 1 or not at all."""
        mc = -1 if self.max_classes is None else self.max_classes
        raw = struct.pack("<qqQ", self.samples_per_class, mc, self.seed % (1 << 64))  # the keys use 64 bits
        return torch.tensor(list(raw), dtype=torch.int64)

    @staticmethod
    def _decode_config(config: Sequence[int]) -> tuple[int, int | None, int]:
        """(samples_per_class, max_classes, seed) of a configuration state (also the three-number form
        written by earlier versions)."""
        values = list(config)
        k, mc, seed = values if len(values) == 3 else struct.unpack("<qqQ", bytes(values))
        return int(k), None if mc < 0 else int(mc), int(seed)

    # ------------------------------------------------------------------------------------ reading
    @property
    def n_seen(self) -> dict[int, int]:
        """Rows offered per class before subsampling (all classes, also those left out by ``max_classes``).

        Every offered row counts, duplicates included: under DDP the counts are summed over the ranks, so
        the copies ``DistributedSampler`` pads the data with are counted (2001 rows for 2000 samples on
        3 ranks) although the sample itself keeps each row once.
        """
        classes, counts = self._seen()
        return dict(zip(classes.tolist(), counts.tolist(), strict=True))

    @property
    def num_stored(self) -> int:
        """Rows in the sample (at most ``samples_per_class`` per kept class)."""
        return int(self.state()[1].numel())

    @property
    def num_stored_per_class(self) -> dict[int, int]:
        cls, counts = torch.unique_consecutive(self.state()[1], return_counts=True)
        return dict(zip(cls.tolist(), counts.tolist(), strict=True))

    @property
    def classes(self) -> list[int]:
        """Class ids with stored samples, ascending."""
        return torch.unique_consecutive(self.state()[1]).tolist()

    @property
    def feature_dim(self) -> int | None:
        """N of the stored features (None before the first update)."""
        return int(self.features[0].shape[1]) if self.features else None

    @property
    def is_synced(self) -> bool:
        """True between torchmetrics' ``sync()`` and ``unsync()``/``reset()``."""
        return self._is_synced

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features (S, N), labels (S,), keys (S,))`` sorted by (label, key): a canonical order.

        The local sample, or the global one between ``sync()`` and ``unsync()``. Empty storage gives
        ``(0, N)`` features (``N = 0`` before the first update).
        """
        self._compact()
        if not self.features:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return torch.zeros((0, 0), dtype=self.dtype, device=self.device), empty, empty.clone()
        return self.features[0], self.labels[0], self.keys[0]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`state` of the sample gathered over all processes (the local one outside DDP)."""
        return self.state()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(samples_per_class={self.samples_per_class}, "
            f"max_classes={self.max_classes}, seed={self.seed})"
        )

    # ------------------------------------------------------------------------------------ update
    def update(self, features: torch.Tensor, labels: Any, keys: torch.Tensor | None = None) -> None:
        """Offer a batch: ``features (B, N)``, integer ``labels (B,)``, int64 ``keys (B,)``.

        ``keys`` identify the samples (:func:`sample_keys` of the raw inputs, so the same inputs are kept
        whatever the model's weights); None hashes the features themselves with this metric's seed.
        """
        if self._is_synced:
            raise RuntimeError(
                f"{type(self).__name__}.update() after sync(): the stored samples are the global selection. "
                "Call unsync() to go on accumulating locally, or reset() before a new epoch."
            )
        f, y, k = self._check_batch(features, labels, keys)
        if f.shape[0] == 0:
            if not self.features:
                self._append(f, y, k)  # records N, dtype and device for a later sync
            return
        classes, counts = torch.unique(y, return_counts=True)
        admitted = self._admit(classes)  # before the batch joins the seen counts (the cache's key)
        self._add_seen(classes, counts)
        self._remember_admitted(admitted)
        mask = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        if admitted is not None:
            mask &= torch.isin(y, admitted)
        cache = self._valid_cache()
        if cache is not None and cache[1].numel():
            thr_cls, thr = cache[1], cache[2]
            pos = torch.searchsorted(thr_cls, y).clamp_(max=thr_cls.numel() - 1)
            t = torch.where(thr_cls[pos] == y, thr[pos], _NO_THRESHOLD)
            mask &= (k < t) | (t == _NO_THRESHOLD)  # a class not (yet) full takes any key
        idx = mask.nonzero().flatten()
        yi, ki = y[idx], k[idx]
        rows = idx[_bottom_k(yi, ki, self.samples_per_class)]
        if rows.numel() or not self.features:
            self._append(f.index_select(0, rows), y[rows], k[rows])
        store = int(self.labels[0].shape[0]) if cache is not None else 0
        pending = sum(int(t.shape[0]) for t in self.labels) - store
        if pending >= max(store, self.compact_min_rows) or len(self.labels) > self.compact_max_chunks:
            self._compact(force=True)

    def _check_batch(
        self, features: Any, labels: Any, keys: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"`features` must be a tensor, got {type(features).__name__}.")
        if features.ndim != 2:
            raise ValueError(
                f"`features` must be 2-D (batch, features), got shape {tuple(features.shape)}. "
                "Flatten or pool spatial/token dimensions first."
            )
        if not features.is_floating_point():
            raise TypeError(f"`features` must be floating point, got {features.dtype}; cast with .float().")
        b, n = features.shape
        if n == 0:
            raise ValueError(
                f"`features` has no columns (shape {tuple(features.shape)}); pass at least one feature per row."
            )
        raw = features.detach()
        f, widen = (raw if self._fixed_dtype is None else raw.to(self._fixed_dtype)), None
        if self.features:
            store = self.features[0]
            if n != store.shape[1]:
                raise ValueError(
                    f"`features` has {n} columns but earlier updates had {store.shape[1]}; the feature "
                    "dimension must stay fixed between reset() calls (one sample per layer)."
                )
            # The widest dtype offered, unless set_dtype() fixed one: a wider batch after narrower ones
            # widens what is kept (after the batch is validated below), so nothing is rounded.
            stored = functools.reduce(torch.promote_types, {t.dtype for t in self.features})  # (merge_state)
            target = self._fixed_dtype or torch.promote_types(stored, raw.dtype)
            widen = target if any(t.dtype != target for t in self.features) else None
            f = raw.to(device=store.device, dtype=target)
        y = check_labels(labels, b, device=f.device)
        if b and not self._warned_negative and bool((y < 0).any()):
            self._warned_negative = True
            warnings.warn(
                f"{type(self).__name__}: negative labels {y[y < 0].unique().tolist()[:5]} are kept as classes. If "
                "they mark samples to ignore (an ignore index such as -100), drop those rows before update(), "
                "as GeometryMonitor does.",
                GeomarkersWarning,
                stacklevel=outside_stacklevel(),
            )
        if keys is None:
            # From the batch as given, not as stored: the same rows get the same keys whatever the
            # store's dtype is at the time (duplicated (label, key) pairs count once).
            k = sample_keys(raw, y.to(raw.device), self.seed).to(f.device)
            repeated = b - int(torch.unique(k).numel()) if b > 1 else 0
            if repeated >= 2 and 10 * repeated >= b and not self._warned_keys:
                self._warned_keys = True
                warnings.warn(
                    f"{type(self).__name__}: {repeated} of {b} rows of a batch have the same features and label "
                    "as another row, so they count once (without `keys`, a row's key is the hash of its "
                    "features; equal rows, e.g. all-zero ReLU features, are one sample). If they are different "
                    "samples, pass keys=sample_keys(inputs, labels, seed) computed from the inputs.",
                    GeomarkersWarning,
                    stacklevel=outside_stacklevel(),
                )
        else:
            if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64:
                raise TypeError(
                    "`keys` must be an int64 tensor; compute them with sample_keys(inputs, labels, seed)."
                )
            if keys.shape != (b,):
                raise ValueError(f"`keys` must have shape ({b},), got {tuple(keys.shape)}.")
            k = keys.detach().to(f.device)
        if widen is not None:
            self.features = [t.to(widen) for t in self.features]
        return f, y, k

    def _append(self, f: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> None:
        self.features.append(f)
        self.labels.append(y)
        self.keys.append(k)

    def _seen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes ascending, counts) summed over the ``seen_*`` chunks (several after a gather)."""
        if len(self.seen_classes) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty.clone()
        return _sum_by_class(_cat(self.seen_classes).reshape(-1), _cat(self.seen_counts).reshape(-1))

    def _add_seen(self, classes: torch.Tensor, counts: torch.Tensor) -> None:
        """Add a batch's (classes, counts) to the seen counts, as a chunk. The chunks are summed into one
        once they hold as many entries as the summed one (and at least 1024), so each entry is summed
        O(1) times on average: re-summing every seen class on every batch made an epoch quadratic in
        the distinct labels (4 -> 102 ms per batch over 600,000 rows of 580,000 labels)."""
        if len(self.seen_classes):
            device = self.seen_classes[0].device
            classes, counts = classes.to(device), counts.to(device)
        self.seen_classes.append(classes)
        self.seen_counts.append(counts)
        if len(self.seen_classes) > 1:
            rest = sum(int(c.numel()) for c in self.seen_classes[1:])
            if rest >= max(int(self.seen_classes[0].numel()), 1024) or len(self.seen_classes) > 256:
                merged_c, merged_n = self._seen()
                self.seen_classes, self.seen_counts = [merged_c], [merged_n]

    def _admit_key(self) -> tuple[Any, int, Any]:
        seen = self.seen_classes
        return seen, len(seen), (seen[0] if len(seen) else None)

    def _remember_admitted(self, admitted: torch.Tensor | None) -> None:
        if admitted is not None:
            self._admit_cache = (self._admit_key(), admitted)

    def _cached_admitted(self) -> torch.Tensor | None:
        if self._admit_cache is None:
            return None
        (seen, length, first), admitted = self._admit_cache
        now_seen, now_length, now_first = self._admit_key()
        return admitted if seen is now_seen and length == now_length and first is now_first else None

    def _bottom_classes(self, candidates: torch.Tensor) -> torch.Tensor:
        """The ``max_classes`` of ``candidates`` (distinct, ascending) of smallest (priority, id), ascending."""
        if candidates.numel() <= (self.max_classes or 0):
            return candidates
        order = _lexsort(class_priority(candidates, self.seed), candidates)
        return candidates[order[: self.max_classes]].sort().values

    def _admit(self, batch_classes: torch.Tensor) -> torch.Tensor | None:
        """The admitted classes once ``batch_classes`` (distinct) join the seen ones: the bottom-
        ``max_classes`` of a union is the bottom of (the bottom of the classes seen so far) and the batch's,
        so with the cache this costs O(max_classes + batch), not O(classes seen)."""
        if self.max_classes is None:
            return None
        if not len(self.seen_classes):  # the first batch (nothing seen yet: no tensor on self.device)
            return self._bottom_classes(batch_classes)
        before = self._admitted()
        assert before is not None
        union = torch.unique(torch.cat([before.to(batch_classes.device), batch_classes]))
        return self._bottom_classes(union)

    def _admitted(self) -> torch.Tensor | None:
        """The kept classes (ascending): the ``max_classes`` seen classes of smallest (priority, id)."""
        if self.max_classes is None:
            return None
        cached = self._cached_admitted()
        if cached is not None:
            return cached
        admitted = self._bottom_classes(self._seen()[0])
        self._remember_admitted(admitted)
        return admitted

    def _valid_cache(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The per-class k-th keys of the store, if still those of ``labels[0]`` (else None)."""
        cache = self._thr_cache
        if (
            cache is None
            or not isinstance(self.labels, list)
            or not self.labels
            or self.labels[0] is not cache[0]
        ):
            return None
        return cache

    def _compact(self, force: bool = False) -> None:
        """Merge every chunk into one store: per kept class the k smallest keys, sorted by (label, key)."""
        if not isinstance(self.features, list):  # a concatenated state (e.g. set by hand): normalise
            self.features, self.labels, self.keys = [self.features], [_cat(self.labels)], [_cat(self.keys)]
            force = True
        if not self.features:
            return
        dtypes = {t.dtype for t in self.features}
        if len(dtypes) > 1:  # chunks joined without update() (merge_state, torchmetrics' forward): unify
            target = self._fixed_dtype or functools.reduce(torch.promote_types, dtypes)
            self.features = [t.to(target) for t in self.features]
        admitted = self._admitted()
        if not force and len(self.features) == 1:
            cache = self._valid_cache()
            if cache is not None and (admitted is None or bool(torch.isin(cache[1], admitted).all())):
                return
        labels, keys = torch.cat(self.labels), torch.cat(self.keys)
        sel = self._select(labels, keys, admitted)
        self.features, self.labels, self.keys = [_gather_rows(self.features, sel)], [labels[sel]], [keys[sel]]
        self._set_thresholds()

    def _select(
        self, labels: torch.Tensor, keys: torch.Tensor, admitted: torch.Tensor | None
    ) -> torch.Tensor:
        """Indices of the kept rows, sorted by (label, key): per admitted class the k smallest distinct keys
        (of equal (label, key) pairs the first)."""
        sel = _bottom_k(labels, keys, self.samples_per_class)
        if admitted is not None:  # admission depends on the class only: filtering after the ranks is the same
            sel = sel[torch.isin(labels[sel], admitted.to(labels.device))]
        return sel

    def _set_thresholds(self) -> None:
        """Cache the per-class k-th keys of the store (one chunk, sorted by (label, key)): a batch's sample
        is admitted only below them."""
        store_y, store_k = self.labels[0], self.keys[0]
        cls, counts = torch.unique_consecutive(store_y, return_counts=True)
        last = torch.cumsum(counts, 0) - 1
        thr = torch.where(counts >= self.samples_per_class, store_k[last], _NO_THRESHOLD)
        self._thr_cache = (store_y, cls, thr)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Load the states (saved after ``persistent(True)``); a loaded sample counts as updated."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        raw = self.sample_config.cpu().tolist()
        saved = self._decode_config(raw)
        mine = self._decode_config(self._config_tensor().tolist())
        if len(raw) == 3:  # the earlier three-number form kept the seed modulo 2**63
            mine = (mine[0], mine[1], mine[2] % (1 << 63))
        self.sample_config = self._config_tensor().to(self.sample_config.device)  # (an old form, too)
        if saved != mine:
            self.reset()
            k, mc, seed = saved
            raise ValueError(
                f"The loaded state was saved by a sample with samples_per_class={k}, max_classes={mc}, "
                f"seed={seed}, but this {type(self).__name__} has samples_per_class={self.samples_per_class}, "
                f"max_classes={self.max_classes}, seed={self.seed}. Construct it with the saved arguments."
            )
        if self.features:
            self._update_count = max(self._update_count, 1)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """torchmetrics' ``merge_state``, refused for a sample with other arguments (its rows were chosen by
        another rule; the merged state took over the incoming configuration)."""
        other = (
            incoming_state.sample_config
            if isinstance(incoming_state, Metric)
            else incoming_state.get("sample_config", self.sample_config)
        )
        theirs = self._decode_config(torch.as_tensor(other).cpu().tolist())
        mine = self._decode_config(self._config_tensor().tolist())
        if theirs != mine:
            raise ValueError(
                f"Cannot merge a sample with (samples_per_class, max_classes, seed) = {theirs} into one with "
                f"{mine}: construct both with the same arguments."
            )
        super().merge_state(incoming_state)
        self.sample_config = self._config_tensor().to(self.sample_config.device)

    def set_dtype(self, dst_type: str | torch.dtype) -> Metric:
        """Convert the stored features to ``dst_type`` and keep later batches in it (instead of the widest
        dtype offered); the integer states are left as they are."""
        out = super().set_dtype(dst_type)
        if self.features:
            self._fixed_dtype = self.features[0].dtype
        else:  # a dtype or a tensor type name ("torch.HalfTensor"), as Tensor.type() takes
            self._fixed_dtype = (
                dst_type if isinstance(dst_type, torch.dtype) else torch.zeros(0).type(dst_type).dtype
            )
        return out

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        """``to(device)`` moves every state; ``set_dtype`` converts only the features. The integer states
        (labels, 63-bit keys, counts, configuration) keep int64: a float cast would lose key bits."""
        this = super()._apply(fn, exclude_state=(*exclude_state, *_INT_STATES))  # returns self
        device = self.device  # updated by torchmetrics from fn
        for name in _INT_STATES:
            if name in exclude_state:
                continue
            value, default = getattr(self, name), self._defaults[name]
            if isinstance(value, torch.Tensor) and isinstance(default, torch.Tensor):
                setattr(self, name, value.to(device))
                self._defaults[name] = default.to(device)
            else:
                setattr(self, name, [t.to(device) for t in value])
        return this

    # ------------------------------------------------------------------------------------ sync
    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        """Gather the union of every rank's sample and re-apply the bottom-k selection, in three gathers.

        Called by torchmetrics' ``sync()`` (and so by ``compute()`` under DDP) on every rank, with the same
        collectives on every rank (a rank that stored nothing takes part with empty states):

        1. every rank's feature width, dtype and configuration (a rank with no samples knows no width);
        2. every rank's labels and keys, and its ``seen`` counts (16 bytes per stored row and per class).
           From these every rank computes the same selection: the kept classes (from the summed counts),
           per class the k smallest distinct keys;
        3. the feature rows of that selection only: each rank sends its rows whose (label, key) is selected
           (a sample held by several ranks, such as a ``DistributedSampler`` padding copy, is sent by each
           and taken from the lowest rank).

        So every rank ends with the single-process selection, and the feature rows moved are those of
        one store (the gather pads each rank's share to the largest one), not every rank's whole store.
        """
        group = process_group or self.process_group
        self._compact()
        local = self.features[0] if self.features else None
        device = local.device if local is not None else self.device
        dim = int(local.shape[1]) if local is not None else 0
        code = _DTYPE_CODES.index(local.dtype) + 1 if local is not None and local.dtype in _DTYPE_CODES else 0
        head = torch.tensor([dim, code], dtype=torch.int64, device=device)
        metas = [
            t.reshape(-1).tolist()
            for t in dist_sync_fn(torch.cat([head, self.sample_config.to(device)]), group=group)
        ]
        dims = {m[0] for m in metas if m[0] > 0}
        if len(dims) > 1:
            raise RuntimeError(
                f"Feature dimensions differ across processes: {sorted(dims)}; every rank must feed the same "
                "layer's features to this sample."
            )
        configs = sorted({self._decode_config(m[2:]) for m in metas}, key=str)
        if len(configs) > 1:
            raise RuntimeError(
                f"The ranks' samples have different (samples_per_class, max_classes, seed): {configs}; "
                "construct the sample with the same arguments on every rank."
            )
        # A subclass's own states: torchmetrics' gather and reduction, on every rank, once the checks above
        # passed (a refused sync must change nothing: torchmetrics restores nothing after a failure).
        others = {k: v for k, v in self._reductions.items() if k not in _SAMPLE_STATES}
        if others:
            reductions = self._reductions
            self._reductions = others
            try:
                super()._sync_dist(dist_sync_fn, process_group=process_group)
            finally:
                self._reductions = reductions
        if not dims:  # nobody has anything: no further collective on the sample, on any rank
            for name in ("features", "labels", "keys", "seen_classes", "seen_counts"):
                setattr(self, name, [])
            return
        dim = dims.pop()
        codes = [m[1] for m in metas if m[1] > 0]
        dtype = (
            functools.reduce(
                torch.promote_types, [_DTYPE_CODES[c - 1] for c in codes]
            )  # float16 + bfloat16: float32
            if codes
            else (local.dtype if local is not None else self.dtype)
        )
        # 2. labels and keys, and the seen counts.
        pairs = (
            torch.stack([self.labels[0], self.keys[0]], 1).to(device)
            if local is not None
            else torch.zeros((0, 2), dtype=torch.int64, device=device)
        )
        every = torch.cat([t.reshape(-1, 2) for t in dist_sync_fn(pairs, group=group)])
        seen = torch.cat(
            [t.reshape(-1, 2) for t in dist_sync_fn(torch.stack(self._seen(), 1).to(device), group=group)]
        )
        seen_c, seen_n = _sum_by_class(seen[:, 0], seen[:, 1])
        self.seen_classes, self.seen_counts = [seen_c], [seen_n]
        labels, keys = every[:, 0], every[:, 1]
        sel = self._select(labels, keys, self._admitted())  # of duplicates, the first: the lowest rank's
        # 3. the selected rows' features, from the ranks that hold them (a decision every rank shares).
        if sel.numel():
            sent = _pair_member(labels, keys, labels[sel], keys[sel])  # what every rank sends, in order
            mine = (
                local[_pair_member(pairs[:, 0], pairs[:, 1], labels[sel], keys[sel])].to(dtype)
                if local is not None
                else torch.zeros((0, dim), dtype=dtype, device=device)
            )
            blocks = [t.reshape(-1, dim) for t in dist_sync_fn(mine, group=group)]
            rows = (torch.cumsum(sent.to(torch.int64), 0) - 1)[sel]
            self.features = [_gather_rows(blocks, rows)]
        else:
            self.features = [torch.zeros((0, dim), dtype=dtype, device=device)]
        self.labels, self.keys = [labels[sel]], [keys[sel]]
        self.sample_config = self.sample_config.to(device)
        self._set_thresholds()
