"""Capture layer of the monitor: head discovery, layer resolution, pooling, hooks, labels, sampling."""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from lightning_geomarkers.callbacks._labels import batch_inputs, extract_labels
from lightning_geomarkers.callbacks._layers import (
    FeatureHook,
    find_classifier_head,
    pool_features,
    resolve_layers,
)
from lightning_geomarkers.callbacks._sampling import (
    PerClassSampler,
    class_priority,
    sample_keys,
)
from lightning_geomarkers.errors import MonitorWarning

# ----------------------------------------------------------------------------------------- models


class AttrMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 10, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class TransformerHeadFirst(nn.Module):
    """Head registered *before* an attention block: the attention linears must still not win."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 5)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head_a = nn.Linear(16, 10)
        self.head_b = nn.Linear(16, 5)


class ChainSameWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)


class ModuleListHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.heads = nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 7)])


# ----------------------------------------------------------------------------- find_classifier_head


def test_head_sequential_mlp() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    name, head = find_classifier_head(model)
    assert name == "4" and head is model[4]


def test_head_sequential_same_width_chain_is_not_ambiguous() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    assert find_classifier_head(model)[0] == "1"
    assert find_classifier_head(ChainSameWidth())[0] == "fc2"


def test_head_attribute_mlp() -> None:
    model = AttrMLP()
    name, head = find_classifier_head(model)
    assert name == "head" and head is model.head


def test_head_cnn() -> None:
    model = SmallCNN()
    assert find_classifier_head(model) == ("classifier", model.classifier)


def test_head_transformer_ignores_attention_linears() -> None:
    model = TinyTransformer()
    assert find_classifier_head(model) == ("head", model.head)
    model2 = TransformerHeadFirst()
    assert find_classifier_head(model2) == ("head", model2.head)


def test_head_missing_lists_leaves() -> None:
    with pytest.raises(ValueError, match="No nn.Linear") as info:
        find_classifier_head(NoLinear())
    msg = str(info.value)
    assert "'conv'" in msg and "'pool'" in msg and 'layers="<module name>"' in msg
    # a pure transformer block has only attention linears -> also "no classifier"
    with pytest.raises(ValueError, match="No nn.Linear"):
        find_classifier_head(nn.TransformerEncoderLayer(8, 2))


def test_head_parallel_heads_ambiguous() -> None:
    with pytest.raises(ValueError, match="Ambiguous") as info:
        find_classifier_head(TwoHeads())
    assert "head_a" in str(info.value) and "head_b" in str(info.value)
    with pytest.raises(ValueError, match="Ambiguous") as info:
        find_classifier_head(ModuleListHeads())
    assert "heads.0" in str(info.value) and "heads.1" in str(info.value)


# ---------------------------------------------------------------------------------- resolve_layers


def test_resolve_default_is_head_input() -> None:
    model = AttrMLP()
    assert resolve_layers(model) == {"head": (model.head, "input")}


def test_resolve_names_and_sides() -> None:
    model = SmallCNN()
    out = resolve_layers(model, ["features.2", "classifier:input", "pool:output", "flatten"])
    assert out == {
        "features.2": (model.features[2], "output"),
        "classifier:input": (model.classifier, "input"),
        "pool": (model.pool, "output"),
        "flatten": (model.flatten, "output"),
    }
    assert resolve_layers(model, "pool") == {"pool": (model.pool, "output")}
    assert resolve_layers(model, "") == {"root": (model, "output")}


def test_resolve_module_instances() -> None:
    model = SmallCNN()
    assert resolve_layers(model, model.pool) == {"pool": (model.pool, "output")}
    out = resolve_layers(model, [model.features[0], "classifier:input"])
    assert out["features.0"] == (model.features[0], "output")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layers(model, nn.Linear(2, 2))


def test_resolve_unknown_name_suggests() -> None:
    model = SmallCNN()
    with pytest.raises(ValueError, match="no submodule named 'clasifier'") as info:
        resolve_layers(model, "clasifier:input")
    msg = str(info.value)
    assert "Did you mean 'classifier'" in msg and "features.0" in msg
    with pytest.raises(TypeError):
        resolve_layers(model, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(model, [])


# ----------------------------------------------------------------------------------- pool_features


def test_pool_2d_3d_4d() -> None:
    x2 = torch.randn(4, 6)
    assert torch.equal(pool_features(x2), x2)
    x3 = torch.randn(4, 5, 6)
    assert torch.allclose(pool_features(x3), x3.mean(1))
    assert torch.allclose(pool_features(x3, "mean"), x3.mean(1))
    assert torch.equal(pool_features(x3, "cls"), x3[:, 0])
    assert torch.equal(pool_features(x3, "max"), x3.amax(1))
    assert torch.allclose(pool_features(x3, channels_first=True), x3.mean(2))
    x4 = torch.randn(4, 3, 5, 5)
    assert torch.allclose(pool_features(x4), x4.mean((2, 3)))
    assert torch.equal(pool_features(x4, "max"), x4.amax((2, 3)))
    x5 = torch.randn(2, 3, 2, 2, 2)
    assert pool_features(x5).shape == (2, 3)
    with pytest.raises(ValueError, match="cls"):
        pool_features(x4, "cls")


def test_pool_dtypes_and_detach() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    out = pool_features(torch.randn(5, 4) @ w)
    assert not out.requires_grad and out.dtype == torch.float32
    half = torch.randn(2, 7, 3).half()
    assert pool_features(half).dtype == torch.float32
    assert pool_features(torch.ones(2, 3, dtype=torch.float64)).dtype == torch.float64
    assert pool_features(torch.ones(2, 3, dtype=torch.int64)).dtype == torch.float32


def test_pool_callable_and_tuples() -> None:
    x3 = torch.randn(4, 5, 6)
    assert torch.equal(pool_features(x3, lambda t: t[:, -1]), x3[:, -1])
    assert torch.allclose(pool_features((x3, torch.zeros(1))), x3.mean(1))
    assert torch.allclose(pool_features([None, x3]), x3.mean(1))
    assert torch.allclose(pool_features(OrderedDict(last_hidden_state=x3)), x3.mean(1))
    # callable receives the raw value (e.g. the whole tuple)
    assert torch.equal(pool_features((x3, x3[:, 0]), lambda o: o[1]), x3[:, 0])


def test_pool_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pool_features(torch.randn(4))
    with pytest.raises(ValueError, match="2-D"):
        pool_features(torch.randn(4, 3), lambda t: t.sum())
    with pytest.raises(TypeError):
        pool_features("text")
    with pytest.raises(TypeError):
        pool_features((1, 2))
    with pytest.raises(ValueError, match="pooling"):
        pool_features(torch.randn(4, 3, 2), "median")


# ------------------------------------------------------------------------------------- FeatureHook


def test_hook_captures_head_input_when_enabled() -> None:
    torch.manual_seed(0)
    model = AttrMLP()
    hook = FeatureHook(model.head, "input", name="head")
    x = torch.randn(6, 8, requires_grad=True)
    model(x)
    assert hook.pop() is None and hook.calls == 0  # disabled by default
    hook.enabled = True
    out = model(x)
    feats = hook.pop()
    expected = model.act(model.fc2(model.act(model.fc1(x))))
    assert feats is not None and torch.allclose(feats, expected)
    assert not feats.requires_grad and feats.grad_fn is None
    out.sum().backward()  # the graph is untouched by the hook
    assert hook.calls == 1 and hook.pop() is None
    # several calls between pops are concatenated
    model(x[:2])
    model(x[2:5])
    assert hook.pop().shape == (5, 12)  # type: ignore[union-attr]
    hook.remove()
    hook.remove()  # idempotent
    model(x)
    assert hook.removed and hook.pop() is None
    assert not model.head._forward_pre_hooks


def test_hook_output_and_pooling() -> None:
    model = SmallCNN()
    hook = FeatureHook(model.features, "output", enabled=True)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        model(x)
        captured = hook.pop()
        hook.enabled = False
        expected = model.features(x).mean((2, 3))
    assert captured is not None and torch.allclose(captured, expected)
    assert hook.pop() is None
    conv1d = nn.Conv1d(2, 5, 3)
    h1 = FeatureHook(conv1d, enabled=True)
    conv1d(torch.randn(4, 2, 9))
    assert h1.pop().shape == (4, 5)  # type: ignore[union-attr]  # channel-first: mean over length


def test_hook_input_by_keyword() -> None:
    lin = nn.Linear(3, 2)
    hook = FeatureHook(lin, "input", enabled=True)
    x = torch.randn(4, 3)
    lin(input=x)
    assert torch.equal(hook.pop(), x)  # type: ignore[arg-type]


def test_hook_inference_mode() -> None:
    model = AttrMLP()
    hook = FeatureHook(model.head, "input", enabled=True)
    with torch.inference_mode():
        model(torch.randn(2, 8))
    assert hook.pop().shape == (2, 12)  # type: ignore[union-attr]


def test_hook_failure_warns_not_raises() -> None:
    lin = nn.Linear(3, 2)
    hook = FeatureHook(lin, "output", pooling=lambda t: t.sum(), enabled=True)
    with pytest.warns(MonitorWarning, match="failed"):
        lin(torch.randn(4, 3))
    assert hook.pop() is None and isinstance(hook.error, ValueError)
    strict = FeatureHook(lin, "output", pooling=lambda t: t.sum(), enabled=True, strict=True)
    hook.remove()
    with pytest.raises(ValueError):
        lin(torch.randn(4, 3))
    strict.remove()


def test_hook_pickle_and_deepcopy() -> None:
    model = AttrMLP()
    hook = FeatureHook(model.head, "input", name="head", enabled=True)
    model(torch.randn(2, 8))
    restored = pickle.loads(pickle.dumps(hook))
    assert restored.name == "head" and restored.pending == 0
    clone = copy.deepcopy(model)
    assert hook.pending == 1  # original buffer untouched
    out = clone(torch.randn(3, 8))  # the copied model still runs with its copied hook
    assert out.shape == (3, 3)
    assert hook.pop().shape == (2, 12)  # type: ignore[union-attr]  # the copy captured into its own hook
    reloaded = pickle.loads(pickle.dumps(model))
    assert reloaded(torch.randn(2, 8)).shape == (2, 3)
    with pytest.raises(ValueError):
        FeatureHook(model.head, "middle")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- extract_labels


def test_extract_labels_tuple_dict_fn() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert torch.equal(extract_labels((x, y)), y)
    assert torch.equal(extract_labels([x, y, "meta"]), y)
    assert torch.equal(extract_labels({"image": x, "label": y.int()}), y)
    assert extract_labels({"image": x, "targets": y.int()}).dtype == torch.int64
    assert torch.equal(extract_labels({"y": y[:, None]}), y)  # (B, 1) squeezed
    assert torch.equal(extract_labels((x, y.float())), y)  # integral floats accepted
    assert torch.equal(extract_labels((x, np.array([0, 1, 2, 1]))), y)
    assert torch.equal(extract_labels({"cls": y}, label_fn=lambda b: b["cls"]), y)
    assert torch.equal(extract_labels((x, torch.tensor(3))), torch.tensor([3]))
    assert torch.equal(extract_labels((x, torch.tensor([True, False]))), torch.tensor([1, 0]))


def test_extract_labels_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="label_fn") as info:
        extract_labels({"image": x, "cls": torch.zeros(4)})
    assert "'cls'" in str(info.value) and "'image'" in str(info.value)
    with pytest.raises(ValueError, match="label_fn"):
        extract_labels(x)
    with pytest.raises(ValueError, match="label_fn"):
        extract_labels((x,))
    with pytest.raises(ValueError, match="one-hot"):
        extract_labels((x, torch.eye(4)))
    with pytest.raises(ValueError, match="non-integer"):
        extract_labels((x, torch.tensor([0.5, 1.0, 0.0, 1.0])))
    with pytest.raises(TypeError):
        extract_labels((x, "cat"))
    with pytest.raises(TypeError):
        extract_labels((x, torch.zeros(4)), label_fn=3)  # type: ignore[arg-type]


def test_batch_inputs() -> None:
    x, y = torch.randn(4, 3), torch.arange(4)
    assert batch_inputs((x, y)) is x
    assert batch_inputs({"label": y, "pixel_values": x}) is x
    assert batch_inputs({"input_ids": y, "x": x}) is x
    assert batch_inputs({"label": y}) is None
    assert batch_inputs(("text", y)) is None
    assert batch_inputs(object()) is None


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


def test_sample_keys_roughly_uniform() -> None:
    keys = sample_keys(torch.arange(4000).reshape(-1, 1), torch.zeros(4000, dtype=torch.long), 3)
    u = keys.double() / 2.0**63
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert bool((counts > 300).all()) and bool((counts < 500).all())
    pri = class_priority(torch.arange(1000), seed=0)
    assert len(set(pri.tolist())) == 1000 and bool((pri >= 0).all())
    assert not torch.equal(pri, class_priority(torch.arange(1000), seed=1))


# --------------------------------------------------------------------------------- PerClassSampler


def _dataset(n: int, n_classes: int, dim: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, y


def _brute_force(x, y, keys, k):
    rows = []
    for c in sorted(set(y.tolist())):
        idx = (y == c).nonzero().flatten()
        rows.extend(idx[torch.argsort(keys[idx])][:k].tolist())
    return torch.tensor(rows)


@pytest.mark.parametrize("read_every_step", [True, False])
def test_sampler_bounded_and_correct(read_every_step: bool) -> None:
    x, y = _dataset(200 * 16, 5)
    keys = sample_keys(x, y, seed=1)
    sampler = PerClassSampler(samples_per_class=7, seed=1)
    sampler.compact_min_rows = 64  # exercise the pending buffer / merge path
    for i in range(200):
        s = slice(16 * i, 16 * (i + 1))
        sampler.update(x[s], y[s], keys[s])
        # memory: store (<= k per class) plus a pending buffer bounded by max(store, 64) + one batch
        assert sampler._y.numel() <= 35 and sampler._pend_rows <= 64 + 16
        if read_every_step:
            assert all(v <= 7 for v in sampler.num_stored_per_class.values())
    assert sampler.num_stored == 35
    feats, labels, got_keys = sampler.state()
    rows = _brute_force(x, y, keys, 7)
    assert torch.equal(feats, x[rows]) and torch.equal(labels, y[rows]) and torch.equal(got_keys, keys[rows])
    assert sampler.n_seen == {c: int((y == c).sum()) for c in range(5)}
    sampler.reset()
    assert sampler.num_stored == 0 and sampler.state()[0].shape == (0, 0)


def test_sampler_order_invariant_and_small_classes() -> None:
    x, y = _dataset(300, 8)
    y[:2] = 9  # a class with fewer than k samples
    keys = sample_keys(x, y, 0)
    a, b = PerClassSampler(10, seed=0), PerClassSampler(10, seed=0)
    a.update(x, y, keys)
    perm = torch.randperm(300)
    for chunk in perm.split(37):
        b.update(x[chunk], y[chunk], keys[chunk])
    for ta, tb in zip(a.state(), b.state(), strict=True):
        assert torch.equal(ta, tb)
    assert a.num_stored_per_class[9] == 2


def _fake_gather(shards):
    """A gather_fn for 'rank' r that returns both ranks' tensors for the i-th collective call."""

    def make(rank: int):
        calls = []

        def gather(t: torch.Tensor) -> list[torch.Tensor]:
            calls.append(t)
            i = len(calls) - 1
            shards[rank].append(t)
            return [shards[r][i] for r in range(len(shards))]

        return gather

    return make


def test_sampler_sync_equals_single_process() -> None:
    x, y = _dataset(400, 6, dim=5)
    keys = sample_keys(x, y, 3)
    full = PerClassSampler(8, max_classes=4, seed=3)
    full.update(x, y, keys)
    # rank 1 sees only some classes; both ranks update in small batches
    idx1 = (y >= 3).nonzero().flatten()[::2]
    mask = torch.ones(400, dtype=torch.bool)
    mask[idx1] = False
    idx0 = mask.nonzero().flatten()
    ranks = [PerClassSampler(8, max_classes=4, seed=3) for _ in range(2)]
    for r, idx in enumerate((idx0, idx1)):
        for chunk in idx.split(23):
            ranks[r].update(x[chunk], y[chunk], keys[chunk])
    # simulate the collective: run rank 0's gathers after rank 1 has "posted" its tensors
    posted: list[list[torch.Tensor]] = [[], []]
    rec = PerClassSampler(8, max_classes=4, seed=3)  # record rank 1's contributions
    rec.__dict__.update(copy.deepcopy(ranks[1].__dict__))
    rec.sync(lambda t: (posted[1].append(t), [t])[1])
    gather0 = _fake_gather(posted)(0)
    ranks[0].sync(gather0)
    for ta, tb in zip(ranks[0].state(), full.state(), strict=True):
        assert torch.equal(ta, tb)
    assert ranks[0].n_seen == full.n_seen
    assert ranks[0].is_synced
    ranks[0].sync(gather0)  # second call: no-op
    assert torch.equal(ranks[0].state()[0], full.state()[0])
    with pytest.raises(RuntimeError, match="reset"):
        ranks[0].update(x[:2], y[:2], keys[:2])


def test_sampler_sync_with_empty_rank() -> None:
    x, y = _dataset(50, 3, dim=6)
    keys = sample_keys(x, y, 0)
    full = PerClassSampler(4, seed=0)
    full.update(x, y, keys)
    empty = PerClassSampler(4, seed=0)
    posted: list[list[torch.Tensor]] = [[], []]
    full_copy = PerClassSampler(4, seed=0)
    full_copy.update(x, y, keys)
    full_copy.sync(lambda t: (posted[0].append(t), [t])[1])
    empty.sync(_fake_gather(posted)(1))
    assert torch.equal(empty.state()[0], full.state()[0])
    assert empty.state()[0].shape == (12, 6) and empty.n_seen == full.n_seen
    # nobody has anything
    lonely = PerClassSampler(4, seed=0)
    lonely.sync(lambda t: [t, t.clone()])
    assert lonely.num_stored == 0 and lonely.is_synced


def test_sampler_max_classes_fixed_subset() -> None:
    x, y = _dataset(600, 20)
    keys = sample_keys(x, y, 5)
    s1 = PerClassSampler(3, max_classes=5, seed=5)
    s1.update(x, y, keys)
    s2 = PerClassSampler(3, max_classes=5, seed=5)
    for chunk in torch.randperm(600).split(11):
        s2.update(x[chunk], y[chunk], keys[chunk])
    assert s1.classes == s2.classes and len(s1.classes) == 5
    pri = class_priority(torch.arange(20), 5)
    assert s1.classes == sorted(torch.argsort(pri)[:5].tolist())
    assert len(s1.n_seen) == 20  # counts cover every class seen
    s3 = PerClassSampler(3, max_classes=5, seed=6)
    s3.update(x, y, sample_keys(x, y, 6))
    assert s3.classes != s1.classes
    assert s1.num_stored == 15


def test_sampler_inclusion_roughly_uniform() -> None:
    n, k, trials = 20, 5, 400
    content = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    y = torch.zeros(n, dtype=torch.long)
    hits = torch.zeros(n)
    for seed in range(trials):
        s = PerClassSampler(k, seed=seed)
        s.update(content, y, sample_keys(content, y, seed))
        feats = s.state()[0]
        hits[(feats[:, 0] / 3).long()] += 1
    expected = trials * k / n  # 100, sd ~ 8.7
    assert bool(((hits - expected).abs() < 45).all()), hits


def test_sampler_validation_and_state_dict() -> None:
    with pytest.raises(ValueError):
        PerClassSampler(1)
    with pytest.raises(TypeError):
        PerClassSampler(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PerClassSampler(5, max_classes=1)
    with pytest.raises(TypeError):
        PerClassSampler(5, seed="a")  # type: ignore[arg-type]
    s = PerClassSampler(5, max_classes=3, seed=9)
    x, y = _dataset(10, 2)
    s.update(x, y, sample_keys(x, y, 9))
    with pytest.raises(ValueError, match="columns"):
        s.update(torch.randn(2, 7), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        s.update(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.int32))
    t = PerClassSampler(2)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == {"samples_per_class": 5, "max_classes": 3, "seed": 9}
    with pytest.raises(KeyError):
        t.load_state_dict({"seed": 1})


def test_sampler_drops_exact_duplicates_within_and_across_batches():
    """DistributedSampler pads shards with repeated samples; a repeat must not take a second slot."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g)
    y = torch.zeros(6, dtype=torch.int64)
    keys = sample_keys(x, y, seed=0)
    once = PerClassSampler(samples_per_class=4, seed=0)
    once.update(x, y, keys)
    twice = PerClassSampler(samples_per_class=4, seed=0)
    dup = torch.cat([x[:2], x[:2], x])  # duplicates inside one batch ...
    twice.update(
        dup, torch.zeros(10, dtype=torch.int64), sample_keys(dup, torch.zeros(10, dtype=torch.int64), 0)
    )
    twice.update(x, y, keys)  # ... and across batches
    f1, y1, k1 = once.state()
    f2, y2, k2 = twice.state()
    assert f2.shape[0] == 4 and len(set(k2.tolist())) == 4
    assert torch.equal(k1, k2) and torch.equal(f1, f2)
