"""Bounded, seeded, partition-invariant per-class subsampling of validation features.

Under DDP every rank sees a shard of the validation set, yet the markers must equal those of a single
process on the same data. Reservoir sampling depends on arrival order and partition, so this module uses
**bottom-k (priority) sampling** instead: every sample gets a pseudo-random 63-bit key that is a
deterministic function of (its content, its label, the seed), and per class the ``samples_per_class``
samples with the smallest keys are kept. Bottom-k of a union equals bottom-k of the union of per-shard
bottom-k's, so "sample each rank, gather, re-select" gives exactly the single-process selection; and with
i.i.d. uniform keys the kept set is a uniform sample without replacement (the distribution of reservoir
sampling).

Keys come from exact integer hashing (no floating point): each row's bytes are read as int64 words,
combined by multiply-and-sum with seeded odd coefficients (wrap-around arithmetic, so the result does not
depend on summation order or on the other rows of the batch), then mixed with the label and the seed by a
splitmix64 finalizer. Classes are subset the same way (``max_classes``): the classes with the smallest
seeded class priority are kept, a fixed subset independent of arrival order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_geomarkers.functional._hashing import (
    _MASK63,
    _as_int64_labels,
    class_priority,
    sample_keys,
)
from lightning_geomarkers.utilities.checks import check_positive_int, check_seed

__all__ = ["sample_keys", "class_priority", "PerClassSampler"]

_DTYPE_CODES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_THRESHOLD = _MASK63

GatherFn = Callable[[torch.Tensor], list[torch.Tensor]]


def _lexsort(labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting rows by (label, key); stable, so equal pairs keep their relative order."""
    order = torch.argsort(keys, stable=True)
    return order[torch.argsort(labels[order], stable=True)]


def _first_of_duplicates(sorted_labels: torch.Tensor, sorted_keys: torch.Tensor) -> torch.Tensor:
    """Mask keeping the first of each run of equal (label, key) pairs in (label, key)-sorted rows.

    Equal pairs are the same sample (same input bytes and label), e.g. the copies DistributedSampler
    adds to even out the ranks' shards: counting them twice would bias the sample and break the
    equality with a single process.
    """
    keep = torch.ones(sorted_labels.shape[0], dtype=torch.bool)
    if sorted_labels.numel() > 1:
        keep[1:] = (sorted_labels[1:] != sorted_labels[:-1]) | (sorted_keys[1:] != sorted_keys[:-1])
    return keep


def _rank_in_run(sorted_labels: torch.Tensor) -> torch.Tensor:
    """Position of each element inside its run of equal (sorted) labels."""
    if sorted_labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_labels.numel()) - torch.repeat_interleave(starts, counts)


class PerClassSampler:
    """Keep, per class, the ``samples_per_class`` samples with the smallest keys (bottom-k sampling).

    The kept set depends only on the multiset of (features, label, key) offered, not on their order or on
    how the data were split between processes (see :meth:`sync`).

    Implementation: a flat store sorted by (label, key) plus a pending buffer. A batch is first filtered
    (classes outside the ``max_classes`` subset, samples beyond the k-th smallest key of their class in the
    batch, and samples whose key is not below their full class's current k-th key are dropped), the rest
    is appended to the pending buffer, which is merged into the store (one vectorised sort) once it is as
    large as the store (or 1024 rows). So the cost per batch has no Python loop over classes, the
    amortised copy cost per sample is O(N), and memory stays below about ``2 * C * k * N + 1024 * N``
    values (``C`` = classes kept) however many updates arrive. Readers (:meth:`state`, :attr:`num_stored`,
    ...) merge first, so they always see at most k samples per class.

    Args:
        samples_per_class: ``k``, samples kept per class (>= 2).
        max_classes: keep only this many classes (>= 2), those with the smallest :func:`class_priority`;
            None keeps every class.
        seed: seed of the class subset (sample keys are seeded by the caller through :func:`sample_keys`).

    Features are stored detached, on the device and in the floating dtype of the first update. Labels and
    keys are kept on the CPU internally and returned on the features' device.
    """

    #: The pending buffer is merged once it holds max(stored rows, this many) rows.
    compact_min_rows: int = 1024

    def __init__(self, samples_per_class: int, max_classes: int | None = None, seed: int = 0) -> None:
        self.samples_per_class = check_positive_int(samples_per_class, "samples_per_class", minimum=2)
        self.max_classes = (
            None if max_classes is None else check_positive_int(max_classes, "max_classes", minimum=2)
        )
        self.seed = check_seed(seed)
        self.reset()

    # ------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Drop every stored sample and count (the configuration is kept)."""
        self._f: torch.Tensor | None = None  # (S, N) on self._device, rows sorted by (label, key)
        self._y = torch.zeros(0, dtype=torch.int64)  # (S,) CPU
        self._k = torch.zeros(0, dtype=torch.int64)  # (S,) CPU
        self._thr_cls = torch.zeros(0, dtype=torch.int64)  # stored classes, ascending
        self._thr = torch.zeros(0, dtype=torch.int64)  # their k-th key if full, else _NO_THRESHOLD
        self._pend_f: list[torch.Tensor] = []
        self._pend_y: list[torch.Tensor] = []
        self._pend_k: list[torch.Tensor] = []
        self._pend_rows = 0
        self._n_seen: dict[int, int] = {}
        self._priority: dict[int, int] = {}  # admitted classes -> priority (max_classes mode only)
        self._evicted = False
        self._dim: int | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._synced = False

    @property
    def n_seen(self) -> dict[int, int]:
        """Samples seen per class before subsampling (all classes, also those dropped by ``max_classes``)."""
        return dict(sorted(self._n_seen.items()))

    @property
    def num_stored(self) -> int:
        self._compact()
        return int(self._y.numel())

    @property
    def classes(self) -> list[int]:
        """Class ids with stored samples, ascending."""
        self._compact()
        return self._thr_cls.tolist()

    @property
    def num_stored_per_class(self) -> dict[int, int]:
        self._compact()
        cls, counts = torch.unique_consecutive(self._y, return_counts=True)
        return dict(zip(cls.tolist(), counts.tolist(), strict=True))

    @property
    def feature_dim(self) -> int | None:
        return self._dim

    @property
    def is_synced(self) -> bool:
        """True after :meth:`sync` until :meth:`reset`."""
        return self._synced

    def state_dict(self) -> dict[str, Any]:
        """The configuration (not the samples, which are transient per validation epoch)."""
        return {
            "samples_per_class": self.samples_per_class,
            "max_classes": self.max_classes,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the configuration from :meth:`state_dict` (validated) and reset the samples."""
        missing = {"samples_per_class", "max_classes", "seed"} - set(state)
        if missing:
            raise KeyError(f"PerClassSampler state is missing {sorted(missing)}.")
        self.__init__(state["samples_per_class"], state["max_classes"], state["seed"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"PerClassSampler(samples_per_class={self.samples_per_class}, max_classes={self.max_classes}, "
            f"seed={self.seed}, stored={self.num_stored}, classes={self._thr_cls.numel()})"
        )

    # ----------------------------------------------------------------------------------- update
    def _check_batch(
        self, features: torch.Tensor, labels: Any, keys: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"`features` must be a tensor, got {type(features).__name__}.")
        if features.ndim != 2:
            raise ValueError(f"`features` must be 2-D (batch, features), got shape {tuple(features.shape)}.")
        if not features.is_floating_point():
            raise TypeError(f"`features` must be floating point, got {features.dtype}.")
        b, n = features.shape
        if self._dim is not None and n != self._dim:
            raise ValueError(
                f"`features` has {n} columns but earlier updates had {self._dim}; the feature dimension "
                "must stay fixed between reset() calls."
            )
        y = _as_int64_labels(labels, b, torch.device("cpu"))
        if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64:
            raise TypeError("`keys` must be an int64 tensor (see sample_keys).")
        if keys.shape != (b,):
            raise ValueError(f"`keys` must have shape ({b},), got {tuple(keys.shape)}.")
        f = features.detach()
        if self._device is None or self._dtype is None:
            self._device, self._dtype = f.device, f.dtype
        f = f.to(device=self._device, dtype=self._dtype)
        if self._f is None:
            self._f = f.new_zeros((0, n))
        self._dim = n
        return f, y, keys.detach().to("cpu")

    def update(self, features: torch.Tensor, labels: Any, keys: torch.Tensor) -> None:
        """Offer a batch: ``features (B, N)``, integer ``labels (B,)``, int64 ``keys (B,)``."""
        if self._synced:
            raise RuntimeError(
                "PerClassSampler.update() after sync(): the stored samples are already the global selection. "
                "Call reset() before a new epoch."
            )
        f, y, k = self._check_batch(features, labels, keys)
        if f.shape[0] == 0:
            return
        classes, counts = torch.unique(y, return_counts=True)
        for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
            self._n_seen[c] = self._n_seen.get(c, 0) + n
        self._offer(f, y, k, classes.tolist())

    def _admit(self, classes: list[int]) -> torch.Tensor | None:
        """Update the admitted classes (bottom-``max_classes`` by priority); None means all admitted."""
        if self.max_classes is None:
            return None
        new = [c for c in classes if c not in self._priority]
        if new:
            priorities = class_priority(torch.tensor(new, dtype=torch.int64), self.seed).tolist()
            for p, c in sorted(zip(priorities, new, strict=True)):
                if len(self._priority) < self.max_classes:
                    self._priority[c] = p
                    continue
                worst = max(self._priority, key=lambda cc: (self._priority[cc], cc))
                if (p, c) < (self._priority[worst], worst):
                    del self._priority[worst]
                    self._priority[c] = p
                    self._evicted = True  # its stored rows are dropped at the next merge
        return torch.tensor(sorted(self._priority), dtype=torch.int64)

    def _offer(self, f: torch.Tensor, y: torch.Tensor, k: torch.Tensor, classes: list[int]) -> None:
        """Filter candidates (features on the storage device, CPU labels/keys) into the pending buffer."""
        mask = torch.ones(y.shape[0], dtype=torch.bool)
        admitted = self._admit(classes)
        if admitted is not None:
            mask &= torch.isin(y, admitted)
        n_cls = self._thr_cls.numel()
        if n_cls:
            pos = torch.searchsorted(self._thr_cls, y).clamp_(max=n_cls - 1)
            thr = torch.where(self._thr_cls[pos] == y, self._thr[pos], _NO_THRESHOLD)
            mask &= k < thr  # not below the k-th key of a full class: can never be selected
        idx = mask.nonzero().flatten()
        if idx.numel() == 0:
            return
        yi, ki = y[idx], k[idx]
        order = _lexsort(yi, ki)
        order = order[_first_of_duplicates(yi[order], ki[order])]
        rows = idx[order[_rank_in_run(yi[order]) < self.samples_per_class]]
        self._pend_f.append(f[rows.to(f.device)])
        self._pend_y.append(y[rows])
        self._pend_k.append(k[rows])
        self._pend_rows += rows.numel()
        if self._pend_rows >= max(int(self._y.numel()), self.compact_min_rows):
            self._compact()

    def _compact(self) -> None:
        """Merge the pending buffer into the store: per class the k smallest keys, sorted by (label, key)."""
        if self._f is None or (not self._pend_rows and not self._evicted):
            return
        feats = torch.cat([self._f, *self._pend_f])
        labels = torch.cat([self._y, *self._pend_y])
        keys = torch.cat([self._k, *self._pend_k])
        self._pend_f, self._pend_y, self._pend_k, self._pend_rows = [], [], [], 0
        order = _lexsort(labels, keys)
        order = order[_first_of_duplicates(labels[order], keys[order])]
        keep = _rank_in_run(labels[order]) < self.samples_per_class
        if self._evicted and self.max_classes is not None:
            keep &= torch.isin(labels[order], torch.tensor(sorted(self._priority), dtype=torch.int64))
        self._evicted = False
        sel = order[keep]
        self._f = feats[sel.to(feats.device)]
        self._y, self._k = labels[sel], keys[sel]
        cls, counts = torch.unique_consecutive(self._y, return_counts=True)
        last = torch.cumsum(counts, 0) - 1
        self._thr_cls = cls
        self._thr = torch.where(counts >= self.samples_per_class, self._k[last], _NO_THRESHOLD)

    # ------------------------------------------------------------------------------------ read
    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features (S, N), labels (S,), keys (S,))`` sorted by (label, key): a canonical order.

        Empty storage gives ``(0, N)`` features (``N = 0`` if no update has been seen).
        """
        self._compact()
        device = self._device if self._device is not None else torch.device("cpu")
        dtype = self._dtype if self._dtype is not None else torch.float32
        feats = self._f if self._f is not None else torch.zeros((0, 0), dtype=dtype, device=device)
        return feats, self._y.to(device), self._k.to(device)

    # ------------------------------------------------------------------------------------ sync
    def sync(self, gather_fn: GatherFn, device: torch.device | str | None = None) -> None:
        """Replace the local selection by the global one across processes.

        ``gather_fn(t)`` must all-gather a tensor whose first dim may differ between ranks and return the
        list of per-rank tensors (e.g. ``torchmetrics.utilities.distributed.gather_all_tensors``). Features,
        labels, keys and the ``n_seen`` counts are gathered and the bottom-k selection is re-applied, so
        every rank ends with the same selection, equal to that of one sampler fed all the data. A rank that
        stored nothing takes part with empty tensors (the feature dim and dtype are gathered first).
        ``device`` is where the gathered tensors live (the collective's device, e.g. the rank's CUDA device
        under NCCL); default: the features' device, else CPU. Every rank must call it (it is collective).

        Calling it again before :meth:`reset` is a no-op (re-gathering would duplicate samples), and
        :meth:`update` is refused until :meth:`reset`.
        """
        if self._synced:
            return
        if device is not None:
            dev = torch.device(device)
        else:
            dev = self._device if self._device is not None else torch.device("cpu")
        # 1. feature dim and dtype (unknown on a rank that stored nothing)
        dtype_code = _DTYPE_CODES.index(self._dtype) + 1 if self._dtype in _DTYPE_CODES else 0
        meta = torch.tensor([self._dim or 0, dtype_code], dtype=torch.int64, device=dev)
        metas = [t.reshape(-1).tolist() for t in gather_fn(meta)]
        dims = {m[0] for m in metas if m[0] > 0}
        if len(dims) > 1:
            raise RuntimeError(f"Feature dimensions differ across processes: {sorted(dims)}.")
        dim = dims.pop() if dims else 0
        codes = [m[1] for m in metas if m[1] > 0]
        dtype = _DTYPE_CODES[max(codes) - 1] if codes else (self._dtype or torch.float32)
        # 2. samples (every rank takes the same branch: `dim` is global)
        if dim > 0:
            feats, labels, keys = self.state()
            feats = feats.to(device=dev, dtype=dtype).reshape(-1, dim)
            all_f = torch.cat([t.to(dev) for t in gather_fn(feats.contiguous())]).reshape(-1, dim)
            all_y = torch.cat([t.reshape(-1).cpu() for t in gather_fn(labels.to(dev))])
            all_k = torch.cat([t.reshape(-1).cpu() for t in gather_fn(keys.to(dev))])
        else:
            all_f = torch.zeros((0, 0), dtype=dtype, device=dev)
            all_y = all_k = torch.zeros(0, dtype=torch.int64)
        # 3. counts
        seen = self.n_seen
        cls_t = torch.tensor(list(seen.keys()), dtype=torch.int64, device=dev)
        cnt_t = torch.tensor(list(seen.values()), dtype=torch.int64, device=dev)
        all_cls = torch.cat([t.reshape(-1).cpu() for t in gather_fn(cls_t)]).tolist()
        all_cnt = torch.cat([t.reshape(-1).cpu() for t in gather_fn(cnt_t)]).tolist()
        if not (all_f.shape[0] == all_y.shape[0] == all_k.shape[0]) or len(all_cls) != len(all_cnt):
            raise RuntimeError("gather_fn returned inconsistent sizes; it must gather every rank's tensor.")
        total: dict[int, int] = {}
        for c, n in zip(all_cls, all_cnt, strict=True):
            total[c] = total.get(c, 0) + n
        # 4. re-select from the union
        self.reset()
        self._n_seen = total
        if dim > 0:
            self._dim, self._device, self._dtype = dim, dev, dtype
            self._f = all_f.new_zeros((0, dim))
            if all_f.shape[0]:
                self._offer(all_f, all_y, all_k, torch.unique(all_y).tolist())
                self._compact()
        self._synced = True
