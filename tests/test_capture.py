"""Capture layer of the monitor: head discovery, layer resolution, pooling, hooks, labels."""

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
    head_candidates,
    metric_name,
    pool_features,
    resolve_layers,
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


def test_head_branch_ends_multi_task_is_ambiguous() -> None:
    class MultiTask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
            self.fc = nn.Linear(32, 8)
            self.aux = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))

    model = MultiTask()
    assert [n for n, _ in head_candidates(model)] == ["fc", "aux.2"]
    with pytest.raises(ValueError, match=r"Several possible classifier heads: 'fc' .*'aux.2'") as info:
        find_classifier_head(model)
    assert 'layers="fc:input"' in str(info.value)
    # chains and trunks ending in an activation are not branch ends: one candidate each
    for single, expected in (
        (AttrMLP(), "head"),
        (ChainSameWidth(), "fc2"),
        (SmallCNN(), "classifier"),
        (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), "2"),
    ):
        assert [n for n, _ in head_candidates(single)] == [expected]


def test_metric_name_replaces_colons() -> None:
    assert metric_name("fc:input") == "fc_input" and metric_name("body.3") == "body.3"


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


def test_a_failed_capture_is_forgotten_at_the_next_clear_and_drop_keeps_the_call_count() -> None:
    """The monitor clears its hooks at every epoch start: an earlier epoch's capture error must not be
    quoted as the reason a later epoch captured nothing. drop() (a skipped batch) keeps the calls."""
    lin = nn.Linear(3, 2)
    hook = FeatureHook(lin, "output", pooling=lambda t: t[:, :, None], enabled=True)  # 3-D: pooling fails
    with pytest.warns(MonitorWarning, match="failed and is skipped"):
        lin(torch.randn(4, 3))
    assert hook.error is not None and hook.pop() is None
    hook.clear()
    assert hook.error is None and hook.calls == 0
    hook.pooling = "auto"
    lin(torch.randn(4, 3))
    hook.drop()
    assert hook.calls == 1 and hook.pop() is None and hook.error is None


def test_a_bounded_hook_counts_rows_beyond_its_bound_without_keeping_them() -> None:
    """A module called in a loop (a recurrent cell) buffered every call's rows for the whole step: +806 MB
    at 400 calls of a (512, 512) batch, only for the batch to be rejected. With ``max_rows`` set (the
    batch's samples) the buffer never exceeds it, and the row count still reaches the caller."""
    lin = nn.Linear(3, 2)
    hook = FeatureHook(lin, "output", enabled=True)
    hook.max_rows = 8
    lin(torch.randn(3, 3))
    lin(torch.randn(5, 3))  # 8 rows: within the bound (a batch split in two), kept
    assert hook.step_rows == 8 and hook.pop().shape == (8, 2)  # type: ignore[union-attr]
    assert hook.step_rows == 0
    held = []
    for _ in range(50):
        lin(torch.randn(4, 3))
        held.append(sum(b.shape[0] for b in hook._buffer))
    assert max(held) <= 8 and hook.step_rows == 200 and hook.calls == 52
    assert hook.pop() is None and hook.step_rows == 0
    hook.max_rows = None  # no bound: everything is kept, as before
    for _ in range(3):
        lin(torch.randn(4, 3))
    assert hook.pop().shape == (12, 2)  # type: ignore[union-attr]


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


def test_sequence_first_and_channels_last_activations_are_pooled_per_sample() -> None:
    """torch's recurrent and attention modules default to (L, B, D): their output was pooled over the
    batch ('mean') or took every token of sample 0 ('cls'), silently when L == B. A channels-last
    (B, H, W, C) activation of nn.LayerNorm / nn.Linear was averaged over W and C."""
    torch.manual_seed(0)
    seq = torch.randn(8, 8, 6)  # L = B = 8: the row count cannot reveal the mix-up
    lstm = nn.LSTM(6, 5)  # batch_first=False
    hook = FeatureHook(lstm, "output", enabled=True)
    out, _ = lstm(seq)
    assert torch.allclose(hook.pop(), out.mean(0))  # per sample (dim 1), over time (dim 0)
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0)
    cls = FeatureHook(layer, "output", pooling="cls", enabled=True)
    with torch.no_grad():
        tokens = layer(seq)
    assert torch.allclose(cls.pop(), tokens[0])  # token 0 of every sample, not sample 0's tokens
    norm = nn.LayerNorm(32)
    nhwc = torch.randn(4, 7, 7, 32)
    last = FeatureHook(norm, "output", enabled=True)
    with torch.no_grad():
        normed = norm(nhwc)
    assert torch.allclose(last.pop(), normed.mean((1, 2)))  # over H and W, per channel
    conv = nn.Conv2d(3, 4, 3)  # channel-first maps are unchanged: mean over H and W
    first = FeatureHook(conv, "output", enabled=True)
    with torch.no_grad():
        maps = conv(torch.randn(2, 3, 9, 9))
    assert torch.allclose(first.pop(), maps.mean((2, 3)))


def test_named_tuple_batches_are_read_by_field_name() -> None:
    """A named tuple (input_ids, lengths, label) gave its lengths as labels (position 1)."""
    from collections import namedtuple

    Batch = namedtuple("Batch", ["input_ids", "lengths", "label"])
    batch = Batch(torch.arange(8).reshape(4, 2), torch.tensor([10, 7, 3, 9]), torch.tensor([0, 1, 0, 1]))
    assert extract_labels(batch).tolist() == [0, 1, 0, 1]
    assert torch.equal(batch_inputs(batch), batch.input_ids)
    Plain = namedtuple("Plain", ["a", "b"])  # no known field names: positions, as for a plain tuple
    plain = Plain(torch.zeros(2, 3), torch.tensor([1, 0]))
    assert extract_labels(plain).tolist() == [1, 0] and torch.equal(batch_inputs(plain), plain.a)


def test_a_last_linear_that_feeds_further_layers_is_not_taken_for_the_head() -> None:
    """With a convolutional classifier, the last nn.Linear can be a squeeze-excitation gate (followed by
    a sigmoid): it was returned as the head, and labels 0..9 passed its 64-output range check."""

    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 64, 3)
            self.gate = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 64), nn.Sigmoid())
            self.classifier = nn.Conv2d(64, 10, 1)

    with pytest.raises(ValueError, match=r"'gate.2' \(Linear 16 -> 64\), feeds further layers"):
        find_classifier_head(SE())
    for tail in (nn.Softmax(dim=1), nn.Dropout(0.1), nn.LogSoftmax(dim=1)):  # output layers: still the head
        head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10), tail)
        assert find_classifier_head(head)[0] == "2"
