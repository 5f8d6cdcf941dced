"""``lightning-geomarkers rank``: score checkpoints with a monitor's exact settings and rank them.

The command line and :func:`rank_checkpoints` (the same for code) load each checkpoint with the
LightningModule's ``load_from_checkpoint``, measure it with
:meth:`GeometryMonitor.evaluate <lightning_geomarkers.GeometryMonitor.evaluate>` on one validation loader,
and write ``markers.csv``, ``ranking.md`` and ``markers.png`` (see :mod:`lightning_geomarkers.cli.selection`
for the rules).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as L
import torch
import yaml  # type: ignore[import-untyped]
from torch.utils.data import DataLoader

from lightning_geomarkers.callbacks.monitor import GeometryMonitor
from lightning_geomarkers.callbacks.offline import ForwardFn, evaluate_model
from lightning_geomarkers.cli.selection import (
    D_EFF,
    PSI_EFF,
    CheckpointScore,
    RankingResult,
    parse_threshold,
    rank_scores,
    write_csv,
    write_markdown,
    write_plot,
)
from lightning_geomarkers.functional.suite import MARKERS, resolve_marker_names

__all__ = [
    "CLIError",
    "build_parser",
    "load_object",
    "load_dataloader",
    "main",
    "monitor_from_config",
    "rank_checkpoints",
]

PROG = "lightning-geomarkers"
#: ``class_path`` values accepted in a ``--config`` file.
MONITOR_CLASS_PATHS = (
    "lightning_geomarkers.GeometryMonitor",
    "lightning_geomarkers.callbacks.GeometryMonitor",
    "lightning_geomarkers.callbacks.monitor.GeometryMonitor",
)
#: Monitor arguments that do not change the measured values; ignored when read from a config file.
_NOT_MEASURED = ("alerts", "every_n_epochs", "log_spectrum", "custom_scalars", "log_class_heatmap", "strict")


class CLIError(ValueError):
    """A problem with the command line's input (a bad spec, a missing file, a bad config); the message
    names the problem and the fix."""


# ---------------------------------------------------------------------------------------- loading


def _import_file(path: Path) -> ModuleType:
    path = path.resolve()
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:  # type: ignore[arg-type]
            return module
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # so the file's own sibling imports work
    name = f"_geomarkers_cli_{path.stem}_{abs(hash(str(path))) % 10**8}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"Cannot import {path}: not a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def load_object(spec: str, what: str = "object") -> Any:
    """Import ``MODULE:NAME`` (``my_pkg.models:LitNet``) or ``path/to/file.py:NAME``.

    ``NAME`` may be dotted (``module:Outer.Inner``). A file path's directory is put on ``sys.path`` so the
    file's own imports of its siblings work.

    Raises:
        CLIError: a malformed spec, a module that cannot be imported, or a missing name (with close
            matches).

    Example:
        >>> load_object("lightning_geomarkers:GeometryMonitor").__name__
        'GeometryMonitor'
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise CLIError(
            f"{what} {spec!r} is not of the form MODULE:NAME; write e.g. my_package.models:LitModel or "
            "path/to/file.py:LitModel."
        )
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise CLIError(f"{what} {spec!r} is not of the form MODULE:NAME (both parts are needed).")
    try:
        if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
            file = Path(module_part)
            if not file.is_file():
                raise CLIError(f"{what} {spec!r}: no file {file} (relative paths start at {Path.cwd()}).")
            module = _import_file(file)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # `python -m` puts the cwd first; the script does not
            module = importlib.import_module(module_part)
    except ImportError as err:
        raise CLIError(
            f"{what} {spec!r}: could not import module {module_part!r} ({type(err).__name__}: {err}). Install it, "
            "run from the directory that contains it (or add it to PYTHONPATH), or give a file path such as "
            f"path/to/{module_part.rpartition('.')[2]}.py:{attr}."
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise CLIError(
                f"{what} {spec!r}: {getattr(obj, '__name__', module_part)!r} has no attribute {part!r}.{hint}"
            )
        obj = getattr(obj, part)
    return obj


def _model_class(model: str | type) -> type[L.LightningModule]:
    cls = load_object(model, "--model") if isinstance(model, str) else model
    if not (inspect.isclass(cls) and issubclass(cls, L.LightningModule)):
        raise CLIError(
            f"--model must name a LightningModule class (loaded with load_from_checkpoint), got "
            f"{getattr(cls, '__name__', cls)!r}. For a plain nn.Module, load the weights yourself and call "
            "GeometryMonitor(...).evaluate(model, loader)."
        )
    return cls


def load_dataloader(data: Any) -> Any:
    """The validation loader(s) from a ``--data`` spec or object.

    Accepted: ``MODULE:FUNCTION`` / a callable returning a DataLoader (any iterable of batches), a list of
    them, or a ``LightningDataModule``; a ``LightningDataModule`` class (instantiated without arguments)
    or instance: ``prepare_data()``, ``setup("validate")``, then ``val_dataloader()``; or a loader itself.

    Raises:
        CLIError: the spec cannot be imported, needs arguments, gives no batches or a one-pass iterator
            (a generator: every checkpoint needs the same batches), or its DataModule fails to set up.
    """
    obj = load_object(data, "--data") if isinstance(data, str) else data
    if inspect.isclass(obj):
        if not issubclass(obj, L.LightningDataModule):
            raise CLIError(
                f"--data names the class {obj.__name__}, which is not a LightningDataModule; name a function "
                "that returns the validation DataLoader, or a LightningDataModule class."
            )
        try:
            obj = obj()
        except TypeError as err:
            raise CLIError(
                f"--data: {obj.__name__}() cannot be built without arguments ({err}). Write a function that builds "
                "the DataModule (or its validation loader) and name that function instead."
            ) from err
    elif callable(obj) and not isinstance(obj, Iterable):
        try:
            params = list(inspect.signature(obj).parameters.values())
        except (TypeError, ValueError):
            params = []
        if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            raise CLIError(
                f"--data: {getattr(obj, '__name__', obj)!r} needs arguments; name a function callable without "
                "arguments that returns the validation DataLoader (wrap yours in one)."
            )
        obj = obj()
    if isinstance(obj, L.LightningDataModule):
        try:
            obj.prepare_data()
            obj.setup("validate")
            obj = obj.val_dataloader()
        except Exception as err:
            raise CLIError(
                f"--data: the LightningDataModule {type(obj).__name__} failed in prepare_data(), "
                f"setup('validate') or val_dataloader() ({type(err).__name__}: {err}). Build the validation "
                "set in setup() for the 'validate' stage (or for any stage), or name a function that "
                "returns the validation DataLoader."
            ) from err
    if obj is None or isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
        raise CLIError(
            f"--data gave {type(obj).__name__}, not a dataloader; the function must return an iterable of "
            "(inputs, labels) batches such as a torch DataLoader."
        )
    if iter(obj) is obj:  # a generator or other iterator: exhausted by the first checkpoint
        raise CLIError(
            f"--data gave a one-pass iterator ({type(obj).__name__}): every checkpoint is measured on the "
            "same batches, so the second one would get none. Return a DataLoader or a list of batches."
        )
    return obj


def monitor_from_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``init_args`` of the ``GeometryMonitor`` in a LightningCLI-style YAML file.

    The file may be the monitor's entry itself (``class_path: lightning_geomarkers.GeometryMonitor`` and
    ``init_args: {...}``), a list of callback entries, or a whole LightningCLI config (the entry is looked
    up in ``trainer.callbacks``). Arguments that do not change the values (alerts, schedule, TensorBoard
    extras) are dropped. Read with ``yaml.safe_load``.

    Raises:
        CLIError: missing file, invalid YAML, no GeometryMonitor entry, another ``class_path``, or an
            unknown argument (the message lists the valid ones).
    """
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--config: no file {path}.")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CLIError(f"--config {path}: not valid YAML ({err}).") from err
    candidates: list[Any] = []
    if isinstance(doc, Mapping) and "class_path" in doc:
        candidates = [doc]
    elif isinstance(doc, list):
        candidates = doc
    elif isinstance(doc, Mapping):
        trainer = doc["trainer"] if isinstance(doc.get("trainer"), Mapping) else {}
        callbacks = trainer.get("callbacks", doc.get("callbacks", []))
        candidates = callbacks if isinstance(callbacks, list) else [callbacks]
    entries = [c for c in candidates if isinstance(c, Mapping) and "class_path" in c]
    monitors = [c for c in entries if str(c["class_path"]).rpartition(".")[2] == "GeometryMonitor"]
    if not monitors:
        found = [str(c["class_path"]) for c in entries]
        raise CLIError(
            f"--config {path}: no GeometryMonitor entry found{f' (class paths: {found})' if found else ''}. Write "
            "`class_path: lightning_geomarkers.GeometryMonitor` with its `init_args:`, at the top level or in "
            "trainer.callbacks."
        )
    if len(monitors) > 1:
        raise CLIError(
            f"--config {path}: {len(monitors)} GeometryMonitor entries; keep the one to rank with."
        )
    entry = monitors[0]
    if entry["class_path"] not in MONITOR_CLASS_PATHS:
        raise CLIError(
            f"--config {path}: class_path {entry['class_path']!r} is not the monitor; use one of "
            f"{list(MONITOR_CLASS_PATHS)}."
        )
    init_args = entry.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise CLIError(f"--config {path}: init_args must be a mapping of GeometryMonitor arguments.")
    valid = [p for p in inspect.signature(GeometryMonitor.__init__).parameters if p != "self"]
    unknown = [k for k in init_args if k not in valid]
    if unknown:
        raise CLIError(f"--config {path}: unknown GeometryMonitor argument(s) {unknown}; valid: {valid}.")
    for key in ("pooling", "label_fn", "input_fn"):
        if isinstance(init_args.get(key), Mapping):
            raise CLIError(
                f"--config {path}: {key} is a callable, which the command line cannot build; use the Python "
                "function lightning_geomarkers.cli.rank_checkpoints(..., monitor=GeometryMonitor(...))."
            )
    return {k: v for k, v in init_args.items() if k not in _NOT_MEASURED}


def monitor_settings(monitor: GeometryMonitor) -> dict[str, Any]:
    """The settings that determine a monitor's values (written to ``ranking.md``)."""

    def name(fn: Any) -> str | None:
        return None if fn is None else getattr(fn, "__name__", "callable")

    settings = monitor.value_settings()
    if callable(monitor.pooling):
        settings["pooling"] = name(monitor.pooling)
    return {
        "layers": settings.pop("layers"),
        "pooling": settings.pop("pooling"),
        "label_fn": name(monitor.label_fn),
        "input_fn": name(monitor.input_fn),  # changes the sample keys, so which rows are kept
        "markers": list(monitor.markers),
        **settings,
        "seed": monitor.seed,
        "prefix": monitor.prefix,
        "dataloader_idx": monitor.dataloader_idx,
    }


# ---------------------------------------------------------------------------------------- ranking


def _expand(checkpoints: Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    paths: list[Path] = []
    missing: list[str] = []
    for item in checkpoints:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.ckpt"))
            if not found:
                raise FileNotFoundError(f"The directory {p} holds no *.ckpt file; pass checkpoint files.")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            missing.append(str(p))
    if missing:
        raise FileNotFoundError(
            f"Checkpoint file(s) not found: {missing}. Check the paths (relative to {Path.cwd()}); a directory "
            "stands for every *.ckpt in it."
        )
    if not paths:
        raise CLIError("No checkpoints given; pass one or more checkpoint files (or a directory of them).")
    unique: dict[Path, Path] = {}  # one entry per file, however it was spelt (relative, absolute, a link)
    for p in paths:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _checkpoint_info(
    path: Path, prefix: str = "geometry"
) -> tuple[int | None, int | None, int | None, dict[str, Any] | None]:
    """The checkpoint's ``epoch``, ``global_step``, and the seed and value settings
    (:meth:`GeometryMonitor.value_settings`) of the ``GeometryMonitor`` with this ``prefix`` that logged
    during its run (None where absent: settings are saved since the twelfth session).

    Raises:
        CLIError: the file cannot be read as a checkpoint (truncated, not a torch file), with its path.
    """
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CLIError(
            f"Could not read {path} as a Lightning checkpoint ({type(err).__name__}: {err}). The file may be "
            "truncated (a run stopped while saving) or not a checkpoint; remove it from the list or save it again."
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CLIError(
            f"{path} holds a {type(ckpt).__name__}"
            + (" without a 'state_dict' entry (a bare state_dict?)" if isinstance(ckpt, Mapping) else "")
            + ", not a Lightning checkpoint (a dict with 'state_dict'); pass files written by ModelCheckpoint "
            "or trainer.save_checkpoint."
        )
    epoch, step = ckpt.get("epoch"), ckpt.get("global_step")
    states = [
        state
        for key, state in (ckpt.get("callbacks") or {}).items()
        if str(key).startswith(f"GeometryMonitor{{'prefix': {prefix!r}") and isinstance(state, Mapping)
    ]
    seeds = {state.get("seed") for state in states}
    seed = seeds.pop() if len(seeds) == 1 else None
    settings = states[0].get("settings") if len(states) == 1 else None
    return (
        int(epoch) if isinstance(epoch, int) else None,
        int(step) if isinstance(step, int) else None,
        int(seed) if isinstance(seed, int) else None,
        dict(settings) if isinstance(settings, Mapping) else None,
    )


def _load_model(model_cls: type[L.LightningModule], path: Path, device: torch.device) -> L.LightningModule:
    """``model_cls.load_from_checkpoint(path)`` in the checkpoint's floating dtype: Lightning builds the
    module in float32 and copies the weights into it, so a ``64-true`` checkpoint lost its float64 digits
    and a ``bf16-true`` one ran in float32, and the measured values were not the logged ones (D_eff 2.4%
    off on a bf16-true run). Where the saved weights have one floating dtype other than the module's, the
    module is cast to it (``LightningModule.dtype`` follows, for models that cast their inputs to it)
    and the weights are loaded again, as Lightning does (``on_load_checkpoint`` first), now exactly."""
    net = model_cls.load_from_checkpoint(path, map_location=device)
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # read only where needed
    saved = ckpt.get("state_dict", {})
    here = net.state_dict()
    dtypes = {t.dtype for t in saved.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    differ = any(
        isinstance(t, torch.Tensor) and k in here and t.is_floating_point() and t.dtype != here[k].dtype
        for k, t in saved.items()
    )
    if differ and len(dtypes) == 1:
        net.to(dtypes.pop())
        net.on_load_checkpoint(ckpt)
        net.load_state_dict(ckpt["state_dict"], strict=net.strict_loading)
    elif differ:  # several floating dtypes saved: each tensor as saved
        net.on_load_checkpoint(ckpt)
        net.load_state_dict(ckpt["state_dict"], strict=net.strict_loading, assign=True)
    return net


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short unique display names: the file stems, with parent directories where stems collide."""
    labels = [p.stem for p in paths]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 6:
        depth += 1
        labels = ["/".join(p.with_suffix("").parts[-depth:]) for p in paths]
    return labels


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rank_checkpoints(
    checkpoints: Sequence[str | os.PathLike[str]],
    model: str | type[L.LightningModule],
    data: Any,
    *,
    monitor: GeometryMonitor | None = None,
    out: str | os.PathLike[str] | None = "geomarkers-ranking",
    floors: Mapping[str, float] | None = None,
    ceilings: Mapping[str, float] | None = None,
    device: str | torch.device | None = None,
    forward_fn: ForwardFn | None = None,
    plot: bool = True,
    progress: bool = True,
) -> RankingResult:
    """Measure checkpoints with one monitor configuration and rank them (what ``lightning-geomarkers rank``
    runs).

    Each checkpoint is loaded with ``model.load_from_checkpoint(path, map_location=device)`` and measured
    with :meth:`GeometryMonitor.evaluate <lightning_geomarkers.GeometryMonitor.evaluate>` on the loader
    from ``data`` (built once). The ranking uses the both-higher rule on D_eff and Psi_eff, the Pareto
    front, and the ``floors``/``ceilings`` thresholds (:func:`~lightning_geomarkers.cli.selection.rank_scores`).

    Args:
        checkpoints: checkpoint files (a directory stands for its ``*.ckpt`` files, sorted by name).
        model: a LightningModule class, or ``"MODULE:CLASS"`` / ``"path/file.py:CLASS"``.
        data: ``"MODULE:FUNCTION"`` (or the function) returning the validation DataLoader, a
            LightningDataModule class or instance (``setup("validate")``, ``val_dataloader()``), or a loader.
        monitor: the monitor whose settings to use (default: ``GeometryMonitor()``, the defaults). Use the
            one (or the settings) of the training run to compare with its logs.
        out: directory for ``markers.csv``, ``ranking.md``, ``markers.png`` (created); None writes nothing.
        floors, ceilings: threshold rules ``{marker: value}`` (bare names or logged keys).
        device: where to load and measure (default: CUDA if available, else CPU).
        forward_fn: ``forward_fn(model, batch)``, see ``GeometryMonitor.evaluate``.
        plot: write ``markers.png`` (needs matplotlib; skipped with a ``UserWarning`` naming
            ``pip install matplotlib`` when it is missing).
        progress: show a progress bar over the checkpoints (on stderr).

    Returns:
        :class:`~lightning_geomarkers.cli.selection.RankingResult`; ``result.choice`` is the rule's pick.

    Raises:
        FileNotFoundError: a checkpoint does not exist.
        CLIError: bad ``model``/``data`` specs, a bad ``device`` or ``out``, a checkpoint the model class
            cannot load, batches whose inputs cannot be found, a threshold on a marker that is not
            computed, or no checkpoint could be measured.

    Example::

        from lightning_geomarkers.cli import rank_checkpoints
        result = rank_checkpoints(["ckpt/epoch=3.ckpt", "ckpt/epoch=7.ckpt"], MyModule, val_loader_fn,
                                  monitor=GeometryMonitor(n_t=200, seed=0), floors={"glue_utility": 0.3})
        print(result.table())
        best = result.choice.path
    """
    paths = _expand(checkpoints)
    model_cls = _model_class(model)
    monitor = monitor if monitor is not None else GeometryMonitor()
    if not isinstance(monitor, GeometryMonitor):
        raise CLIError(f"`monitor` must be a GeometryMonitor, got {type(monitor).__name__}.")
    missing = [m for m in (D_EFF, PSI_EFF) if m not in monitor.markers]
    if missing:  # the ranking needs both; refuse before measuring every checkpoint
        raise CLIError(
            f"The ranking needs D_eff and Psi_eff, but the monitor's markers {list(monitor.markers)} lack "
            f"{missing}: --markers must include glue_dimension and glue_utility (or 'glue'/'all')."
        )
    for name in [*(floors or {}), *(ceilings or {})]:  # before measuring: a misspelt marker wastes them all
        base = str(name).rsplit("/", 1)[-1]
        known = list(monitor.markers)  # (the offline measurement has no standard errors)
        if base not in known:
            close = difflib.get_close_matches(base, known, n=3)
            raise CLIError(
                f"Threshold on {name!r}, but the monitor computes no marker {base!r}"
                + (f" (did you mean {close}?)" if close else "")
                + f"; its markers: {list(monitor.markers)}."
            )
    try:
        run_device = torch.device(device) if device is not None else _default_device()
    except (RuntimeError, TypeError) as err:
        raise CLIError(
            f"--device {device!r} is not a torch device ({err}); e.g. cpu, cuda or cuda:1."
        ) from err
    try:
        torch.empty(0, device=run_device)
    except Exception as err:  # e.g. cuda on a machine without a GPU: before blaming the checkpoints
        raise CLIError(
            f"--device {device!r} cannot be used on this machine ({type(err).__name__}: {err}); use --device cpu "
            "or a device that exists here."
        ) from err
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:  # before measuring: a bad --out must not waste every checkpoint's evaluation
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CLIError(f"--out {out_dir} cannot be used as the output directory ({err}).") from err
    loader = load_dataloader(data)
    if (
        isinstance(loader, (list, tuple))
        and len(loader) > 1
        and all(isinstance(d, DataLoader) for d in loader)
    ):
        warnings.warn(
            f"--data gave {len(loader)} loaders (a list or tuple counts as several validation loaders); the "
            f"markers are measured on loader {monitor.dataloader_idx} (--dataloader-idx). If the function "
            "returns (train, val) loaders, name one that returns the validation loader only.",
            UserWarning,
            stacklevel=2,
        )
    labels = _labels(paths)
    scores: list[CheckpointScore] = []
    failures: dict[str, str] = {}
    key_order: list[str] = []
    seed_warned = False
    settings_warned = False
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    bar = tqdm(paths, desc="checkpoints", unit="ckpt", disable=not progress, file=sys.stderr)
    for path, label in zip(bar, labels, strict=True):
        bar.set_postfix_str(label[-40:])
        epoch, step, run_seed, run_settings = _checkpoint_info(path, monitor.prefix)
        if run_seed is not None and run_seed != monitor.seed and not seed_warned:
            seed_warned = True
            warnings.warn(
                f"{path} was logged by a GeometryMonitor with seed={run_seed}, and this ranking uses "
                f"seed={monitor.seed}: other subsamples and probes, so the values differ from the logged ones "
                f"by their sampling noise. Pass --seed {run_seed} (or GeometryMonitor(seed={run_seed})) to "
                "reproduce them.",
                UserWarning,
                stacklevel=2,
            )
        try:
            net = _load_model(model_cls, path, run_device)
        except Exception as err:
            raise CLIError(
                f"Could not load {path} with {model_cls.__name__}.load_from_checkpoint ({type(err).__name__}: {err}). "
                "Is --model the class the checkpoint was saved from?"
            ) from err
        differ = monitor.settings_differences(run_settings, model=net)
        if differ and not settings_warned:
            settings_warned = True
            warnings.warn(
                f"{path} was logged by a GeometryMonitor with other settings than this ranking's ("
                + "; ".join(f"{k}: logged {a!r}, here {b!r}" for k, a, b in differ)
                + "): the values measured here are not the logged ones, and rankings or thresholds taken "
                "from the run do not apply. Pass the run's settings (--config, or the options of the same "
                "names) to reproduce them.",
                UserWarning,
                stacklevel=2,
            )
        if not key_order:  # the monitor's layer order: D_eff and Psi_eff are the first layer's
            try:
                key_order = monitor.logged_keys(net)
            except Exception as err:
                if not scores:  # the first checkpoint: a misspelt layer, not one variant's architecture
                    raise CLIError(
                        f"{err} (in {path}, the first checkpoint; --layers names the model's submodules)"
                    ) from err
                key_order = []  # a variant without the layer: evaluate() below says so for it
        try:
            values = evaluate_model(monitor, net, loader, forward_fn=forward_fn, device=run_device).values
        except TypeError as err:  # the batches' inputs cannot be found: the same for every checkpoint
            raise CLIError(
                f"{err} From the command line, give --data batches of (inputs, labels) (or dicts with an "
                "'input'-like key); from Python, pass rank_checkpoints(..., forward_fn=...)."
            ) from err
        except (ValueError, RuntimeError) as err:
            failures[str(path)] = str(err)
            warnings.warn(f"{path}: no markers ({err})", UserWarning, stacklevel=2)
            values = {}
        scores.append(CheckpointScore(path=str(path), values=values, epoch=epoch, step=step, label=label))
        del net
    if len(failures) == len(paths):
        raise CLIError(
            f"No checkpoint could be measured: {failures}. Where every checkpoint failed alike in the forward "
            "pass (e.g. 'mat1 and mat2 must have the same dtype' or shapes that do not fit), look at --data: "
            "batches of (inputs, labels) in that order, inputs in the model's dtype."
        )
    result = rank_scores(
        scores,
        prefix=monitor.prefix,
        floors=floors,
        ceilings=ceilings,
        settings=monitor_settings(monitor),
        key_order=key_order,
    )
    if out_dir is not None:
        order = [f"{monitor.prefix}/{m}" for m in MARKERS]
        result.files["csv"] = write_csv(scores, out_dir / "markers.csv", marker_order=order)
        result.files["md"] = write_markdown(result, out_dir / "ranking.md")
        if plot:
            try:
                result.files["png"] = write_plot(result, out_dir / "markers.png")
            except ImportError as err:
                warnings.warn(f"markers.png skipped: {err}", UserWarning, stacklevel=2)
    return result


# ---------------------------------------------------------------------------------------- command line


def _int_or_none(text: str) -> int | None:
    if text.lower() in ("none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


#: (option, GeometryMonitor argument, argparse keyword arguments)
_MONITOR_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "--layers",
        "layers",
        dict(
            nargs="+",
            metavar="LAYER",
            help="layers to watch (default: the classifier head's input); NAME, NAME:input, several",
        ),
    ),
    (
        "--pooling",
        "pooling",
        dict(choices=["auto", "mean", "cls", "max"], help="pooling of conv maps / token sequences"),
    ),
    (
        "--markers",
        "markers",
        dict(
            nargs="+",
            metavar="MARKER",
            help="'all' (default), 'glue' (the GLUE markers), or marker names; 'glue'/'all' may be mixed "
            "with names ('glue nc1'). The ranking needs glue_dimension and glue_utility",
        ),
    ),
    (
        "--samples-per-class",
        "samples_per_class",
        dict(type=int, metavar="K", help="per-class sample (default 50)"),
    ),
    (
        "--max-classes",
        "max_classes",
        dict(type=_int_or_none, metavar="C", help="classes monitored (default 100; 'none': all)"),
    ),
    ("--protocol", "glue_protocol", dict(choices=["pairs", "joint"], help="GLUE protocol (default pairs)")),
    (
        "--points-per-class",
        "points_per_class",
        dict(type=int, metavar="M", help="GLUE points per class (default: samples per class)"),
    ),
    (
        "--n-pairs",
        "n_pairs",
        dict(type=_int_or_none, metavar="P", help="class pairs (default 100; 'all': every pair)"),
    ),
    ("--n-t", "n_t", dict(type=int, metavar="T", help="probes per pair (default 100)")),
    (
        "--dichotomies",
        "dichotomies",
        dict(choices=["random", "balanced", "one_vs_rest"], help="GLUE dichotomies"),
    ),
    (
        "--no-center",
        "center_features",
        dict(action="store_const", const=False, help="do not centre features before GLUE"),
    ),
    (
        "--projection-dim",
        "projection_dim",
        dict(type=_int_or_none, metavar="D", help="random projection width (default 1000; 'none')"),
    ),
    (
        "--lid-k",
        "lid_k",
        dict(type=int, metavar="K", help="neighbours of the local intrinsic dimension (default 20)"),
    ),
    ("--seed", "seed", dict(type=int, help="sampling, pairs, probes, projection (default 0)")),
    ("--prefix", "prefix", dict(help="key prefix (default 'geometry')")),
    (
        "--dataloader-idx",
        "dataloader_idx",
        dict(type=int, metavar="I", help="which of several validation loaders (default 0)"),
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-geomarkers`` argument parser (subcommand ``rank``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Geometry markers of trained models, offline, with a GeometryMonitor's exact settings.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rank = sub.add_parser(
        "rank",
        help="measure checkpoints and rank them by D_eff and Psi_eff",
        description=(
            "Load each checkpoint with MODULE:CLASS.load_from_checkpoint, measure the geometry markers on the "
            "validation data with one fixed monitor configuration, and rank the checkpoints by the 'both higher "
            "D_eff and Psi_eff' rule. Writes OUT/markers.csv, OUT/ranking.md and OUT/markers.png."
        ),
        epilog=(
            "example: lightning-geomarkers rank runs/ckpt/*.ckpt --model my_pkg.models:LitNet "
            "--data my_pkg.data:val_loader --seed 0 --floor glue_utility=0.3 --out ranking"
        ),
    )
    rank.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="checkpoint files (a directory: its *.ckpt)"
    )
    rank.add_argument(
        "--model",
        required=True,
        metavar="MODULE:CLASS",
        help="the LightningModule class (or path/file.py:CLASS)",
    )
    rank.add_argument(
        "--data",
        required=True,
        metavar="MODULE:FUNCTION",
        help="a function returning the validation DataLoader, or a LightningDataModule class",
    )
    rank.add_argument(
        "--out", default="geomarkers-ranking", metavar="DIR", help="output directory (default: %(default)s)"
    )
    rank.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="monitor settings in LightningCLI form (class_path: lightning_geomarkers.GeometryMonitor, init_args: ...); "
        "options given here override it",
    )
    group = rank.add_argument_group("monitor settings (default: GeometryMonitor's defaults)")
    for option, dest, kwargs in _MONITOR_OPTIONS:
        # SUPPRESS: only options actually given reach the namespace, so "none"/"all" (None) override the
        # defaults and a --config value.
        group.add_argument(option, dest=dest, default=argparse.SUPPRESS, **kwargs)
    rules = rank.add_argument_group("rules")
    rules.add_argument(
        "--floor",
        action="append",
        default=[],
        metavar="MARKER=VALUE",
        help="eligible only if MARKER >= VALUE (repeatable)",
    )
    rules.add_argument(
        "--ceiling",
        action="append",
        default=[],
        metavar="MARKER=VALUE",
        help="eligible only if MARKER <= VALUE (repeatable)",
    )
    run = rank.add_argument_group("run")
    run.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)"
    )
    run.add_argument("--no-plot", action="store_true", help="do not write markers.png")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    run.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def _expand_markers(markers: list[str]) -> str | list[str]:
    """``--markers`` values: 'all'/'glue' alone as given, and inside a list expanded to their names."""
    if len(markers) == 1 and markers[0] in ("all", "glue"):
        return markers[0]
    names: list[str] = []
    for m in markers:
        names += list(resolve_marker_names(m)) if m in ("all", "glue") else [m]
    return list(dict.fromkeys(names))


def _monitor_from_args(args: argparse.Namespace) -> GeometryMonitor:
    kwargs: dict[str, Any] = monitor_from_config(args.config) if args.config else {}
    for _, dest, _ in _MONITOR_OPTIONS:
        if hasattr(args, dest):  # given on the command line (the options default to SUPPRESS)
            kwargs[dest] = getattr(args, dest)
    layers = kwargs.get("layers")
    if isinstance(layers, list) and len(layers) == 1:
        kwargs["layers"] = layers[0]
    markers = kwargs.get("markers")
    if isinstance(markers, list):
        kwargs["markers"] = _expand_markers(markers)
    try:
        return GeometryMonitor(**kwargs)
    except (TypeError, ValueError) as err:
        raise CLIError(f"Invalid monitor settings: {err}") from err


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 error, 2 usage error).

    Example::

        from lightning_geomarkers.cli import main
        main(["rank", "ckpt/a.ckpt", "ckpt/b.ckpt", "--model", "pkg.models:Net", "--data", "pkg.data:val"])
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else [os.fspath(a) for a in argv])
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2): return it instead
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    previous_format = warnings.formatwarning
    warnings.formatwarning = _format_warning  # "<prog> rank: warning: ..." without a source line
    try:
        return _run(args)
    except (CLIError, FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        print(f"{PROG} rank: error: {err}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = previous_format


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning of a command-line run as one line, without the package's file and line (printed by
    Python's default ``showwarning``; code that records warnings still gets them as warnings)."""
    return f"{PROG} rank: warning: {message}\n"


def _run(args: argparse.Namespace) -> int:
    """The ``rank`` command on parsed arguments (errors propagate to :func:`main`)."""
    floors = dict(parse_threshold(t) for t in args.floor)
    ceilings = dict(parse_threshold(t) for t in args.ceiling)
    monitor = _monitor_from_args(args)
    result = rank_checkpoints(
        args.checkpoints,
        args.model,
        args.data,
        monitor=monitor,
        out=args.out,
        floors=floors,
        ceilings=ceilings,
        device=args.device,
        plot=not args.no_plot,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(result.table())
        print()
        c = result.choice
        if c is not None:
            d, u = c.get(result.dimension_key), c.get(result.utility_key)
            print(
                f"Choice (both-higher rule): {c.path}  (D_eff {d:.4f}, Psi_eff {u:.4f}, beats {c.wins} on both)"
            )
        else:
            print("Choice: none (no checkpoint has both D_eff and Psi_eff, or none meets the thresholds)")
        for path in result.files.values():
            print(f"Wrote {path}")
        if "png" not in result.files and not args.no_plot:
            print("markers.png not written: matplotlib is missing (pip install matplotlib)")
    return 0
