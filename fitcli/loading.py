"""Checkpoint formats -> a model (or a bare state dict), safely.

Every format in ``docs/cli.md`` is handled here. Nothing is unpickled beyond tensors unless the
caller passes ``trust_checkpoint=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import pickle
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fitcli.errors import InputError, UnsafeCheckpointError, UsageError, first_line


@dataclass
class LoadedModel:
    """What a checkpoint gave us.

    ``module`` is None for a bare state dict without ``--arch`` (weight metrics only).
    ``exported`` holds the torch.export program for ``.pt2`` files.
    """

    path: str
    format: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    module: nn.Module | None = None
    arch: str | None = None
    exported: Any = None
    notes: list[str] = field(default_factory=list)
    task: str | None = None  # "causal-lm" for language models: the lm loss is the default
    lazy: bool = False  # parameters not read: only valid inside fitcli.offload (max_memory)

    @property
    def runnable(self) -> bool:
        return self.module is not None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(path).as_posix().encode())
                h.update(p.read_bytes())
        return h.hexdigest()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# --arch / callable specs


def _import_file(path: Path, spec: str, what: str) -> Any:
    """Import a Python file once per process, under a name derived from its resolved path."""
    target = str(path)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise InputError(f"{what}: file not found: {target}")
    mod_name = "fitcli_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec_obj = importlib.util.spec_from_file_location(mod_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise InputError(f"{what}: cannot import {target}")
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[mod_name] = module
    try:
        spec_obj.loader.exec_module(module)
    except SystemExit as e:
        del sys.modules[mod_name]
        raise InputError(f"{what} {spec!r}: importing {target!r} called sys.exit") from e
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def resolve_callable(spec: str, what: str = "arch") -> Any:
    """``package.module:callable`` or ``path/to/file.py:callable`` -> the callable object.

    A malformed spec is an input error (exit 3), like a missing file or attribute (cli.md)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(
            f"{what} {spec!r} is not of the form 'package.module:callable' or 'file.py:callable'"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise InputError(
            f"{what} {spec!r} is not of the form 'package.module:callable' or 'file.py:callable'"
        )
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            module = _import_file(Path(target), spec, what)
        else:
            if not all(p.isidentifier() for p in target.split(".")):
                raise InputError(f"{what} {spec!r}: {target!r} is not a module path")
            module = importlib.import_module(target)
    except (InputError, UsageError):
        raise
    except ImportError as e:
        raise InputError(f"{what} {spec!r}: cannot import {target!r}: {e}") from e
    except (Exception, SystemExit) as e:  # user code failed (or exited) while importing
        raise InputError(f"{what} {spec!r}: importing {target!r} raised {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            from fitcli.errors import close_matches

            raise InputError(f"{what} {spec!r}: {target!r} has no attribute {part!r}" + close_matches(part, names))
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{what} {spec!r}: {attr!r} is not callable")
    return obj


def arch_name(arch: Any) -> str:
    """How the report names an architecture factory: ``module.qualname``."""
    name = getattr(arch, "fitcli_name", None)
    if name:
        return str(name)
    qual = getattr(arch, "__qualname__", None) or type(arch).__name__
    mod = getattr(arch, "__module__", None)
    return f"{mod}.{qual}" if mod and not str(mod).startswith("fitcli_user_") else str(qual)


def build_arch(arch: Any, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call the architecture factory ``arch(**kwargs)``; it must return an ``nn.Module``."""
    if isinstance(arch, nn.Module):
        if kwargs:
            raise UsageError("arch_kwargs were given, but arch is already a built module")
        return arch
    if not callable(arch):
        raise UsageError(f"arch must be a callable returning an nn.Module (a class or a function), "
                         f"not {type(arch).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UsageError(f"arch_kwargs must be a dict, not {type(kwargs).__name__}")
    label = arch_name(arch)
    try:
        model = arch(**(kwargs or {}))
    except (Exception, SystemExit) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise InputError(f"arch {label!r} raised {type(e).__name__} when called: {first}") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"arch {label!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def module_digest(module: nn.Module) -> str:
    """sha256 over a live module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(v.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))  # the tensor's own bytes: no copy
    return h.hexdigest()


def no_cache(module: nn.Module) -> nn.Module:
    """A Hugging Face model fitcli built itself (a folder, ``--arch``) runs without its key/value
    cache: an audit never generates, and blocks called with a cache cannot be recomputed
    (``fitcli.offload`` checkpoints them only without one). A caller's live module is left alone."""
    cfg = getattr(module, "config", None)
    if getattr(cfg, "use_cache", None):
        cfg.use_cache = False
    return module


def model_task(module: nn.Module) -> str | None:
    """"causal-lm" for a causal language model (its class or config says so), else None."""
    names = [type(module).__name__, *(getattr(getattr(module, "config", None), "architectures", None) or [])]
    return "causal-lm" if any(str(n).endswith(("ForCausalLM", "LMHeadModel")) for n in names) else None


def from_module(module: nn.Module) -> LoadedModel:
    """A live ``nn.Module`` as the audit's model (nothing is copied)."""
    return LoadedModel(path=f"<{type(module).__name__} object>", format="module", sha256=module_digest(module),
                       state_dict=dict(module.state_dict()), module=module, arch=arch_name(type(module)),
                       task=model_task(module))


# --------------------------------------------------------------------------------------------
# state dicts


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module", "weights"):
            if key in obj and _is_state_dict(obj[key]):
                return dict(obj[key])
    raise InputError(
        f"{path}: holds a {type(obj).__name__}, not a state dict of tensors",
        hint="save with torch.save(model.state_dict(), path) or safetensors",
    )


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: str, arch: str) -> None:
    """Fill ``model`` from ``sd``; any mismatch is an InputError naming keys and shapes. A tied
    weight stored once (``lm_head.weight`` saved as the embedding's) fills every name it has."""
    own = model.state_dict()
    sd = {**{k: sd[a] for k, a in tied_aliases(model).items() if k not in sd and a in sd}, **sd}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        if shapes:
            parts.append("shape differences: " + "; ".join(shapes[:6]) + (" ..." if len(shapes) > 6 else ""))
        raise InputError(
            f"{path} does not match the architecture {arch}: " + " | ".join(parts),
            hint="check the architecture and its arguments (e.g. layer sizes)",
        )
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # dtype or other incompatibility
        raise InputError(f"{path} does not load into the architecture {arch}: {str(e).splitlines()[0]}") from e


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Every name of a parameter shared by several modules (tied weights), mapped to its first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        if id(t) in first:
            out[n] = first[id(t)]
        else:
            first[id(t)] = n
    return {**out, **{f: n for n, f in out.items()}}


# --------------------------------------------------------------------------------------------
# formats


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ValueError...: all mean a damaged file
        raise InputError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else "") or type(e).__name__


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except Exception:  # not a zip, or a damaged one: torch.load will say what is wrong
        return False


def _load_torch(path: Path, trust: bool) -> tuple[Any, str]:
    """torch.load with weights_only=True; whole-module pickles only with trust."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True), "state_dict"
    except pickle.UnpicklingError as e:
        unsafe = "global" in str(e).lower() or "unsupported" in str(e).lower()
        if not unsafe:  # a damaged pickle, not a forbidden one
            raise InputError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from e
        if not trust:
            raise UnsafeCheckpointError(
                f"{path} holds a pickled object that is not plain tensors (likely a whole nn.Module); "
                "unpickling it can run arbitrary code, so fitcli refused to load it",
                hint="re-save it with torch.save(model.state_dict()) and give its architecture ({arch}), "
                "or pass {trust_checkpoint=True} if you trust where the file came from",
                setting=("trust_checkpoint", "arch"),
            ) from e
    except Exception as e:  # a damaged file raises all sorts (EOFError, struct.error, IndexError...)
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False), "pickled_module"
    except Exception as e:
        raise InputError(f"{path}: trusted unpickling failed: {type(e).__name__}: {str(e)[:200]}") from e


def _torchscript_weights(p: Path) -> dict[str, torch.Tensor]:
    """The weights of a TorchScript archive (its graph cannot be hooked)."""
    try:
        scripted = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        raise InputError(f"{p}: not a readable TorchScript archive ({_first_line(e)})") from e
    return {k: v.detach().clone() for k, v in scripted.state_dict().items()}


def _pickled_module(model: nn.Module, path: str, digest: str) -> LoadedModel:
    """A whole pickled module (only read when the checkpoint was trusted)."""
    model.eval()
    return LoadedModel(path=path, format="pickled_module", sha256=digest, state_dict=model.state_dict(),
                       module=model, arch=type(model).__name__,
                       notes=["whole pickled module loaded because the checkpoint was trusted"])


def load_model(
    path: str | Path,
    arch: Any = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    arch_label: str | None = None,
    lazy: bool = False,
) -> LoadedModel:
    """Load any supported checkpoint. ``arch``: a callable returning the ``nn.Module`` the state
    dict fills (``arch_label`` names it in the report). Raises InputError/UsageError with a
    one-line message. ``lazy`` (a ``.safetensors`` file with ``arch``): the weights are not read;
    the model's parameters stay unread allocations until ``fitcli.offload`` maps them from the file
    (a block-by-block audit, ``max_memory``); buffers are read."""
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except (OSError, ValueError) as e:  # e.g. a name too long for the file system
        raise InputError(f"checkpoint path is not usable: {str(e)[:200]}") from e
    if not exists:
        raise InputError(f"checkpoint not found: {path}")
    if is_dir:
        return _load_hf_dir(p, arch, lazy)
    if p.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    digest = sha256_of(p)
    suffix = p.suffix.lower()
    notes: list[str] = []

    if suffix == ".safetensors" and lazy and arch is not None:
        return _load_lazy(p, digest, arch, arch_kwargs, arch_label)
    if suffix == ".safetensors":
        sd = _load_safetensors(p)
        fmt = "safetensors"
    elif suffix == ".pt2":
        return _load_export(p, digest)
    elif _is_torchscript(p):
        sd, fmt = _torchscript_weights(p), "torchscript"
        notes.append(
            "TorchScript archive: its weights are read (weight metrics); activations need the architecture "
            "with the Python model, since compiled TorchScript graphs cannot be hooked"
        )
    else:
        obj, kind = _load_torch(p, trust_checkpoint)
        if kind == "pickled_module" and isinstance(obj, nn.Module):
            return _pickled_module(obj, str(path), digest)
        sd, fmt = _extract_state_dict(obj, str(path)), "pt"

    if fmt == "torchscript" and arch is None:
        return LoadedModel(path=str(path), format=fmt, sha256=digest, state_dict=sd, notes=notes)
    if arch is None:
        notes.append("bare state dict without an architecture: only weight metrics can run")
        return LoadedModel(path=str(path), format=fmt, sha256=digest, state_dict=sd, notes=notes)
    label = arch_label or arch_name(arch)
    model = build_arch(arch, arch_kwargs)
    load_strict(model, sd, str(path), label)
    no_cache(model).eval()
    return LoadedModel(
        path=str(path), format=fmt, sha256=digest, state_dict=model.state_dict(), module=model,
        arch=label, notes=notes, task=model_task(model),
    )


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built here get their parameters on the meta device (no memory, no init work);
    buffers, persistent or computed in ``__init__``, are made as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(module._parameters[name])
            module._parameters[name] = cls(module._parameters[name].to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _load_lazy(p: Path, digest: str, arch: Any, arch_kwargs: dict[str, Any] | None, arch_label: str | None
               ) -> LoadedModel:
    """The architecture with unread parameters (no page is touched until the offload maps the
    file) and its persistent buffers from the file; names and shapes checked against the file."""
    label = arch_label or arch_name(arch)
    with _parameters_on_meta():
        model = build_arch(arch, arch_kwargs)
    fill_lazy(model, p, label)
    no_cache(model)
    return LoadedModel(path=str(p), format="safetensors", sha256=digest, state_dict=dict(model.state_dict(keep_vars=True)),
                       module=model, arch=label, lazy=True, task=model_task(model), notes=[LAZY_NOTE])


FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
LAZY_NOTE = "weights not read: they are mapped from the file block by block during the audit"


def fill_lazy(model: nn.Module, p: Path, label: str) -> None:
    """Give ``model``'s meta parameters unread storage (``torch.empty`` in the file's dtype) and read
    its persistent buffers from the safetensors file ``p``. Tied parameters stay one parameter, and
    a tied weight stored once (under any of its names) is not missing."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:  # the header only: names and dtypes
            stored_dtypes = {k: FLOAT_DTYPES.get(f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:
        raise InputError(f"{p}: not a readable safetensors file ({_first_line(e)})") from e
    aliases: dict[int, list[str]] = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(t), []).append(n)
    made: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for m in model.modules():
            for n, t in list(m._parameters.items()):
                if t is not None and t.device.type == "meta":
                    if id(t) not in made:
                        dt = next((stored_dtypes[k] for k in aliases[id(t)] if k in stored_dtypes), None)
                        dt = dt if dt is not None and t.is_floating_point() else t.dtype
                        made[id(t)] = type(t)(torch.empty(t.shape, dtype=dt), requires_grad=t.requires_grad)
                    m._parameters[n] = made[id(t)]
    stored = set(stored_dtypes)
    own = set(model.state_dict())
    tied = {n for names in aliases.values() if stored & set(names) for n in names}
    missing, unexpected = sorted(own - stored - tied), sorted(stored - own)
    if missing or unexpected:
        raise InputError(f"{p} does not fit {label}: " + "; ".join(
            x for x in (f"missing keys {missing[:5]}" if missing else "",
                        f"unexpected keys {unexpected[:5]}" if unexpected else "") if x))
    persistent = own - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    try:
        with safe_open(str(p), framework="pt") as f:
            for name, buf in model.named_buffers():
                if name in persistent:
                    t = f.get_tensor(name)
                    if t.shape != buf.shape:
                        raise InputError(f"{p}: {name} is {list(t.shape)}, the model's buffer is {list(buf.shape)}")
                    buf.copy_(t)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{p}: not a readable safetensors file ({_first_line(e)})") from e
    model.eval()


def offload_source(loaded: LoadedModel) -> Path | None:
    """The safetensors file a block-by-block audit maps ``loaded``'s weights from: the checkpoint
    itself, or a Hugging Face folder's ``model.safetensors``; None when there is none."""
    if not loaded.path:
        return None
    p = Path(loaded.path)
    if loaded.format == "safetensors" and p.is_file():
        return p
    if loaded.format == "hf" and (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    return None


def _load_export(p: Path, digest: str) -> LoadedModel:
    try:
        ep = torch.export.load(str(p))
    except Exception as e:
        raise InputError(f"{p}: not a readable torch.export archive ({str(e).splitlines()[0][:200]})") from e
    try:
        gm = ep.module()
    except Exception as e:
        raise InputError(f"{p}: torch.export program cannot be turned into a module: {e}") from e
    sd = {k: v.detach() for k, v in ep.state_dict.items()}
    return LoadedModel(
        path=str(p), format="export", sha256=digest, state_dict=sd, module=gm, arch=None,
        exported=ep,
        notes=["torch.export program: layers are found in its aten graph; input shapes are fixed "
               "to those it was exported with unless it was exported with dynamic shapes"],
    )


def _hf_class(config: Any) -> Any:
    """The model class a folder's config names in ``architectures`` (its head), else AutoModel."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(name), None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def hf_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in a Hugging Face folder (padding on the right; the end-of-text token
    pads when the tokenizer has no padding token)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InputError("text data needs the 'hf' extra (pip install 'fitcli[hf]') for the tokenizer") from e
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")
    if not any((Path(folder) / f).is_file() for f in files):
        raise InputError(f"{folder}: no tokenizer in the folder (none of {', '.join(files)}); tokenise the text "
                         "yourself and give token data (input_ids, attention_mask)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise InputError(f"{folder}: no usable tokenizer in the folder ({first_line(e)})") from e
    tok.padding_side = "right"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError(f"{folder}: the tokenizer has neither a padding nor an end-of-text token")
        tok.pad_token = tok.eos_token
    return tok


def _load_hf_dir(p: Path, arch: Any, lazy: bool = False) -> LoadedModel:
    if not (p / "config.json").is_file():
        raise InputError(f"{p} is a directory without config.json (expected a Hugging Face model folder)")
    weights = p / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"{p}: no model.safetensors in the folder")
    digest = sha256_of(weights)
    try:
        import transformers
    except ImportError:
        return LoadedModel(
            path=str(p), format="hf", sha256=digest, state_dict=_load_safetensors(weights),
            notes=["Hugging Face folder read as a bare state dict: install the 'hf' extra "
                   "(pip install 'fitcli[hf]') for activation metrics"],
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
        cls = _hf_class(config)
        if lazy:  # built without its weights: fitcli.offload maps them from model.safetensors
            with _parameters_on_meta():
                model = cls(config) if cls is not transformers.AutoModel else cls.from_config(config)
        else:
            model = cls.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise InputError(f"{p}: transformers could not load it ({type(e).__name__}: {first_line(e)})") from e
    if lazy:
        fill_lazy(model, weights, f"transformers.{cls.__name__}")
    no_cache(model).eval()
    return LoadedModel(path=str(p), format="hf", sha256=digest, state_dict=dict(model.state_dict(keep_vars=lazy)),
                       module=model, arch=f"transformers.{cls.__name__}", task=model_task(model), lazy=lazy,
                       notes=[LAZY_NOTE] if lazy else [])
