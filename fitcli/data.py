"""Every data source, dtype cast and batch wrapper: what the caller holds -> re-iterable batches.

``load_data`` takes a DataLoader or any re-iterable of batches, a function returning one, a
tensor of inputs, or a data spec: a tensor file (``inputs``/``targets``, aliases ``x``/``y``;
token ids as ``input_ids`` or ``inputs`` beside an ``attention_mask``), a callable
(``pkg.mod:fn`` or ``file.py:fn``) returning an iterable of batches, or
``random:SHAPE[,n=N][,seed=S]`` / ``random:tokens=VOCAB``. ``source`` adds the cast a
half-precision model needs. Every item becomes a ``Batch``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fitcli.errors import InputError, UsageError


@dataclass
class Batch:
    """One batch: positional model inputs, keyword inputs, optional targets."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    targets: torch.Tensor | None = None
    # how the caller's data yielded it: ("tensor",), ("seq", tuple or list, items), ("dict", key of the targets)
    form: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def item(self) -> Any:
        """This batch as the caller's data yielded it (on the audit device): the tensor, the
        ``(inputs, targets)`` tuple or list, or the dict with the targets under their own key.
        A batch read from a file or spec reads as ``(inputs, targets)``, or as a dict of its
        keyword inputs and ``labels``."""
        kind = self.form[0] if self.form else ("dict" if self.kwargs else "seq")
        if kind == "tensor":
            return self.args[0]
        if kind == "dict":
            d = {**({"inputs": self.args[0]} if self.args else {}), **self.kwargs}
            if self.targets is not None:
                d[self.form[1] if self.form else "labels"] = self.targets
            return d
        seq, n = (self.form[1], self.form[2]) if self.form else (tuple, len(self.args) + (self.targets is not None))
        return seq([*self.args, self.targets][:n])

    def __getitem__(self, key: Any) -> Any:
        """``batch[1]``, ``batch["labels"]``, ``x, y = batch``: indexing reads ``item``."""
        return self.item[key]

    @property
    def mask(self) -> torch.Tensor | None:
        """The real-token mask ``[batch, tokens]`` (bool) of token data, or None: padding positions
        are not observations."""
        m = self.kwargs.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m.bool()
        return None

    @property
    def size(self) -> int:
        for v in (*self.args, *self.kwargs.values()):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
        return 1

    def to(self, device: torch.device | str) -> Batch:
        def mv(v: Any) -> Any:
            return v.to(device) if isinstance(v, torch.Tensor) else v

        return self.map(mv)

    def map(self, fn: Any, targets: bool = True) -> Batch:
        """The batch with ``fn`` applied to each of its inputs (and targets): same form."""
        return dataclasses.replace(self, args=tuple(fn(a) for a in self.args),
                                   kwargs={k: fn(v) for k, v in self.kwargs.items()},
                                   targets=fn(self.targets) if targets and self.targets is not None else self.targets)

    def select(self, rows: torch.Tensor) -> Batch:
        """The samples ``rows`` of this batch (every tensor with the batch in dim 0 is indexed)."""
        n = self.size

        def pick(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
                return v.index_select(0, rows.to(v.device))
            return v

        return self.map(pick)

    def describe(self) -> str:
        parts = [f"[{', '.join(map(str, a.shape))}]" for a in self.args if isinstance(a, torch.Tensor)]
        parts += [f"{k}=[{', '.join(map(str, v.shape))}]" for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)]
        return ", ".join(parts) or "no tensors"


def as_batch(item: Any, where: str = "data") -> Batch:
    """Normalise one item of a user iterable to a Batch."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, torch.Tensor):
        return Batch((item,), form=("tensor",))
    if isinstance(item, dict):
        kw = dict(item)
        key = "labels" if kw.get("labels") is not None else "targets"
        targets = kw.pop("labels", None)
        if targets is None:
            targets = kw.pop("targets", None)
        if not kw:
            raise InputError(f"{where}: a dict batch has no model inputs besides labels/targets")
        return Batch((), kw, targets, form=("dict", key))
    if isinstance(item, (tuple, list)):
        seq = tuple if isinstance(item, tuple) else list
        if len(item) == 2 and isinstance(item[0], torch.Tensor) and (item[1] is None or isinstance(item[1], torch.Tensor)):
            return Batch((item[0],), {}, item[1], form=("seq", seq, 2))
        if len(item) == 1 and isinstance(item[0], torch.Tensor):
            return Batch((item[0],), form=("seq", seq, 1))
        raise InputError(f"{where}: a batch tuple must be (inputs, targets) of tensors, got {len(item)} items")
    raise InputError(f"{where}: a batch must be a tensor, an (inputs, targets) tuple or a dict, got {type(item).__name__}")


class DataSource:
    """Re-iterable batches (entropy needs two passes). ``samples``/``batches`` fill in as we go."""

    def __init__(self, spec: str, factory, max_batches: int | None, has_targets: bool | None = None,
                 batches: int | None = None):
        self.spec = spec
        self._factory = factory
        self.max_batches = max_batches
        self.has_targets = has_targets
        self._batches = batches  # known for tensor files and random specs, else None

    @property
    def total(self) -> int | None:
        """Batches one pass yields, when known in advance (for progress bars)."""
        if self._batches is None:
            return self.max_batches
        return self._batches if self.max_batches is None else min(self._batches, self.max_batches)

    def __iter__(self) -> Iterator[Batch]:
        try:
            it = iter(self._factory())
        except InputError:
            raise
        except (Exception, SystemExit) as e:
            raise InputError(f"data {self.spec}: producing batches raised {type(e).__name__}: {e}") from e
        n = 0
        while self.max_batches is None or n < self.max_batches:
            try:
                item = next(it)
            except StopIteration:
                break
            except InputError:
                raise
            except (Exception, SystemExit) as e:
                raise InputError(f"data {self.spec}: batch {n} raised {type(e).__name__}: {e}") from e
            batch = as_batch(item, f"data {self.spec} batch {n}")
            if batch.size == 0:
                continue
            n += 1
            yield batch


def _tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise InputError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"data file is empty: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # any failure to parse means a damaged file
            raise InputError(f"{path}: not a readable safetensors data file ({str(e).splitlines()[0][:200]})") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"{path}: not a readable tensor file (loaded with weights_only=True: {str(e).splitlines()[0][:160]})"
        ) from e
    if isinstance(obj, torch.Tensor):
        return {"inputs": obj}
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2) and all(isinstance(t, torch.Tensor) for t in obj):
        return {"inputs": obj[0], **({"targets": obj[1]} if len(obj) == 2 else {})}
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict with 'inputs' (and 'targets'), got {type(obj).__name__}")
    return obj


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _token_source(path: Path, tensors: dict[str, torch.Tensor], batch_size: int) -> tuple[Any, int, bool]:
    """Token data: ``input_ids`` [N, T] (+ ``attention_mask``, ``token_type_ids``, ``labels``)."""
    ids = tensors["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] == 0 or ids.is_floating_point():
        raise InputError(f"{path}: 'input_ids' must be integer token ids of shape [samples, tokens]")
    inputs = {k: tensors[k] for k in TOKEN_KEYS if isinstance(tensors.get(k), torch.Tensor)}
    for k, v in inputs.items():
        if v.shape != ids.shape:
            raise InputError(f"{path}: '{k}' has shape {tuple(v.shape)}, 'input_ids' {tuple(ids.shape)}")
    labels = _first(tensors, TARGET_KEYS)
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.shape[0] != ids.shape[0]):
        raise InputError(f"{path}: 'labels' must have one row per sample ({ids.shape[0]})")

    def factory() -> Iterable[Batch]:
        for i in range(0, ids.shape[0], batch_size):
            yield Batch((), {k: v[i : i + batch_size] for k, v in inputs.items()},
                        None if labels is None else labels[i : i + batch_size])

    return factory, int(ids.shape[0]), labels is not None


INPUT_KEYS = ("input_ids", "inputs", "x")
TARGET_KEYS = ("labels", "targets", "y")
KNOWN_KEYS = ("inputs", "x", "targets", "y", "input_ids", "attention_mask", "token_type_ids", "labels")


def _first(tensors: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((tensors[k] for k in names if k in tensors), None)


def _unused(path: Path, tensors: dict[str, Any]) -> None:
    """A tensor of the file that no rule reads is refused, never dropped without a word."""
    extra = sorted(str(k) for k in tensors if k not in KNOWN_KEYS)
    if extra:
        raise InputError(f"{path}: the data file holds {', '.join(map(repr, extra))}, which fitcli does not read "
                         f"(it reads {', '.join(KNOWN_KEYS)}); remove {'them' if len(extra) > 1 else 'it'}, or give "
                         "the data as batches (dicts of the model's keyword inputs)")
    for role, names in (("inputs", INPUT_KEYS), ("targets", TARGET_KEYS)):
        both = [k for k in names if k in tensors]
        if len(both) > 1:
            raise InputError(f"{path}: the data file holds {' and '.join(map(repr, both))}: two tensors for the "
                             f"{role}; keep one")


def _token_extras(path: Path, tensors: dict[str, Any], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``attention_mask`` / ``token_type_ids`` beside token ids stored under ``inputs``: keyword
    inputs of the model (the mask also marks padding, which is not an observation)."""
    extras = {k: tensors[k] for k in TOKEN_KEYS[1:] if k in tensors}
    for k, v in extras.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(inputs.shape[:2]) or inputs.dim() < 2:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise InputError(f"{path}: '{k}' has shape {shape}; it must be [samples, tokens] like the inputs "
                             f"{tuple(inputs.shape)}")
    return extras


def _tensor_source(path: Path, batch_size: int) -> tuple[Any, int, bool]:
    tensors = _tensor_file(path)
    _unused(path, tensors)
    if "input_ids" in tensors:
        return _token_source(path, tensors, batch_size)
    inputs = _first(tensors, INPUT_KEYS)
    targets = _first(tensors, TARGET_KEYS)
    if not isinstance(inputs, torch.Tensor):
        raise InputError(f"{path}: no 'inputs' (or 'x') tensor; found: {', '.join(sorted(map(str, tensors))) or 'nothing'}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise InputError(f"{path}: 'inputs' holds no samples (shape {tuple(inputs.shape)})")
    if targets is not None:
        if not isinstance(targets, torch.Tensor):
            raise InputError(f"{path}: 'targets' is not a tensor")
        if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
            raise InputError(
                f"{path}: 'targets' has {tuple(targets.shape)} but 'inputs' has {inputs.shape[0]} samples"
            )
    extras = _token_extras(path, tensors, inputs)
    if inputs.is_floating_point() is False and inputs.dtype not in (torch.int64, torch.int32):
        inputs = inputs.float()

    def factory() -> Iterable[Batch]:
        for i in range(0, inputs.shape[0], batch_size):
            yield Batch((inputs[i : i + batch_size],), {k: v[i : i + batch_size] for k, v in extras.items()},
                        None if targets is None else targets[i : i + batch_size])

    return factory, int(inputs.shape[0]), targets is not None


_RANDOM = re.compile(r"^random:(?P<shape>\d{1,9}(?:x\d{1,9})*)(?P<rest>(?:,[a-z]+=[^,]+)*)$")


_TOKENS = re.compile(r"^random:tokens=(?P<vocab>\d{1,9})(?P<rest>(?:,[a-z]+=[^,]+)*)$")


def parse_random_tokens(spec: str) -> tuple[int, int, int, int | None]:
    """``random:tokens=VOCAB,len=L,n=N,seed=S`` -> (vocab, length, samples, seed)."""
    m = _TOKENS.match(spec.strip())
    if not m:
        raise InputError(f"data {spec!r}: expected random:tokens=VOCAB[,len=L][,n=N][,seed=S], "
                         "e.g. random:tokens=50257,len=64,n=32")
    vocab, length, n, seed = int(m.group("vocab")), 32, 64, None
    for kv in filter(None, m.group("rest").split(",")):
        k, _, v = kv.partition("=")
        if k not in ("len", "n", "seed"):
            raise InputError(f"data {spec!r}: unknown option {k!r} (allowed: len, n, seed)")
        if not v.isdigit() or len(v) > 12:
            raise InputError(f"data {spec!r}: {k} must be a non-negative integer, got {v!r}")
        if k == "len":
            length = int(v)
        elif k == "n":
            n = int(v)
        else:
            seed = int(v)
    if vocab < 1 or length < 1 or n < 1:
        raise InputError(f"data {spec!r}: tokens, len and n must be positive")
    if n * length > 2**26:
        raise InputError(f"data {spec!r}: {n * length} tokens is too many for synthetic data")
    return vocab, length, n, seed


def _random_tokens(spec: str, batch_size: int, max_batches: int | None, seed: int) -> DataSource:
    """Synthetic token data: integer ids uniform in [0, VOCAB), every position real."""
    vocab, length, n, s = parse_random_tokens(spec)
    s = seed if s is None else s

    def factory() -> Iterable[Batch]:
        g = torch.Generator().manual_seed(s)
        for i in range(0, n, batch_size):
            k = min(batch_size, n - i)
            ids = torch.randint(0, vocab, (k, length), generator=g, dtype=torch.int64)
            yield Batch((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    return DataSource(spec, factory, max_batches, has_targets=False, batches=-(-n // batch_size))


def parse_random(spec: str) -> tuple[tuple[int, ...], int, int | None]:
    m = _RANDOM.match(spec.strip())
    if not m:
        raise InputError(f"data {spec!r}: expected random:SHAPE[,n=N][,seed=S], e.g. random:1x28x28,n=256,seed=0")
    shape = tuple(int(s) for s in m.group("shape").split("x"))
    if any(s <= 0 for s in shape) or len(shape) > 6:
        raise InputError(f"data {spec!r}: every dimension of SHAPE must be positive (at most 6 dimensions)")
    n, seed = 256, None
    for kv in filter(None, m.group("rest").split(",")):
        k, _, v = kv.partition("=")
        if k not in ("n", "seed"):
            raise InputError(f"data {spec!r}: unknown option {k!r} (allowed: n, seed)")
        try:
            val = int(v) if len(v) <= 18 else int("x")
        except ValueError as e:
            raise InputError(f"data {spec!r}: {k} must be an integer, got {v!r}") from e
        if k == "n":
            n = val
        else:
            seed = val
    if n <= 0:
        raise InputError(f"data {spec!r}: n must be positive")
    numel = n
    for s in shape:
        numel *= s
    if numel > 2**28:  # 1 GiB of float32
        raise InputError(f"data {spec!r}: {numel} values is too large for synthetic data")
    return shape, n, seed


class TensorBatches:
    """A tensor of inputs (and optional targets) in batches of ``batch_size``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor | None, batch_size: int):
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size

    def __call__(self) -> Iterator[Batch]:
        for i in range(0, self.inputs.shape[0], self.batch_size):
            t = None if self.targets is None else self.targets[i : i + self.batch_size]
            yield Batch((self.inputs[i : i + self.batch_size],), {}, t)


def load_data(data: Any, batch_size: int = 64, max_batches: int | None = None, seed: int = 0) -> DataSource | None:
    """What the caller holds -> re-iterable batches (None stays None). ``data``: a DataLoader or
    any re-iterable of batches (tensors, ``(inputs, targets)`` pairs, dicts of model keyword
    inputs with optional ``labels``/``targets``), a function returning such an iterable, a tensor
    of inputs (split into ``batch_size`` batches), or a tensor file / data spec path. Errors are
    InputError/UsageError."""
    if data is None or isinstance(data, DataSource):
        return data
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches <= 0):
        raise UsageError(f"max_batches must be a positive integer, got {max_batches!r}")
    if isinstance(data, (str, Path)):
        return _load_spec(str(data), batch_size, max_batches, seed)
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise InputError(f"data tensor of shape {tuple(data.shape)} holds no samples")
        return DataSource(f"<tensor {list(data.shape)}>", TensorBatches(data, None, batch_size), max_batches,
                          has_targets=False, batches=-(-data.shape[0] // batch_size))
    name = f"<{type(data).__name__}>"
    if callable(data) and not isinstance(data, Iterable):
        return DataSource(name, data, max_batches)
    if not isinstance(data, Iterable) or isinstance(data, (dict, bytes)):
        raise UsageError(f"data must be an iterable of batches (a DataLoader, a list...), a function returning "
                         f"one, a tensor or a path, not {type(data).__name__}")
    if isinstance(data, Iterator):  # (calling iter() to find out would start a DataLoader: RNG draws)
        raise UsageError("data is a one-shot iterator (a generator?): give something that can be iterated "
                         "more than once (a list, a DataLoader) or a function that returns a fresh iterator")
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = None
    return DataSource(name, lambda: data, max_batches, batches=n)


HALF = (torch.float16, torch.bfloat16)


class HalfData:
    """The batches of ``data`` with their floating inputs cast to the model's half dtype (integer
    inputs such as token ids and the targets are left as they are)."""

    def __init__(self, data: Any, dtype: torch.dtype):
        self.data, self.dtype = data, dtype

    def __getattr__(self, name: str) -> Any:
        if name in ("data", "dtype"):
            raise AttributeError(name)
        return getattr(self.data, name)

    def __iter__(self) -> Iterator[Batch]:
        def cast(v: Any) -> Any:
            return v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        for b in self.data:
            yield b.map(cast, targets=False)


def half_data(data: Any, dtype: torch.dtype | None) -> Any:
    """``data`` fed to a model computing in ``dtype``: for a half-precision model, floating inputs
    in that dtype; anything else as it is."""
    if data is None or dtype not in HALF or isinstance(data, HalfData):
        return data
    return HalfData(data, dtype)


def source(data: Any, *, batch_size: int = 64, max_batches: int | None = None, seed: int = 0,
           dtype: torch.dtype | None = None) -> Any:
    """The batches an audit reads: ``load_data`` and, for a model computing in ``dtype`` (half
    precision), the cast of its floating inputs."""
    return half_data(load_data(data, batch_size=batch_size, max_batches=max_batches, seed=seed), dtype)


def _load_spec(spec: str, batch_size: int = 64, max_batches: int | None = None, seed: int = 0) -> DataSource:
    """Resolve a data spec into a DataSource. Errors are InputError/UsageError."""
    if batch_size <= 0:
        raise UsageError("batch_size must be positive")
    if max_batches is not None and max_batches <= 0:
        raise UsageError("max_batches must be positive")
    if spec.startswith("random:tokens="):
        return _random_tokens(spec, batch_size, max_batches, seed)
    if spec.startswith("random:"):
        shape, n, s = parse_random(spec)
        s = seed if s is None else s

        def factory() -> Iterable[Batch]:
            g = torch.Generator().manual_seed(s)
            for i in range(0, n, batch_size):
                yield Batch((torch.randn((min(batch_size, n - i), *shape), generator=g),))

        return DataSource(spec, factory, max_batches, has_targets=False, batches=-(-n // batch_size))
    path = Path(spec)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte...
        is_file = False
    if path.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin") or is_file:
        factory, n, has_t = _tensor_source(path, batch_size)
        return DataSource(spec, factory, max_batches, has_targets=has_t, batches=-(-n // batch_size))
    if ":" in spec:
        from fitcli.loading import resolve_callable

        fn = resolve_callable(spec, "data")

        def factory() -> Iterable[Any]:
            return fn()

        return DataSource(spec, factory, max_batches)
    raise InputError(
        f"data {spec!r}: not a file, a 'module:callable' or a 'random:SHAPE' spec",
        hint="e.g. data.safetensors, or random:1x28x28,n=256",
    )


def read_texts(path: str | Path) -> list[str]:
    """Samples of a text file: one per non-empty line, or for ``.jsonl`` the ``text`` field of
    each line's object."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(f"text file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read text file {path}: {e}") from e
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    if p.suffix.lower() != ".jsonl":
        texts = lines
    else:
        import json

        texts = []
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {i}: not JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f"{path} line {i}: expected an object with a 'text' string")
            texts.append(obj["text"])
    if not texts:
        raise InputError(f"text file {path} holds no text")
    return texts


def text_data(path: str | Path, tokenizer: Any, max_seq_len: int = 128, batch_size: int = 16,
              max_batches: int | None = None) -> DataSource:
    """A text file tokenised with ``tokenizer`` (a Hugging Face tokenizer): batches of
    ``input_ids`` and ``attention_mask``, padded on the right to the longest sample of the batch,
    truncated to ``max_seq_len`` tokens. Padding is not an observation."""
    if max_seq_len < 2:
        raise UsageError("max_seq_len must be at least 2")
    if batch_size <= 0:
        raise UsageError("batch_size must be positive")
    texts = read_texts(path)

    def factory() -> Iterable[Batch]:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_seq_len,
                            return_tensors="pt")
            yield Batch((), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})

    return DataSource(str(path), factory, max_batches, has_targets=False, batches=-(-len(texts) // batch_size))
