"""The Python API, for people holding live objects: ``audit``, ``ablate``, ``blocks``,
``inspect``, ``gate``, ``load``, ``load_data``. The command line (``fitcli.cli``) parses its
strings and calls these. Each function checks its arguments and hands the work on: data to
``fitcli.data``, audits to ``fitcli.engine``, exact-ablation studies to ``fitcli.studies``.

>>> import fitcli
>>> report = fitcli.audit(model, loader)                 # an nn.Module and a DataLoader
>>> report.dead                                          # {"fc1": [3, 17], ...}
>>> report.ranked(by="apoz", top=10)                     # least fit first

Settings are checked before any model is loaded or data read; the caller's global RNG state, the
model's train/eval mode and the device of its parameters are as they were afterwards; the
model's weights are never changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fitcli import data as data_mod
from fitcli import distributed, report_build, studies
from fitcli.data import DataSource, as_batch
from fitcli.engine import cast_model, model_dtype, peek
from fitcli.errors import InputError, UsageError
from fitcli.loading import LoadedModel, from_module, load_model
from fitcli.losses import check_loss
from fitcli.progress import Progress, ProgressArg, as_progress
from fitcli.report import AuditReport, GateResult
from fitcli.settings import Settings
from fitcli.studies import REMOVABLE_EPS

# --------------------------------------------------------------------------------------------
# what the caller holds -> what the engine takes


def load(model: nn.Module | LoadedModel | str | Path, *, arch: Callable[..., nn.Module] | str | None = None,
         arch_kwargs: dict[str, Any] | None = None, trust_checkpoint: bool = False, arch_label: str | None = None,
         lazy: bool = False) -> LoadedModel:
    """The model an audit runs on, from what the caller holds.

    Args:
        model: an ``nn.Module`` (used as it is, never changed), a ``LoadedModel``, or a checkpoint
            path (``.safetensors``, ``.pt``/``.pth``, a ``torch.export`` ``.pt2``).
        arch: for a checkpoint holding a state dict: a callable (or ``"file.py:fn"``) returning
            the ``nn.Module`` the state dict fills.
        arch_kwargs: keyword arguments for ``arch``.
        trust_checkpoint: allow a pickled checkpoint that needs full unpickling (runs its code).
        arch_label: how the report names the architecture.
        lazy: a ``.safetensors`` file's weights are not read now but mapped block by block during
            an audit with ``max_memory`` (models larger than memory).

    Returns:
        A ``LoadedModel`` (module, state dict, format, sha256, notes).

    Examples:
        >>> loaded = fitcli.load("model.safetensors", arch="models.py:mlp")
        >>> loaded.module
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if arch is not None:
            raise UsageError("arch is for checkpoint files; the model given is already a module")
        return from_module(model)
    if isinstance(model, (str, Path)):
        return load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                          arch_label=arch_label, lazy=lazy)
    raise UsageError(f"model must be an nn.Module or a checkpoint path, not {type(model).__name__}")


def load_data(data: Any, *, batch_size: int = 64, max_batches: int | None = None, seed: int = 0) -> DataSource | None:
    """Re-iterable batches from what the caller holds (``fitcli.data`` reads every kind).

    Args:
        data: a DataLoader or any re-iterable of batches (tensors, ``(inputs, targets)`` pairs,
            dicts of model keyword inputs with optional ``labels``/``targets``), a function
            returning such an iterable, a tensor of inputs, or a tensor file / data spec path
            (``data.safetensors``, ``random:1x28x28,n=256``, ``pkg.mod:fn``).
        batch_size: samples per batch, for tensors, tensor files and random specs.
        max_batches: stop after this many batches (None: all).
        seed: the seed of random data specs.

    Returns:
        A ``DataSource`` yielding ``fitcli.Batch`` objects (None when ``data`` is None).

    Examples:
        >>> batches = fitcli.load_data("random:3x32x32,n=64", batch_size=16)
        >>> [b.size for b in batches]
        [16, 16, 16, 16]
    """
    return data_mod.load_data(data, batch_size=batch_size, max_batches=max_batches, seed=seed)


def _source(data: Any, s: Settings, loaded: LoadedModel) -> Any:
    return data_mod.source(data, batch_size=s.batch_size, max_batches=s.max_batches, seed=s.seed,
                           dtype=model_dtype(loaded.module))


@contextlib.contextmanager
def _placement(model: nn.Module | None) -> Iterator[None]:
    """Every parameter and buffer of the caller's model (and each gradient) is handed back as the
    very tensor it was, on its device, whatever happens: moving the model to the audit device
    does not move the caller's model."""
    if model is None or not hasattr(model, "modules"):
        yield
        return
    saved = [(mod, name, p, p.data, p.grad) for mod in model.modules() for name, p in mod.named_parameters(recurse=False)]
    bufs = [(mod, name, b) for mod in model.modules() for name, b in mod.named_buffers(recurse=False)]
    try:
        yield
    finally:
        for mod, name, p, d, g in saved:
            setattr(mod, name, p)
            p.data = d
            if p.grad is not g:
                p.grad = g
        for mod, name, b in bufs:
            setattr(mod, name, b)


@contextlib.contextmanager
def caller_state(model: nn.Module | None, seed: int, device: torch.device | None = None) -> Iterator[None]:
    """The audit's own RNG (seeded), eval mode and no fused attention fast path; the caller's RNG
    state, every module's train flag, the model's device and the fast-path setting are restored
    on the way out, whatever happens."""
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:  # the fused attention fast path bypasses the layers inside nn.Transformer*
            mha.set_fastpath_enabled(False)
        with torch.random.fork_rng(devices=devices), _placement(model):
            torch.manual_seed(seed)
            if model is not None:
                with contextlib.suppress(NotImplementedError):  # a torch.export module has no eval()
                    model.eval()
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        if mha is not None:
            mha.set_fastpath_enabled(fast)


@contextlib.contextmanager
def _offload(loaded: LoadedModel, s: Settings) -> Iterator[Any]:
    """With ``max_memory``: the audit runs with the weights memory-mapped from the checkpoint, at
    most that many bytes of them resident, block by block (``fitcli.offload``)."""
    if s.max_memory is None or loaded.module is None:
        if loaded.lazy:
            raise UsageError("this model was loaded without its weights (lazy): audit it with {max_memory}",
                             setting="max_memory")
        yield None
        return
    from fitcli.loading import offload_source

    source = offload_source(loaded)  # the checkpoint, or a Hugging Face folder's model.safetensors
    if source is None:
        raise UsageError("{max_memory} maps the weights from a .safetensors checkpoint; this model is not one",
                         setting="max_memory")
    from fitcli.engine import pick_device
    from fitcli.offload import offloaded

    if pick_device(s.device).type != "cpu":
        raise UsageError("{max_memory}: the block-by-block audit runs on the cpu device for now", setting="max_memory")
    with offloaded(loaded.module, max_bytes=s.max_memory, source=source) as off:
        yield off


def _progress(progress: Any) -> Progress:
    p = as_progress(progress)
    if p is None:
        raise UsageError(f"progress must be True (a progress bar on stderr), False, a Progress object or a "
                         f"function (description, done, total), not {type(progress).__name__}")
    return p


def _settings(settings: Settings | None, options: dict[str, Any]) -> Settings:
    """``settings`` with the keyword settings given (not None) on top, checked."""
    return Settings.make(settings, **{k: v for k, v in options.items() if k in SETTING_NAMES}).check()


def _prepare(model: Any, s: Settings, loss: Any, how: dict[str, Any]) -> LoadedModel:
    """The loss checked, the model loaded (``how``: arch, arch_kwargs, trust_checkpoint) and cast
    to ``s.dtype``."""
    check_loss(loss)
    return cast_model(load(model, lazy=s.max_memory is not None, **how), s.dtype)


def _offloaded(off: Any) -> dict[str, Any] | None:
    """A block-by-block audit (max_memory) says so, with the most weight bytes resident at once."""
    if off is None:
        return None
    return {"max_memory": int(off.max_bytes), "high_water": int(off.high_water), "blocks": len(off.blocks),
            "loads": int(off.loads), "recomputed": int(off.recomputed)}


SETTING_NAMES = frozenset(Settings.names())


# --------------------------------------------------------------------------------------------
# audit, ablate, blocks

SETTING_DOCS = {
    "device": '``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.',
    "seed": "seed of fitcli's own generators (the caller's global RNG is never touched); 0.",
    "tau": "a unit is dead when its dormancy score is at most tau; 0.",
    "top": "rows of the ranked list kept in the report; 20.",
    "rank_by": 'the metric to rank units by; ``"auto"``: the best validated (needs validate).',
    "batch_size": "samples per batch of a tensor, a tensor file or a data spec; 64.",
    "max_batches": "stop each pass over the data after this many batches; all.",
    "dtype": '``"float32"``, ``"bfloat16"`` or ``"float16"``: the run uses a cast copy; the model\'s own.',
    "max_memory": "bytes of weights resident at once: a block-by-block run of a .safetensors checkpoint.",
    "chunk_size": "units per batched ablation pass; from free memory.",
    "ablation_mode": '``"zero"``, or ``"mean"`` (the unit\'s mean activation over the data).',
    "whole_layer": "also ablate each layer as a whole (``layer_ablation`` in the report).",
    "validate": "measure every metric against exact ablation (``report.validation``).",
    "validate_units": "validate on a stratified sample of this many units per layer (at least 2).",
    "max_dead": "gate: most dead units allowed, percent of the audited units.",
    "max_dead_layer": "gate: most dead units allowed in any one layer, percent.",
    "min_coverage": "gate: least share of the model's parameters the audited units own, percent.",
}


def _document_settings(fn: Callable[..., Any]) -> None:
    """``{settings}`` in ``fn``'s docstring -> one Args line per setting keyword it takes (None:
    the value of ``settings``, else the default given last), then ``settings`` and ``progress``."""
    import inspect as pyinspect

    names = [n for n in pyinspect.signature(fn).parameters if n in SETTING_DOCS]
    lines = [f"{n}: {SETTING_DOCS[n]}" for n in names]
    lines += ["settings: a ``fitcli.Settings``; each keyword setting above that is not None overrides it.",
              "progress: True (a progress bar on stderr), False/None (nothing), a ``Progress`` object,",
              "    or a function ``(description, done, total)``."]
    fn.__doc__ = (fn.__doc__ or "").replace("{settings}", "\n        ".join(lines))


def audit(model: Any, data: Any = None, *, loss: Any = None, metrics: list[str] | None = None,
          layers: list[str] | None = None, kinds: list[str] | None = None, baseline: Any = None, arch: Any = None,
          arch_kwargs: dict[str, Any] | None = None, trust_checkpoint: bool = False,
          settings: Settings | None = None, progress: ProgressArg = None, group: Any = None,
          device: str | None = None, seed: int | None = None, tau: float | None = None, top: int | None = None,
          rank_by: str | None = None, batch_size: int | None = None, max_batches: int | None = None,
          dtype: str | None = None, max_memory: int | None = None, chunk_size: int | None = None,
          ablation_mode: str | None = None, validate: bool | None = None, validate_units: int | None = None,
          max_dead: float | None = None, max_dead_layer: float | None = None,
          min_coverage: float | None = None) -> AuditReport:
    """Score every chosen metric of every audited layer on ``data``.

    Args:
        model: an ``nn.Module``, a ``LoadedModel`` or a checkpoint path (see ``fitcli.load``;
            ``arch``, ``arch_kwargs``, ``trust_checkpoint`` as there).
        data: any re-iterable of batches, a function returning one, a tensor, or a path or data
            spec (see ``fitcli.load_data``).
        loss: a name (``cross_entropy``, ``mse``, ``lm``, ``output``), a ``torch.nn`` loss module,
            a callable ``(output, batch)`` or ``(output, target)`` returning per-sample losses
            (docs/api.md says how the form is chosen), or None (chosen from the targets).
        metrics: metric names (None: every default metric whose needs this run meets).
        layers: layer names or globs (None: every auditable layer).
        kinds: unit kinds, of ``heads``, ``mlp``, ``hidden``, ``blocks``, ``rows`` (None: heads,
            mlp and blocks for a transformer, every layer for other models).
        baseline: a second model or checkpoint, for the weight-change metrics.
        group: a ``torch.distributed`` process group the caller initialised: every rank calls
            ``audit`` alike, reads its shard of the batches, and gets the same report.
        {settings}

    Returns:
        An ``AuditReport``: per-layer metric tensors, dead units, rankings, coverage.

    Examples:
        >>> report = fitcli.audit(model, loader, device="cpu")
        >>> report.dead                       # {"fc1": [3, 17], ...}
        >>> report.ranked(by="apoz", top=10)  # least fit first
    """
    s = _settings(settings, locals())
    bar, d = _progress(progress), distributed.of(group)
    loaded = _prepare(model, s, loss, {"arch": arch, "arch_kwargs": arch_kwargs, "trust_checkpoint": trust_checkpoint})
    base = load(baseline) if baseline is not None else None
    ds = _source(data, s, loaded)
    with caller_state(loaded.module, s.seed), _offload(loaded, s) as off:
        report = studies.audit_units(loaded, ds, base, s, loss, bar, d)
        report = dataclasses.replace(report, offload=_offloaded(off))
    if s.max_dead is not None or s.max_dead_layer is not None or s.min_coverage is not None:
        report = dataclasses.replace(report, gate=report_build.gate(report, s.max_dead, s.max_dead_layer,
                                                                    s.min_coverage))
    return report


def ablate(model: Any, data: Any = None, *, layers: list[str] | None = None, kinds: list[str] | None = None,
           units: list[int] | dict[str, list[int] | None] | None = None, loss: Any = None, arch: Any = None,
           arch_kwargs: dict[str, Any] | None = None, trust_checkpoint: bool = False,
           settings: Settings | None = None, progress: ProgressArg = None, group: Any = None,
           device: str | None = None, seed: int | None = None, tau: float | None = None, top: int | None = None,
           batch_size: int | None = None, max_batches: int | None = None, dtype: str | None = None,
           max_memory: int | None = None, chunk_size: int | None = None, ablation_mode: str | None = None,
           whole_layer: bool | None = None) -> AuditReport:
    """Exact ablation: the mean loss change when each unit is masked at its activation point.

    Args:
        model, data, loss, arch, arch_kwargs, trust_checkpoint, group: as for ``fitcli.audit``.
        layers: layer names or globs to ablate (at least one, or ``kinds``).
        kinds: unit kinds to ablate (``heads``, ``mlp``, ``hidden``, ``rows``); with ``layers``,
            the layers of these kinds among them.
        units: unit indices (for every layer), or ``{layer: indices}``; None: every unit.
        {settings}

    Returns:
        An ``AuditReport`` whose layers carry ``metrics["ablation"]`` (and ``ablation_accuracy``
        for data with one class id per sample) and ``removable``.

    Examples:
        >>> report = fitcli.ablate(model, loader, layers=["fc1"], device="cpu")
        >>> report.layer("fc1").metrics["ablation"]
        >>> report.removable                  # {"fc1": [3, 17]}
    """
    s = _settings(settings, locals())
    if s.kinds and "blocks" in s.kinds:
        raise UsageError("{kinds} blocks: residual blocks are ablated whole (fitcli.blocks)", setting="kinds")
    if not s.layers and not s.kinds:
        raise UsageError("ablation needs at least one layer (or unit kinds)", hint="fitcli.inspect(model) lists the layers",
                         cli_hint="`fitcli inspect MODEL` lists the layers")
    bar, d = _progress(progress), distributed.of(group)
    loaded = _prepare(model, s, loss, {"arch": arch, "arch_kwargs": arch_kwargs, "trust_checkpoint": trust_checkpoint})
    if not loaded.runnable:
        raise InputError(f"{loaded.path}: ablation needs a runnable model; give its architecture ({{arch}})"
                         + (" (" + "; ".join(loaded.notes) + ")" if loaded.notes else ""), setting="arch")
    ds = _source(data, s, loaded)
    if ds is None:
        raise UsageError("ablation needs data")
    with caller_state(loaded.module, s.seed), _offload(loaded, s):
        with distributed.phase(d):  # every rank plans on batch 0; a failure on one is every rank's
            p = studies.plan_units(loaded, ds, s, loss)
        return studies.ablate_units(loaded, ds, p, s, units, bar, d)


def blocks(model: Any, data: Any = None, *, greedy: int = 0, loss: Any = None, arch: Any = None,
           arch_kwargs: dict[str, Any] | None = None, trust_checkpoint: bool = False,
           settings: Settings | None = None, progress: ProgressArg = None, device: str | None = None,
           seed: int | None = None, tau: float | None = None, batch_size: int | None = None,
           max_batches: int | None = None, dtype: str | None = None,
           max_memory: int | None = None) -> AuditReport:
    """Residual blocks as units: Block Influence, angular distance, and the exact loss (and
    accuracy) change with each block replaced by the identity.

    Args:
        model, data, loss, arch, arch_kwargs, trust_checkpoint: as for ``fitcli.audit``.
        greedy: N > 0 adds the layer-removal curve: remove the cheapest block, re-measure
            exactly, N times.
        {settings}

    Returns:
        An ``AuditReport`` whose ``blocks`` and ``greedy`` fields hold the rows and the curve.

    Examples:
        >>> report = fitcli.blocks(model, loader, greedy=3, device="cpu")
        >>> [(b["name"], b["ablation"]) for b in report["blocks"]]
    """
    s = _settings(settings, locals())
    if not isinstance(greedy, int) or isinstance(greedy, bool) or greedy < 0:
        raise UsageError(f"{{greedy}} must be a non-negative number of blocks, got {greedy!r}", setting="greedy")
    bar = _progress(progress)
    loaded = _prepare(model, s, loss, {"arch": arch, "arch_kwargs": arch_kwargs, "trust_checkpoint": trust_checkpoint})
    if not loaded.runnable:
        raise InputError(f"{loaded.path}: block ablation needs a runnable model; give its architecture ({{arch}})",
                         setting="arch")
    ds = _source(data, s, loaded)
    if ds is None:
        raise UsageError("block ablation needs data")
    with caller_state(loaded.module, s.seed), _offload(loaded, s):
        return studies.ablate_blocks(loaded, ds, s, loss, greedy, bar)


for _fn in (audit, ablate, blocks):
    _document_settings(_fn)


# --------------------------------------------------------------------------------------------
# inspect, gate


@dataclass
class Inspection:
    """What ``inspect`` found: the model, how its graph was read, its layers and what was left out."""

    model: dict[str, Any]
    discovery: dict[str, Any]
    layers: list[dict[str, Any]]
    unsupported: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


def inspect(model: Any, data: Any = None, *, arch: Any = None, arch_kwargs: dict[str, Any] | None = None,
            trust_checkpoint: bool = False, batch_size: int = 8) -> Inspection:
    """Layers, unit counts, activation points and the format found in a model or checkpoint.

    Args:
        model, arch, arch_kwargs, trust_checkpoint: as for ``fitcli.load``.
        data: optional example data (as for ``fitcli.load_data``): one batch runs the model,
            which finds layers a traced graph misses and the activation chains.
        batch_size: samples of that batch, for tensors and data specs.

    Returns:
        An ``Inspection``: ``model``, ``discovery``, ``layers`` and ``unsupported``.

    Examples:
        >>> info = fitcli.inspect(model)
        >>> [(lay["name"], lay["units"]) for lay in info.layers]
    """
    from fitcli.discovery import discover

    loaded = load(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint)
    ds = load_data(data, batch_size=batch_size, max_batches=1) if loaded.runnable else None
    with caller_state(loaded.module, 0):
        example = peek(ds) if ds is not None else None
        graph = discover(loaded.module, loaded.state_dict, example=example, exported=loaded.format == "export")
    return Inspection(
        model={"path": loaded.path, "format": loaded.format, "sha256": loaded.sha256, "arch": loaded.arch},
        discovery={"method": graph.method, "notes": loaded.notes + graph.notes},
        layers=[{"name": lay.name, "type": lay.type, "units": lay.units, "activation_point": lay.point,
                 "activation_point_kind": lay.point_kind, "activation_chain": lay.chain_text,
                 "parameters": lay.n_params, "final": lay.final, "consumers": lay.consumers,
                 **({"members": lay.members} if lay.members else {})} for lay in graph.layers],
        unsupported=graph.unsupported,
    )


def gate(report: AuditReport | dict | str | Path, max_dead: float | None = None,
         max_dead_layer: float | None = None, min_coverage: float | None = None) -> GateResult:
    """Check a report against dead-unit thresholds and a minimum coverage, in percent.

    Args:
        report: an ``AuditReport``, a report dict, or a saved report file.
        max_dead: most dead units allowed, percent of all audited units.
        max_dead_layer: most dead units allowed in any one layer, percent.
        min_coverage: least share of the model's parameters the audited units must own, percent.
            Without any threshold, the ones the report was scored with.

    Returns:
        A ``GateResult`` (true when passed; ``failures`` says which threshold was exceeded). It
        fails when no unit was audited. The verdict is also stored on an ``AuditReport``.

    Examples:
        >>> result = fitcli.gate(report, max_dead=5)
        >>> bool(result), result.failures
    """
    Settings.make(max_dead=max_dead, max_dead_layer=max_dead_layer, min_coverage=min_coverage).check()
    if isinstance(report, (str, Path)):
        data = AuditReport.load(report)
    elif isinstance(report, AuditReport):
        data = report
    elif isinstance(report, dict):
        data = AuditReport.from_dict(report)
    else:
        raise UsageError(f"gate takes an AuditReport, a report dict or a path, not {type(report).__name__}")
    if max_dead is None and max_dead_layer is None and min_coverage is None:
        if data.gate is not None:  # (a verdict is falsy when it failed)
            max_dead, max_dead_layer, min_coverage = data.gate.max_dead, data.gate.max_dead_layer, data.gate.min_coverage
        if max_dead is None and max_dead_layer is None and min_coverage is None:
            raise UsageError("gate needs {max_dead}, {max_dead_layer} and/or {min_coverage} "
                             "(or a report that was scored with them)",
                             setting=("max_dead", "max_dead_layer", "min_coverage"))
    verdict = report_build.gate(data, max_dead, max_dead_layer, min_coverage)
    if isinstance(report, AuditReport):
        report.gate = verdict
    return verdict


__all__ = ["audit", "ablate", "blocks", "inspect", "gate", "load", "load_data", "Inspection", "as_batch",
           "caller_state", "REMOVABLE_EPS"]
