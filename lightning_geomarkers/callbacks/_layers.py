"""Which layer to watch, and how to turn its activations into a (batch, features) matrix.

* :func:`find_classifier_head` guesses the classifier (the model's final ``nn.Linear``); its *input* is the
  penultimate representation that the monitor watches by default.
* :func:`resolve_layers` turns the user's ``layers=`` argument into concrete modules.
* :func:`pool_features` reduces conv maps / token sequences to one vector per sample.
* :class:`FeatureHook` captures those vectors during the forward pass, detached from the autograd graph.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_geomarkers.errors import MonitorWarning

__all__ = [
    "Where",
    "Pooling",
    "find_classifier_head",
    "head_candidates",
    "resolve_layers",
    "metric_name",
    "check_pooling",
    "pool_features",
    "FeatureHook",
    "builds_layers_later",
]

Where = Literal["input", "output"]
Pooling = str | Callable[[Any], torch.Tensor]

#: Blocks whose internal ``nn.Linear`` layers (q/k/v/out projections, feed-forward) are never the classifier.
_ATTENTION_BLOCKS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)

#: Modules whose 3-D activations are channel-first ``(B, C, L)`` rather than token sequences ``(B, L, D)``.
_CHANNEL_FIRST_1D: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
)

_POOLINGS = ("auto", "mean", "cls", "max")
_MAX_LISTED_LEAVES = 20
_MAX_LISTED_NAMES = 30


# --------------------------------------------------------------------------------------------- head


def _is_under(name: str, prefix: str) -> bool:
    """True if module ``name`` is a strict descendant of module ``prefix`` ("" is the root)."""
    if prefix == "":
        return name != ""
    return name.startswith(prefix + ".")


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


#: Names of attention projections (timm ``qkv``, lucidrains ``to_qkv``, HF ``query``/``key``/``value``, ...).
_PROJECTION_NAMES = frozenset(
    {"qkv", "to_qkv", "kv", "to_kv", "q", "k", "v", "to_q", "to_k", "to_v", "query", "key", "value"}
)


def _in_attention(name: str) -> bool:
    """True for a module inside a hand-written attention block (timm ``blocks.0.attn.qkv``, HF
    ``encoder.layer.0.attention.self.query``): an *enclosing* module's name part contains "attn" or
    "attention" (case-insensitive), or the module's own name is an attention projection (``qkv``,
    ``to_qkv``, ``query``, ...). A Linear itself named e.g. ``attn_head`` is not excluded."""
    parts = name.lower().split(".")
    return parts[-1] in _PROJECTION_NAMES or any("attn" in p or "attention" in p for p in parts[:-1])


def _linear_candidates(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` in registration order, minus those inside attention/transformer blocks
    (``nn.MultiheadAttention``, ``nn.Transformer*`` and, by name, hand-written ones: see
    :func:`_in_attention`)."""
    blocked: list[str] = []
    out: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if any(_is_under(name, p) for p in blocked):
            continue
        if isinstance(module, _ATTENTION_BLOCKS):
            blocked.append(name)
            continue
        if isinstance(module, nn.Linear) and not _in_attention(name):
            out.append((name, module))
    return out


def _leaf_names(model: nn.Module, limit: int = _MAX_LISTED_LEAVES) -> str:
    leaves = [n for n, m in model.named_modules() if n and next(iter(m.children()), None) is None]
    if not leaves:
        return "(none: the model has no submodules)"
    shown = ", ".join(repr(n) for n in leaves[:limit])
    return shown + (f", ... ({len(leaves) - limit} more)" if len(leaves) > limit else "")


def _describe_linear(name: str, lin: nn.Linear) -> str:
    return f"{name!r} (Linear {lin.in_features} -> {lin.out_features})"


#: Modules that may follow a classifier head in its nn.Sequential (they turn logits into outputs).
_OUTPUT_LAYERS: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Dropout)


def _output_layers_follow(model: nn.Module, name: str) -> bool:
    """Whether the modules after ``name`` in its ``nn.Sequential`` parent are all output layers
    (softmax, identity, dropout): then it is still the head. Any other follower means it feeds layers."""
    parent = model.get_submodule(_parent_name(name)) if name else None
    if not isinstance(parent, nn.Sequential):
        return True
    keys = list(parent._modules)
    after = keys[keys.index(name.rpartition(".")[2]) + 1 :]
    return all(isinstance(parent._modules[k], _OUTPUT_LAYERS) for k in after)


def head_candidates(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers that look like the *end* of a network branch (possible classifier heads).

    A candidate Linear (see :func:`find_classifier_head`) is a possible head unless something shows it
    feeds further layers: it is followed by another module inside its ``nn.Sequential`` parent, or a
    later-registered candidate takes ``in_features`` equal to its ``out_features`` (a chain
    ``fc1 -> fc2``). A multi-task model (a main head and an auxiliary ``nn.Sequential(..., nn.Linear)``)
    has several.
    """
    candidates = _linear_candidates(model)
    out = []
    for i, (name, lin) in enumerate(candidates):
        parent = model.get_submodule(_parent_name(name)) if name else None
        if isinstance(parent, nn.Sequential) and name.rpartition(".")[2] != list(parent._modules)[-1]:
            continue
        if any(later.in_features == lin.out_features for _, later in candidates[i + 1 :]):
            continue
        out.append((name, lin))
    return out


def find_classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Return ``(name, module)`` of the model's classifier head: its final ``nn.Linear``.

    Rule: the candidates are the ``nn.Linear`` modules of ``model.named_modules()`` (registration order),
    excluding any Linear nested inside ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerDecoderLayer`` / ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` /
    ``nn.Transformer`` (projection and feed-forward layers, never the classifier), and the Linear layers
    of hand-written attention blocks, recognised by name: inside a module whose name contains "attn" or
    "attention" (timm's ``blocks.0.attn.qkv`` and ``attn.proj``, Hugging Face's ``attention.self.query``),
    or themselves named ``qkv``, ``to_qkv``, ``kv``, ``q``/``k``/``v``, ``to_q``/``to_k``/``to_v`` or
    ``query``/``key``/``value``. A ``qkv = Linear(d, 3d)`` feeds no later Linear of width ``3d``, so it
    would otherwise look like a branch end. The head is the *last*
    candidate. Registration order is used because execution order is unknown without running the model;
    a model that registers its head before its backbone needs an explicit ``layers=``.

    Ambiguity: let ``G`` be the trailing run of candidates (two or more) that are direct children of the
    same parent module and share the last candidate's ``in_features``. If the parent is not an
    ``nn.Sequential`` and the last candidate's ``in_features`` differs from the previous candidate's
    ``out_features`` (so they look like parallel heads, not a chain), the head is ambiguous and a
    ``ValueError`` naming the candidates is raised.

    Refused too: a last candidate that feeds further layers (followed in its ``nn.Sequential`` by
    anything but softmax, identity or dropout, e.g. a squeeze-excitation gate before a sigmoid, in a model
    whose classifier is a convolution).

    Raises:
        ValueError: no candidate ``nn.Linear`` exists (the message lists the model's leaf modules), the last
            one feeds further layers (above), or the head is ambiguous: parallel heads as above, or several branch ends (:func:`head_candidates`,
            e.g. a main and an auxiliary head of a multi-task model). Pass ``layers="<module name>"`` to
            the monitor in all cases.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    candidates = _linear_candidates(model)
    if not candidates:
        raise ValueError(
            f"No nn.Linear classifier head was found in {type(model).__name__} (Linear layers inside "
            f"attention/transformer blocks are ignored). Leaf modules: {_leaf_names(model)}. "
            'Pass layers="<module name>" to choose the layer to monitor explicitly.'
        )
    last_name, last = candidates[-1]
    group = [(last_name, last)]
    for name, lin in reversed(candidates[:-1]):
        if _parent_name(name) != _parent_name(last_name) or lin.in_features != last.in_features:
            break
        group.insert(0, (name, lin))
    if len(group) >= 2:
        parent = model.get_submodule(_parent_name(last_name))
        prev = group[-2][1]
        if not isinstance(parent, nn.Sequential) and last.in_features != prev.out_features:
            names = ", ".join(_describe_linear(n, m) for n, m in group)
            raise ValueError(
                f"Ambiguous classifier head: {names} look like parallel heads on the same features. "
                f'Pass layers="<module name>:input" (e.g. layers="{last_name}:input" for the penultimate '
                'features) or layers="<module name>" to choose explicitly.'
            )
    ends = head_candidates(model)
    if all(name != last_name for name, _ in ends) and not _output_layers_follow(model, last_name):
        hint = f" The branch end found is {_describe_linear(*ends[0])}." if ends else ""
        raise ValueError(
            f"The last nn.Linear, {_describe_linear(last_name, last)}, feeds further layers (modules after it "
            "in its nn.Sequential), so it is not a classifier head: e.g. a squeeze-excitation gate, in a "
            f"model whose classifier may be a convolution.{hint} Pass the classifier's input explicitly, "
            'e.g. layers="<classifier module>:input", or, for a head that is not a module (logits computed '
            "from a parameter in forward, e.g. a cosine classifier), the backbone's output: "
            'layers="<backbone module>".'
        )
    if len(ends) >= 2:
        names = ", ".join(_describe_linear(n, m) for n, m in ends)
        raise ValueError(
            f"Several possible classifier heads: {names} (a multi-task model?). The monitor will not guess "
            "which one your labels belong to. Pass the classifier's input explicitly, e.g. "
            f'layers="{ends[0][0]}:input".'
        )
    return last_name, last


# ------------------------------------------------------------------------------------------ layers


def _sequence_first(module: nn.Module) -> bool:
    """Whether ``module`` takes and returns ``(L, B, D)`` sequences: torch's recurrent, attention and
    transformer modules with ``batch_first=False`` (their default)."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return _sequence_first(module.layers[0])
    return False


def builds_layers_later(model: nn.Module) -> bool:
    """Whether ``model`` is a LightningModule that may build layers after the callbacks' ``setup``: it
    overrides ``configure_model()`` or ``setup()``, which Lightning calls after them."""
    import lightning.pytorch as L
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return isinstance(model, L.LightningModule) and any(
        is_overridden(hook, model, L.LightningModule) for hook in ("configure_model", "setup")
    )


def metric_name(display_name: str) -> str:
    """A layer's display name as used inside logged keys: ``":"`` becomes ``"_"`` (``"fc:input"`` ->
    ``"fc_input"``), since MLflow and other loggers rename keys containing ``":"``."""
    return display_name.replace(":", "_")


def _uncompiled(model: nn.Module, name: str, module: nn.Module) -> tuple[str, nn.Module]:
    """For a module inside a ``torch.compile`` wrapper (``<name>._orig_mod``), the wrapper and its name.

    Hooks on the original module run inside the compiled region: Dynamo traces them, guards on their
    Python state, and recompiles when it changes (every batch). Hooks on the wrapper run eagerly around
    the compiled call and see the same input and output.
    """
    parts = name.split(".")
    if parts[-1] != "_orig_mod":
        return name, module  # not a compiled module, or a submodule inside one: no eager place to hook
    outer = ".".join(parts[:-1])
    return outer, model.get_submodule(outer) if outer else model


def _display_name(name: str, where: str) -> str:
    base = name if name else "root"
    return f"{base}:input" if where == "input" else base


def _unknown_name_error(model: nn.Module, name: str) -> ValueError:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(repr(n) for n in names[:_MAX_LISTED_NAMES])
    if len(names) > _MAX_LISTED_NAMES:
        listed += f", ... ({len(names) - _MAX_LISTED_NAMES} more)"
    return ValueError(
        f"{type(model).__name__} has no submodule named {name!r}.{hint} Available modules: "
        f"{listed or '(none)'}. Names are dotted paths as in model.named_modules(); append ':input' to "
        "watch a module's input instead of its output."
    )


def _split_where(spec: str) -> tuple[str, str]:
    for suffix in (":input", ":output"):
        if spec.endswith(suffix):
            return spec[: -len(suffix)], suffix[1:]
    return spec, "output"


def _lookup(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise _unknown_name_error(model, name) from None


def resolve_layers(
    model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module] | None = None
) -> dict[str, tuple[nn.Module, Where]]:
    """Map display names to ``(module, where)`` with ``where`` in ``{"input", "output"}``.

    * ``None``: ``{head_name: (head, "input")}``, the input of :func:`find_classifier_head`'s layer, i.e.
      the penultimate features.
    * ``"name"`` (dotted path, as in ``named_modules``): that module's output, display name ``"name"``.
    * ``"name:input"`` / ``"name:output"``: explicit side; display names ``"name:input"`` / ``"name"``.
    * an ``nn.Module`` instance that is part of ``model``: its output, found by identity.
    * a list/tuple mixing the above. Duplicates (same display name) are kept once.

    The root module can be named ``""`` (display name ``"root"``). A module compiled in place
    (``self.fc = torch.compile(nn.Linear(...))``) is hooked on its compile wrapper, so hooks run outside
    the compiled region (no recompilation); its display name drops the ``"._orig_mod"`` part.
    """
    if layers is None:
        name, head = find_classifier_head(model)
        name, wrapped = _uncompiled(model, name, head)
        return {name: (wrapped, "input")}
    specs = [layers] if isinstance(layers, (str, nn.Module)) else layers
    if not isinstance(specs, (list, tuple)):
        raise TypeError(
            "`layers` must be None, a module name, an nn.Module, or a list of those; got "
            f"{type(layers).__name__}."
        )
    if len(specs) == 0:
        raise ValueError("`layers` is empty; pass None to watch the classifier head's input.")
    names_by_id: dict[int, str] = {}
    for n, m in model.named_modules():
        names_by_id.setdefault(id(m), n)
    out: dict[str, tuple[nn.Module, Where]] = {}
    for spec in specs:
        if isinstance(spec, nn.Module):
            found = names_by_id.get(id(spec))
            if found is None:
                raise ValueError(
                    f"The {type(spec).__name__} module passed in `layers` is not a submodule of "
                    f"{type(model).__name__}. Pass a module of the LightningModule (or its name)."
                )
            name, where, module = found, "output", spec
        elif isinstance(spec, str):
            name, where = _split_where(spec)
            module = _lookup(model, name)
        else:
            raise TypeError(f"Entries of `layers` must be str or nn.Module, got {type(spec).__name__}.")
        name, module = _uncompiled(model, name, module)
        out.setdefault(_display_name(name, where), (module, where))  # type: ignore[arg-type]
    return out


# ----------------------------------------------------------------------------------------- pooling


def check_pooling(pooling: Any) -> Pooling:
    """Validate a ``pooling`` argument: one of ``"auto"``, ``"mean"``, ``"cls"``, ``"max"`` or a callable."""
    if callable(pooling):
        return pooling
    if isinstance(pooling, str) and pooling in _POOLINGS:
        return pooling
    raise ValueError(f"`pooling` must be one of {_POOLINGS} or a callable, got {pooling!r}.")


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping):
        items = list(x.values())
    elif isinstance(x, (tuple, list)):
        items = list(x)
    else:
        raise TypeError(
            f"Cannot extract features from a {type(x).__name__}; the layer must produce a tensor (or a "
            "tuple/list/dict whose first tensor is the features). Pass pooling=<callable> to extract them."
        )
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(
        f"The layer produced a {type(x).__name__} without any tensor in it; pass pooling=<callable> that "
        "returns a (batch, features) tensor."
    )


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _reduce(t: torch.Tensor, dims: tuple[int, ...], how: str) -> torch.Tensor:
    if how == "max":
        return _float(t.amax(dim=dims))
    if t.dtype in (torch.float32, torch.float64):
        return t.mean(dim=dims)
    if t.is_floating_point():  # half / bfloat16: accumulate in float32
        return t.mean(dim=dims, dtype=torch.float32)
    return t.float().mean(dim=dims)


def pool_features(
    x: Any,
    pooling: Pooling = "auto",
    *,
    channels_first: bool = False,
    sequence_first: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """Reduce a layer's activation to a detached floating ``(B, N)`` matrix.

    ``x`` is a tensor, or a tuple/list/dict (the first tensor in it is used, as for modules returning
    ``(output, extras)``).

    * 2-D ``(B, N)``: unchanged.
    * 3-D: a batch-first token sequence ``(B, L, D)``: ``"auto"``/``"mean"`` average the tokens, ``"cls"``
      takes token 0, ``"max"`` takes the max over tokens (padding tokens included: watch a pooled layer or
      pass a callable where batches are padded). With ``channels_first=True`` it is ``(B, C, L)``
      (Conv1d-style) and ``"auto"``/``"mean"``/``"max"`` reduce the last dim instead; with
      ``sequence_first=True`` it is ``(L, B, D)`` (recurrent and attention modules with
      ``batch_first=False``) and is transposed first.
    * 4-D and more (``(B, C, H, W, ...)``): ``"auto"``/``"mean"`` average, ``"max"`` max, over every dim
      after 1; with ``channels_last=True`` (``(B, H, W, ..., C)``, the activations of ``nn.Linear`` and
      ``nn.LayerNorm``, which act on the last dim) over every dim but the first and the last.
    * a callable ``pooling`` receives the raw ``x`` (not the extracted tensor) and must return ``(B, N)``.

    The result is detached and float32 (float64 stays float64).
    """
    pooling = check_pooling(pooling)
    with torch.no_grad():
        if callable(pooling):
            t = pooling(x)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"The pooling callable must return a tensor, got {type(t).__name__}.")
            t = t.detach()
        else:
            t = _first_tensor(x).detach()
            if t.ndim == 3 and sequence_first:
                t = t.transpose(0, 1)
            if t.ndim == 3:
                if pooling == "cls":
                    if channels_first:
                        raise ValueError(
                            "pooling='cls' needs a token sequence (B, L, D), but this layer's 3-D output is "
                            "channel-first (B, C, L); use 'mean', 'max' or a callable."
                        )
                    t = t[:, 0]
                else:
                    t = _reduce(t, (2,) if channels_first else (1,), "max" if pooling == "max" else "mean")
            elif t.ndim >= 4:
                if pooling == "cls":
                    raise ValueError(
                        f"pooling='cls' applies to token sequences (B, L, D), got a {t.ndim}-D activation "
                        f"{tuple(t.shape)}; use 'mean', 'max' or a callable."
                    )
                dims = tuple(range(1, t.ndim - 1)) if channels_last else tuple(range(2, t.ndim))
                t = _reduce(t, dims, "max" if pooling == "max" else "mean")
        if t.ndim != 2:
            raise ValueError(
                f"Captured features must be 2-D (batch, features) after pooling, got shape {tuple(t.shape)}. "
                "Watch a different layer or pass pooling=<callable> returning a (batch, features) tensor."
            )
        if t.is_complex():
            raise TypeError("Captured features are complex; geometry markers need real-valued features.")
        return _float(t)


# -------------------------------------------------------------------------------------------- hook


class FeatureHook:
    """One forward hook (pre-hook for ``where="input"``) that captures pooled, detached features.

    While :attr:`enabled` is True every forward call of ``module`` appends its pooled features (see
    :func:`pool_features`) to a buffer; :meth:`pop` returns what was captured since the last pop
    (concatenated along the batch dim if the module ran several times) and clears it. A disabled hook
    returns immediately. The hook functions are bound methods, so the hook and a model carrying it can be
    pickled / deep-copied (the copy gets an empty buffer; a lambda ``pooling`` is not picklable, though).

    Memory is bounded by :attr:`max_rows` when it is set (the number of samples in the batch): rows
    beyond it (a module called in a loop, e.g. a recurrent cell) are counted in :attr:`step_rows` but not
    kept, and the buffer is dropped, since such a step cannot give one feature row per sample anyway.

    A pooling failure inside the forward pass does not crash training: it is stored in :attr:`error`,
    reported once as a :class:`MonitorWarning`, and the call is skipped (``strict=True`` re-raises instead).

    Args:
        module: the module to hook.
        where: ``"output"`` (the module's output) or ``"input"`` (its first positional input, or its first
            tensor keyword argument if called with keywords only).
        pooling: see :func:`pool_features`. Channel-first 1-D modules (``Conv1d``, ``BatchNorm1d``, ...)
            reduce their last dim for 3-D activations.
        name: display name used in messages.
        enabled: initial state; hooks are usually registered disabled and enabled for validation only.
        strict: re-raise pooling errors instead of warning.
    """

    def __init__(
        self,
        module: nn.Module,
        where: Where = "output",
        pooling: Pooling = "auto",
        *,
        name: str | None = None,
        enabled: bool = False,
        strict: bool = False,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be an nn.Module, got {type(module).__name__}.")
        if where not in ("input", "output"):
            raise ValueError(f"`where` must be 'input' or 'output', got {where!r}.")
        self.pooling = check_pooling(pooling)
        self.where: Where = where
        self.name = name if name is not None else type(module).__name__
        self.channels_first = isinstance(module, _CHANNEL_FIRST_1D)
        self.sequence_first = _sequence_first(module)
        self.channels_last = isinstance(module, (nn.Linear, nn.LayerNorm))
        self.enabled = bool(enabled)
        self.strict = bool(strict)
        self.calls = 0
        self.error: BaseException | None = None
        self._warned = False
        self._buffer: list[torch.Tensor] = []
        #: Rows the buffer may hold (None: no bound); rows captured since the last pop, kept or not.
        self.max_rows: int | None = None
        self.step_rows = 0
        if where == "input":
            self._handle: Any = module.register_forward_pre_hook(self._forward_pre_hook, with_kwargs=True)
        else:
            self._handle = module.register_forward_hook(self._forward_hook)

    # -- hook functions (bound methods: picklable) --
    def _forward_pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.enabled:
            return None
        if args:
            raw = args[0]
        else:
            raw = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        self._capture(raw)
        return None

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self.enabled:
            return None
        self._capture(output)
        return None

    def _capture(self, raw: Any) -> None:
        try:
            if raw is None:
                raise TypeError(f"layer {self.name!r} was called without a tensor input")
            feats = pool_features(
                raw,
                self.pooling,
                channels_first=self.channels_first,
                sequence_first=self.sequence_first,
                channels_last=self.channels_last,
            )
        except Exception as err:
            if self.strict:
                raise
            self._fail(err)
            return
        self.calls += 1
        self.step_rows += int(feats.shape[0]) if feats.ndim else 1
        if self.max_rows is not None and self.step_rows > self.max_rows:
            self._buffer = []  # more rows than samples: the step is unusable, and must not grow memory
            return
        self._buffer.append(feats)

    def _fail(self, err: BaseException) -> None:
        self.error = err
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"Feature capture for layer {self.name!r} failed and is skipped: {err}",
                MonitorWarning,
                stacklevel=3,
            )

    # -- public API --
    @property
    def removed(self) -> bool:
        return self._handle is None

    @property
    def pending(self) -> int:
        """Number of captured calls waiting in the buffer."""
        return len(self._buffer)

    def pop(self) -> torch.Tensor | None:
        """Features captured since the last pop, ``(B_total, N)``, or None if nothing was kept (read
        :attr:`step_rows` before: rows beyond :attr:`max_rows` are counted there, not kept)."""
        self.step_rows = 0
        if not self._buffer:
            return None
        buf, self._buffer = self._buffer, []
        if len(buf) == 1:
            return buf[0]
        try:
            return torch.cat(buf, dim=0)
        except RuntimeError as err:
            shapes = [tuple(b.shape) for b in buf]
            self._fail(RuntimeError(f"captures of one step have incompatible shapes {shapes} ({err})"))
            return None

    def drop(self) -> None:
        """Drop buffered features (those of a batch that was skipped), keeping :attr:`calls`."""
        self._buffer = []
        self.step_rows = 0

    def clear(self) -> None:
        """Drop buffered features and reset :attr:`calls` and :attr:`error` (a new epoch's capture)."""
        self._buffer = []
        self.step_rows = 0
        self.calls = 0
        self.error = None

    def remove(self) -> None:
        """Remove the hook from the module (idempotent) and drop buffered features."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.enabled = False
        self._buffer = []

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_buffer"] = []  # captured activations are transient; never ship them with a model copy
        state["error"] = None
        return state

    def __repr__(self) -> str:
        status = "removed" if self.removed else ("enabled" if self.enabled else "disabled")
        return f"FeatureHook(name={self.name!r}, where={self.where!r}, {status}, calls={self.calls})"
