"""The bounded per-class sample (``metrics.PerClassSample``) and its keys (``sample_keys``, ``class_priority``):
exact bottom-k selection against a brute force, bounded memory, order/batching invariance, and the DDP sync
(torchmetrics ``sync``) simulated with threads; the real 2-process gloo gather is in test_metrics.py."""

from __future__ import annotations

import threading

import pytest
import torch
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from lightning_geomarkers.metrics import PerClassSample, class_priority, sample_keys

# ------------------------------------------------------------------------------------- sample_keys


def test_sample_keys_batch_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    keys = sample_keys(x, y, seed=7)
    assert keys.dtype == torch.int64 and keys.shape == (10,) and bool((keys >= 0).all())
    perm = torch.randperm(10, generator=g)
    assert torch.equal(sample_keys(x[perm], y[perm], seed=7), keys[perm])
    assert torch.equal(sample_keys(x[3:4], y[3:4], seed=7), keys[3:4])
    other = torch.cat([x[5:6], torch.randn(4, 3, 4, 4, generator=g)])
    assert sample_keys(other, torch.cat([y[5:6], y[:4]]), seed=7)[0] == keys[5]
    assert torch.equal(sample_keys(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), y, 7), keys)
    assert len(set(keys.tolist())) == 10  # different rows -> different keys
    assert not torch.equal(sample_keys(x, y, seed=8), keys)  # depends on the seed
    assert not torch.equal(sample_keys(x, (y + 1) % 3, seed=7), keys)  # and on the label


def test_sample_keys_dtypes() -> None:
    y = torch.zeros(6, dtype=torch.long)
    for content in (
        torch.randn(6, 5).half(),
        torch.randint(0, 1000, (6, 3), dtype=torch.int32),
        torch.rand(6, 9) > 0.5,
        torch.arange(6),
        torch.randn(6, 3, dtype=torch.float64),
        torch.randint(0, 255, (6, 3, 2, 2), dtype=torch.uint8),
    ):
        keys = sample_keys(content, y, 0)
        assert keys.shape == (6,) and bool((keys >= 0).all())
        assert torch.equal(sample_keys(content[2:3], y[2:3], 0), keys[2:3])
    base = torch.randn(17)
    unaligned = base[1:].reshape(8, 2)  # storage offset of 4 bytes
    assert torch.equal(
        sample_keys(unaligned, y[:1].expand(8), 0), sample_keys(unaligned.clone(), y[:1].expand(8), 0)
    )
    one_bit = torch.zeros(2, 64)
    one_bit[1, 37] = 1e-30
    k = sample_keys(one_bit, torch.zeros(2, dtype=torch.long), 0)
    assert k[0] != k[1]
    assert sample_keys(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 0).shape == (0,)
    with pytest.raises(ValueError, match="non-integer"):  # the labels' rules are utilities.check_labels'
        sample_keys(torch.zeros(2, 3), torch.tensor([0.5, 1.0]), seed=0)
    with pytest.raises(TypeError):
        sample_keys(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), seed=1.5)  # type: ignore[arg-type]


def test_sample_keys_distinct_for_words_with_many_trailing_zero_bits() -> None:
    """Distinct rows get distinct keys also where every int64 word ends in many zero bits (float64 whole
    numbers, powers of two, shifted integers): a multiply-and-sum of the raw words kept only the high bits
    of such words (53 of sklearn's 1797 digits as float64 collided, and 194 to 15,933 of these 20,000 rows), and
    the sample then counted distinct samples as one."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    for content in (
        torch.randint(0, 256, (n, 48), generator=g).double(),  # uint8 images stored as float64
        torch.randint(0, 4, (n, 16), generator=g).double(),
        2.0 ** torch.randint(-30, 30, (n, 8), generator=g).double(),
        torch.randint(0, 1024, (n, 8), generator=g) << 44,
    ):
        rows = torch.unique(content, dim=0)
        keys = sample_keys(rows, torch.zeros(len(rows), dtype=torch.long), 0)
        assert keys.unique().numel() == len(rows), content.dtype
        sample = PerClassSample(samples_per_class=len(rows))
        sample.update(rows.double(), torch.zeros(len(rows), dtype=torch.long), keys)
        assert sample.state()[0].shape[0] == len(rows)  # nothing dropped as a "duplicate"


def test_sample_keys_do_not_depend_on_the_chunking() -> None:
    """The words are summed in blocks of rows x words (rows in blocks too, for very large batches): any
    chunk size gives the same keys."""
    x = torch.randn(1000, 3, 7, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 5, (1000,), generator=torch.Generator().manual_seed(5))
    keys = sample_keys(x, y, 2)
    for chunk in (1, 64, 100, 1 << 12):
        assert torch.equal(sample_keys(x, y, 2, chunk_elements=chunk), keys), chunk


def test_sample_keys_roughly_uniform() -> None:
    keys = sample_keys(torch.arange(4000).reshape(-1, 1), torch.zeros(4000, dtype=torch.long), 3)
    u = keys.double() / 2.0**63
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert bool((counts > 300).all()) and bool((counts < 500).all())
    pri = class_priority(torch.arange(1000), seed=0)
    assert len(set(pri.tolist())) == 1000 and bool((pri >= 0).all())
    assert not torch.equal(pri, class_priority(torch.arange(1000), seed=1))


# ---------------------------------------------------------------------------------- PerClassSample


def _dataset(n: int, n_classes: int, dim: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, y


def _brute_force(x, y, keys, k, classes=None):
    """Rows of the per-class bottom-k, in (label, key) order, by plain Python sorting."""
    rows = []
    for c in sorted(set(y.tolist()) if classes is None else classes):
        members = [i for i in range(len(y)) if int(y[i]) == c]
        rows.extend(sorted(members, key=lambda i: int(keys[i]))[:k])
    return torch.tensor(rows, dtype=torch.long)


def _stored_rows(sample: PerClassSample) -> int:
    """Rows held in the raw states (store + pending buffer), without merging."""
    return sum(int(t.shape[0]) for t in sample.labels)


@pytest.mark.parametrize("read_every_step", [True, False])
def test_sample_bounded_and_correct(read_every_step: bool) -> None:
    x, y = _dataset(200 * 16, 5)
    keys = sample_keys(x, y, seed=1)
    sample = PerClassSample(samples_per_class=7, seed=1)
    sample.compact_min_rows = 64  # exercise the pending buffer / merge path
    for i in range(200):
        s = slice(16 * i, 16 * (i + 1))
        sample.update(x[s], y[s], keys[s])
        # memory: store (<= k per class) plus a pending buffer bounded by max(store, 64) + one batch
        assert _stored_rows(sample) <= 35 + 64 + 16
        if read_every_step:
            assert all(v <= 7 for v in sample.num_stored_per_class.values())
    assert sample.num_stored == 35
    feats, labels, got_keys = sample.state()
    rows = _brute_force(x, y, keys, 7)
    assert torch.equal(feats, x[rows]) and torch.equal(labels, y[rows]) and torch.equal(got_keys, keys[rows])
    assert sample.n_seen == {c: int((y == c).sum()) for c in range(5)}
    sample.reset()
    assert sample.num_stored == 0 and sample.state()[0].shape == (0, 0) and sample.n_seen == {}


def test_sample_memory_bounded_at_100x_capacity() -> None:
    """10 classes x k=5 = 50 kept rows; 5000 rows offered (100x) in 250 batches of 20."""
    x, y = _dataset(5000, 10, dim=3, seed=4)
    sample = PerClassSample(samples_per_class=5, max_classes=None, seed=2)
    peak = 0
    for part in torch.arange(5000).split(20):
        sample.update(x[part], y[part])  # keys: hash of the features
        peak = max(peak, _stored_rows(sample))
        assert sample.num_stored <= 50
    assert peak <= 50 + sample.compact_min_rows + 20
    assert sample.num_stored == 50
    rows = _brute_force(x, y, sample_keys(x, y, 2), 5)
    assert torch.equal(sample.state()[0], x[rows])


def test_sample_order_and_batching_invariant_and_small_classes() -> None:
    x, y = _dataset(300, 8)
    y[:2] = 9  # a class with fewer than k samples
    keys = sample_keys(x, y, 0)
    a, b = PerClassSample(10, seed=0), PerClassSample(10, seed=0)
    a.update(x, y, keys)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    for chunk in perm.split(37):
        b.update(x[chunk], y[chunk], keys[chunk])
    for ta, tb in zip(a.state(), b.state(), strict=True):
        assert torch.equal(ta, tb)
    assert a.num_stored_per_class[9] == 2
    assert a.n_seen == b.n_seen


def test_sample_max_classes_fixed_subset() -> None:
    x, y = _dataset(600, 20)
    keys = sample_keys(x, y, 5)
    s1 = PerClassSample(3, max_classes=5, seed=5)
    s1.update(x, y, keys)
    s2 = PerClassSample(3, max_classes=5, seed=5)
    for chunk in torch.randperm(600, generator=torch.Generator().manual_seed(0)).split(11):
        s2.update(x[chunk], y[chunk], keys[chunk])  # classes arrive, get admitted, then evicted
    assert s1.classes == s2.classes and len(s1.classes) == 5
    pri = class_priority(torch.arange(20), 5)
    assert s1.classes == sorted(torch.argsort(pri)[:5].tolist())
    for ta, tb in zip(s1.state(), s2.state(), strict=True):
        assert torch.equal(ta, tb)
    rows = _brute_force(x, y, keys, 3, classes=s1.classes)
    assert torch.equal(s1.state()[0], x[rows])
    assert len(s1.n_seen) == 20  # counts cover every class seen
    s3 = PerClassSample(3, max_classes=5, seed=6)
    s3.update(x, y, sample_keys(x, y, 6))
    assert s3.classes != s1.classes
    assert s1.num_stored == 15


def test_sample_inclusion_roughly_uniform() -> None:
    n, k, trials = 20, 5, 400
    content = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    y = torch.zeros(n, dtype=torch.long)
    hits = torch.zeros(n)
    for seed in range(trials):
        s = PerClassSample(k, seed=seed)
        s.update(content, y, sample_keys(content, y, seed))
        feats = s.state()[0]
        hits[(feats[:, 0] / 3).long()] += 1
    expected = trials * k / n  # 100, sd ~ 8.7
    assert bool(((hits - expected).abs() < 45).all()), hits


def test_sample_drops_exact_duplicates_within_and_across_batches() -> None:
    """DistributedSampler pads shards with repeated samples; a repeat must not take a second slot."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g)
    y = torch.zeros(6, dtype=torch.int64)
    keys = sample_keys(x, y, seed=0)
    once = PerClassSample(samples_per_class=4, seed=0)
    once.update(x, y, keys)
    twice = PerClassSample(samples_per_class=4, seed=0)
    dup = torch.cat([x[:2], x[:2], x])  # duplicates inside one batch ...
    zeros = torch.zeros(10, dtype=torch.int64)
    twice.update(dup, zeros, sample_keys(dup, zeros, 0))
    twice.update(x, y, keys)  # ... and across batches
    f1, _, k1 = once.state()
    f2, _, k2 = twice.state()
    assert f2.shape[0] == 4 and len(set(k2.tolist())) == 4
    assert torch.equal(k1, k2) and torch.equal(f1, f2)


def test_sample_validation_errors() -> None:
    with pytest.raises(ValueError, match="samples_per_class"):
        PerClassSample(1)
    with pytest.raises(TypeError):
        PerClassSample(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_classes"):
        PerClassSample(5, max_classes=1)
    with pytest.raises(TypeError, match="seed"):
        PerClassSample(5, seed="a")  # type: ignore[arg-type]
    s = PerClassSample(5, max_classes=3, seed=9)
    x, y = _dataset(10, 2)
    s.update(x, y, sample_keys(x, y, 9))
    with pytest.raises(ValueError, match="columns"):
        s.update(torch.randn(2, 7), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        s.update(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        s.update(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating"):
        s.update(torch.ones(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        s.update(torch.randn(2, 4, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-integer"):  # one label rule: utilities.check_labels
        s.update(torch.randn(2, 4), torch.tensor([0.5, 1.0]))


def test_sample_keeps_dtype_and_accepts_empty_batches() -> None:
    s = PerClassSample(3, seed=0)
    s.update(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    assert s.num_stored == 0 and s.feature_dim == 4 and s.state()[0].shape == (0, 4)
    x, y = _dataset(12, 2)
    s.update(x, y)  # float32 rows are widened to the float64 of the first update
    assert s.state()[0].dtype == torch.float64 and s.num_stored == 6


def test_a_wider_batch_widens_the_sample_instead_of_being_narrowed() -> None:
    """A float16 first batch used to fix the store's dtype: later float32 batches were rounded to float16
    silently (NC1 9% off at a feature scale of 1e-7). The store widens to the widest dtype offered."""
    x, y = _dataset(40, 2)
    x = x * 1e-7
    s = PerClassSample(30, seed=0)
    s.update(x[:8].half(), y[:8])
    s.update(x[8:], y[8:])
    feats, labels, keys = s.state()
    assert feats.dtype == torch.float32
    exact = {int(k): row for k, row in zip(sample_keys(x[8:], y[8:], 0).tolist(), x[8:], strict=True)}
    for k, row in zip(keys.tolist(), feats, strict=True):
        if k in exact:  # the float32 rows are kept exactly
            assert torch.equal(row, exact[k])


# ------------------------------------------------------------------------- DDP sync (threads as ranks)


def _sync_as_ranks(samples: list[PerClassSample], sent: list[list[torch.Tensor]] | None = None) -> None:
    """Run torchmetrics' ``sync()`` of each sample in its own thread, with an all-gather across threads
    (what each rank sends is appended to ``sent[rank]`` if given)."""
    n = len(samples)
    barrier = threading.Barrier(n)
    slots: list[torch.Tensor | None] = [None] * n
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        def gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
            if sent is not None:
                sent[rank].append(t)
            slots[rank] = t
            barrier.wait()
            out = [s for s in slots if s is not None]
            barrier.wait()
            return out

        try:
            samples[rank].sync(dist_sync_fn=gather, distributed_available=lambda: True)
        except BaseException as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]


def test_sync_equals_single_process_and_unsync_restores() -> None:
    x, y = _dataset(400, 6, dim=5)
    keys = sample_keys(x, y, 3)
    full = PerClassSample(8, max_classes=4, seed=3)
    full.update(x, y, keys)
    # rank 1 sees only some classes, rank 2 a few duplicates of rank 0's rows; small batches everywhere
    idx1 = (y >= 3).nonzero().flatten()[::2]
    mask = torch.ones(400, dtype=torch.bool)
    mask[idx1] = False
    shards = [mask.nonzero().flatten(), idx1, torch.arange(0, 400, 7)]
    ranks = [PerClassSample(8, max_classes=4, seed=3) for _ in shards]
    for sample, idx in zip(ranks, shards, strict=True):
        for chunk in idx.split(23):
            sample.update(x[chunk], y[chunk], keys[chunk])
    local = [r.state() for r in ranks]
    _sync_as_ranks(ranks)
    for sample in ranks:
        assert sample.is_synced
        for ta, tb in zip(sample.state(), full.state(), strict=True):
            assert torch.equal(ta, tb)
    # counts are summed (the duplicated rows of rank 2 are counted: DistributedSampler pads likewise)
    assert ranks[1].n_seen == {c: full.n_seen[c] + int((y[shards[2]] == c).sum()) for c in full.n_seen}
    with pytest.raises(RuntimeError, match="unsync"):
        ranks[0].update(x[:2], y[:2], keys[:2])
    with pytest.raises(TorchMetricsUserError, match="already been synced"):
        ranks[0].sync(distributed_available=lambda: True)
    ranks[0].unsync()  # back to the local sample; accumulation can go on
    assert not ranks[0].is_synced and torch.equal(ranks[0].state()[0], local[0][0])
    ranks[0].update(x[:2], y[:2], keys[:2])


def test_sync_with_empty_ranks() -> None:
    x, y = _dataset(50, 3, dim=6)
    keys = sample_keys(x, y, 0)
    full = PerClassSample(4, seed=0)
    full.update(x, y, keys)
    ranks = [PerClassSample(4, seed=0), PerClassSample(4, seed=0)]
    ranks[1].update(x, y, keys)
    _sync_as_ranks(ranks)
    assert torch.equal(ranks[0].state()[0], full.state()[0]) and ranks[0].state()[0].shape == (12, 6)
    assert ranks[0].n_seen == full.n_seen
    nobody = [PerClassSample(4, seed=0), PerClassSample(4, seed=0)]
    _sync_as_ranks(nobody)
    assert all(s.num_stored == 0 and s.is_synced for s in nobody)
    nobody[0].reset()
    assert not nobody[0].is_synced


def test_metric_rank_with_only_an_empty_batch_takes_part_in_the_sync() -> None:
    from lightning_geomarkers.metrics import ParticipationRatio

    x, y = _dataset(50, 3, dim=6)
    full = ParticipationRatio(samples_per_class=4, seed=0)
    full.update(x, y)
    ranks = [ParticipationRatio(samples_per_class=4, seed=0), ParticipationRatio(samples_per_class=4, seed=0)]
    ranks[0].update(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))  # this rank got no data
    ranks[1].update(x, y)
    _sync_as_ranks(ranks)
    for r in ranks:
        assert torch.equal(r.state()[0], full.state()[0]) and r.n_seen == full.n_seen


def test_sync_rejects_different_feature_dims() -> None:
    a, b = PerClassSample(4, seed=0), PerClassSample(4, seed=0)
    a.update(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    b.update(torch.randn(4, 5), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(RuntimeError, match="Feature dimensions differ"):
        _sync_as_ranks([a, b])


def test_sync_moves_only_the_selected_feature_rows() -> None:
    """The ranks first gather labels and keys, then only the selected rows' features: one store in all,
    where gathering every rank's whole store moved world_size stores (and every rank held them twice)."""
    x, y = _dataset(600, 5, dim=7)
    keys = sample_keys(x, y, 1)
    full = PerClassSample(6, max_classes=3, seed=1)
    full.update(x, y, keys)
    ranks = [PerClassSample(6, max_classes=3, seed=1) for _ in range(3)]
    for r, sample in enumerate(ranks):
        idx = torch.arange(r, 600, 3)
        sample.update(x[idx], y[idx], keys[idx])
    assert all(s.num_stored == 18 for s in ranks)  # each rank's own bottom-6 of 3 classes
    sent: list[list[torch.Tensor]] = [[], [], []]
    _sync_as_ranks(ranks, sent)
    for sample in ranks:
        for ta, tb in zip(sample.state(), full.state(), strict=True):
            assert torch.equal(ta, tb)
    feature_rows = sum(t.shape[0] for per_rank in sent for t in per_rank if t.is_floating_point())
    assert feature_rows == full.num_stored == 18


def test_sync_of_identical_ranks_and_padding_copies_equals_one_process() -> None:
    """Every rank fed the same data (no DistributedSampler), or shards overlapping in a few padding copies:
    each shared sample is sent by every rank that holds it and kept once."""
    x, y = _dataset(120, 4, dim=5)
    keys = sample_keys(x, y, 0)
    full = PerClassSample(5, max_classes=None, seed=0)
    full.update(x, y, keys)
    same = [PerClassSample(5, max_classes=None, seed=0) for _ in range(3)]
    for s in same:
        s.update(x, y, keys)
    _sync_as_ranks(same)
    padded = [PerClassSample(5, max_classes=None, seed=0) for _ in range(2)]
    padded[0].update(x[:70], y[:70], keys[:70])
    padded[1].update(x[60:], y[60:], keys[60:])  # rows 60-69 on both ranks
    _sync_as_ranks(padded)
    for sample in (*same, *padded):
        for ta, tb in zip(sample.state(), full.state(), strict=True):
            assert torch.equal(ta, tb)


def test_sync_rejects_samples_with_different_arguments() -> None:
    a, b = PerClassSample(4, seed=0), PerClassSample(4, seed=1)
    a.update(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    b.update(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(
        RuntimeError, match=r"different \(samples_per_class, max_classes, seed\).*same arguments"
    ):
        _sync_as_ranks([a, b])


def test_set_dtype_converts_only_the_features_and_to_moves_everything() -> None:
    x, y = _dataset(40, 3, dim=5)
    s = PerClassSample(4, seed=0)
    s.update(x, y)
    feats, labels, keys = (t.clone() for t in s.state())
    assert bool((keys > 2**53).any())  # keys a float64 cast would round
    s.set_dtype(torch.float64)
    f64, labels64, keys64 = s.state()
    assert f64.dtype == torch.float64 and torch.equal(f64, feats.double())
    assert labels64.dtype == keys64.dtype == torch.int64
    assert torch.equal(labels64, labels) and torch.equal(keys64, keys)
    assert s.sample_config.dtype == torch.int64 and s.n_seen == {c: int((y == c).sum()) for c in range(3)}
    s.half()  # torchmetrics ignores plain dtype casts of metric states
    assert s.state()[0].dtype == torch.float64
    s.to("cpu")
    s.update(x[:3] * 10, y[:3])  # still accepts updates after the moves
    assert s.num_stored == 12


@pytest.mark.parametrize("temp_rows", [None, 1, 2])
def test_gather_rows_equals_concatenate_then_index(monkeypatch, temp_rows):
    """The compaction's row gather from the chunks equals indexing their concatenation (empty chunks,
    repeated and unordered rows included), also through temporaries of one or two rows."""
    import lightning_geomarkers.metrics.sample as sample_module
    from lightning_geomarkers.metrics.sample import _gather_rows

    if temp_rows is not None:
        monkeypatch.setattr(sample_module, "_GATHER_BYTES", temp_rows * 7 * 4)
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 7, generator=g) for n in (5, 0, 1, 12, 3)]
    whole = torch.cat(chunks)
    for rows in (torch.randperm(21, generator=g)[:9], torch.tensor([20, 0, 5, 5, 17]), torch.arange(21)):
        assert torch.equal(_gather_rows(chunks, rows), whole[rows])
    assert torch.equal(_gather_rows(chunks[3:4], torch.tensor([2, 0])), chunks[3][[2, 0]])


def test_many_distinct_labels_cost_the_same_per_batch_and_match_a_brute_force() -> None:
    """Every batch used to re-sum the counts of every class seen and re-rank all of them for
    ``max_classes``: an epoch was quadratic in the distinct labels (4 -> 102 ms per batch over 600,000
    rows of 580,000 labels). The counts are summed lazily and the admitted classes kept incrementally
    (the bottom of a union is the bottom of the parts' bottoms); the sample equals a brute force."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    y = torch.randint(0, 10**7, (n,), generator=g)
    x = torch.randn(n, 3, generator=g)
    keys = sample_keys(x, y, 0)
    sample = PerClassSample(samples_per_class=2, max_classes=50, seed=0)
    for part in torch.arange(n).split(500):
        sample.update(x[part], y[part], keys[part])
    classes = torch.unique(y)
    pri = class_priority(classes, 0)
    admitted = sorted(sorted(zip(pri.tolist(), classes.tolist(), strict=True))[:50], key=lambda t: t[1])
    admitted_ids = [c for _, c in admitted]
    expected = _brute_force(x, y, keys, 2, classes=admitted_ids)
    feats, labels, _ = sample.state()
    assert torch.equal(labels, y[expected]) and torch.equal(feats, x[expected])
    counts = sample.n_seen
    assert len(counts) == classes.numel() and sum(counts.values()) == n
    assert sum(int(c.numel()) for c in sample.seen_classes) <= classes.numel() + 1024 + 500


def test_widening_keeps_keys_respects_set_dtype_and_waits_for_a_valid_batch() -> None:
    """Keys come from the batch as given: the same float16 rows offered before and after a float32 batch
    widened the store got other keys the second time and were kept twice. set_dtype() fixes the dtype
    (later batches are cast to it, not widened), and a batch that fails validation widens nothing."""
    x, y = _dataset(12, 2)
    s = PerClassSample(30, seed=0)
    s.update(x[:4].half(), y[:4])
    s.update(x[4:5], y[4:5])  # float32: widens the store
    s.update(x[:4].half(), y[:4])  # the same rows again: the same keys, counted once
    assert s.num_stored == 5 and s.state()[0].dtype == torch.float32
    fixed = PerClassSample(30, seed=0)
    fixed.update(x[:4], y[:4])
    fixed.set_dtype(torch.float16)
    fixed.update(x[4:8], y[4:8])
    assert fixed.state()[0].dtype == torch.float16
    bad = PerClassSample(30, seed=0)
    bad.update(x[:4].half(), y[:4])
    with pytest.raises(ValueError, match="non-integer"):
        bad.update(x[4:8].double(), torch.tensor([0.5, 1.0, 0.0, 1.0]))
    assert bad.state()[0].dtype == torch.float16


def test_sync_promotes_mixed_half_dtypes_like_one_process() -> None:
    """A float16 rank and a bfloat16 rank: one process would widen to float32; the sync took the 'largest'
    code, bfloat16, and rounded the float16 rank's rows."""
    x, y = _dataset(40, 2)
    ranks = [PerClassSample(30, seed=0), PerClassSample(30, seed=0)]
    ranks[0].update(x[:20].half(), y[:20])
    ranks[1].update(x[20:].bfloat16(), y[20:])
    _sync_as_ranks(ranks)
    for r in ranks:
        assert r.state()[0].dtype == torch.float32
    one = PerClassSample(30, seed=0)
    one.update(x[:20].half(), y[:20])
    one.update(x[20:].bfloat16(), y[20:])
    assert torch.equal(one.state()[0], ranks[0].state()[0])
