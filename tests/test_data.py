"""Data specs (cli.md 'Data'): tensor files, callables, random:SHAPE; batching and errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fitcli.data import Batch, DataSource, as_batch, load_data, parse_random
from fitcli.errors import InputError, UsageError


def _batches(ds: DataSource) -> list[Batch]:
    return list(ds)


def _cat_inputs(batches: list[Batch]) -> torch.Tensor:
    return torch.cat([b.args[0] for b in batches])


def _cat_targets(batches: list[Batch]) -> torch.Tensor:
    return torch.cat([b.targets for b in batches])


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 3, generator=g), torch.randint(0, 4, (10,), generator=g)


def _write(tmp_path, fmt: str, payload: dict[str, torch.Tensor], stem: str = "d"):
    path = tmp_path / f"{stem}.{fmt}"
    if fmt == "safetensors":
        save_file(payload, str(path))
    else:
        torch.save(payload, path)
    return path


# ---------------------------------------------------------------------------------------------
# tensor files


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("keys", [("inputs", "targets"), ("x", "y")])
def test_tensor_file_inputs_targets_and_aliases(tmp_path, tensors, fmt, keys):
    x, y = tensors
    path = _write(tmp_path, fmt, {keys[0]: x, keys[1]: y})
    ds = load_data(str(path), batch_size=4)
    assert ds.has_targets is True
    batches = _batches(ds)
    assert [b.size for b in batches] == [4, 4, 2]  # last batch smaller, sizes add up to 10
    assert torch.equal(_cat_inputs(batches), x)
    assert torch.equal(_cat_targets(batches), y)
    assert all(b.kwargs == {} for b in batches)
    # re-iterable (entropy needs two passes) and identical on the second pass
    again = _batches(ds)
    assert torch.equal(_cat_inputs(again), x)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_tensor_file_without_targets(tmp_path, tensors, fmt):
    x, _ = tensors
    path = _write(tmp_path, fmt, {"inputs": x})
    ds = load_data(str(path), batch_size=64)
    assert ds.has_targets is False
    batches = _batches(ds)
    assert len(batches) == 1 and batches[0].targets is None
    assert torch.equal(batches[0].args[0], x)


def test_pt_file_bare_tensor_and_tuple(tmp_path, tensors):
    x, y = tensors
    bare = tmp_path / "bare.pt"
    torch.save(x, bare)
    b = _batches(load_data(str(bare), batch_size=100))
    assert len(b) == 1 and torch.equal(b[0].args[0], x) and b[0].targets is None
    pair = tmp_path / "pair.pt"
    torch.save((x, y), pair)
    ds = load_data(str(pair), batch_size=3)
    assert ds.has_targets
    bs = _batches(ds)
    assert [bb.size for bb in bs] == [3, 3, 3, 1]
    assert torch.equal(_cat_targets(bs), y)


@pytest.mark.parametrize("batch_size,n,expected", [(1, 5, [1] * 5), (5, 5, [5]), (3, 10, [3, 3, 3, 1]), (64, 10, [10]), (7, 20, [7, 7, 6])])
def test_batch_size_splitting(tmp_path, batch_size, n, expected):
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    path = _write(tmp_path, "safetensors", {"inputs": x})
    batches = _batches(load_data(str(path), batch_size=batch_size))
    assert [b.size for b in batches] == expected
    assert sum(b.size for b in batches) == n
    assert torch.equal(_cat_inputs(batches), x)  # in order, nothing dropped or repeated


def test_default_batch_size_is_64(repo, truth):
    data = repo / truth["mlp"]["data"]
    batches = _batches(load_data(str(data)))
    assert [b.size for b in batches] == [64] * 8  # 512 samples
    assert batches[0].args[0].shape == (64, *truth["mlp"]["input_shape"])
    assert batches[0].targets.dtype == torch.int64


@pytest.mark.parametrize("max_batches,expected", [(1, [4]), (2, [4, 4]), (3, [4, 4, 2]), (10, [4, 4, 2])])
def test_max_batches(tmp_path, tensors, max_batches, expected):
    x, y = tensors
    path = _write(tmp_path, "safetensors", {"inputs": x, "targets": y})
    batches = _batches(load_data(str(path), batch_size=4, max_batches=max_batches))
    assert [b.size for b in batches] == expected
    assert torch.equal(_cat_inputs(batches), x[: sum(expected)])


def test_integer_inputs_kept_for_embeddings_uint8_made_float(tmp_path):
    ids = torch.randint(0, 100, (6, 5))
    p = _write(tmp_path, "safetensors", {"inputs": ids}, "ids")
    assert _batches(load_data(str(p)))[0].args[0].dtype == torch.int64
    img = torch.randint(0, 255, (6, 1, 2, 2), dtype=torch.uint8)
    p = _write(tmp_path, "safetensors", {"inputs": img}, "img")
    got = _batches(load_data(str(p)))[0].args[0]
    assert got.is_floating_point() and torch.equal(got, img.float())


@pytest.mark.parametrize(
    "payload,needle",
    [
        ({"features": torch.zeros(4, 2)}, "features"),  # no inputs/x: lists what was found
        ({"inputs": torch.zeros(4, 2), "targets": torch.zeros(3)}, "targets"),  # length mismatch
        ({"inputs": torch.zeros(0, 2)}, "no samples"),
    ],
)
def test_tensor_file_errors(tmp_path, payload, needle):
    path = _write(tmp_path, "safetensors", payload)
    with pytest.raises(InputError) as ei:
        list(load_data(str(path)))
    assert needle in str(ei.value)


def test_missing_truncated_and_empty_data_files(tmp_path, repo, truth):
    with pytest.raises(InputError):
        load_data(str(tmp_path / "absent.safetensors"))
    src = (repo / truth["mlp"]["data"]).read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(src[: len(src) // 2])
    with pytest.raises(InputError):
        list(load_data(str(trunc)))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError):
        list(load_data(str(empty)))


class _Pwn:
    """Unpickling this creates a file (stand-in for arbitrary code in a data file)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_unsafe_pickle_data_file_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "obj.pt"
    torch.save({"inputs": torch.zeros(2, 2), "extra": _Pwn(str(target))}, path)
    with pytest.raises(InputError):
        list(load_data(str(path)))
    assert not target.exists(), "loading a data file ran code from it"


def test_bad_batch_size_and_max_batches(tmp_path, tensors):
    path = _write(tmp_path, "safetensors", {"inputs": tensors[0]})
    with pytest.raises(UsageError):
        load_data(str(path), batch_size=0)
    with pytest.raises(UsageError):
        load_data(str(path), max_batches=0)


# ---------------------------------------------------------------------------------------------
# callables

CALLABLES = '''
import torch

X = torch.arange(24, dtype=torch.float32).reshape(12, 2)
Y = torch.arange(12) % 3

def tuples():
    return [(X[i:i + 5], Y[i:i + 5]) for i in range(0, 12, 5)]

def bare():
    for i in range(0, 12, 4):
        yield X[i:i + 4]

def singletons():
    return [(X[:6],), [X[6:]]]

def kwargs():
    return [{"input_ids": X[:6], "attention_mask": torch.ones(6, 2), "labels": Y[:6]},
            {"input_ids": X[6:], "attention_mask": torch.ones(6, 2), "labels": Y[6:]}]

def kwargs_targets():
    return [{"input_ids": X, "targets": Y}]

def kwargs_only_labels():
    return [{"labels": Y}]

def many():
    return [X[i:i + 1] for i in range(12)]

def with_empty():
    return [X[:0], X[:3]]

def bad_items():
    return [(X, Y, Y)]

def not_tensors():
    return ["hello"]

def raises():
    raise ValueError("dataset is offline")

def raises_midway():
    yield X[:2]
    raise RuntimeError("disk on fire")

NOT_CALLABLE = 3
'''


@pytest.fixture
def data_module(tmp_path):
    path = tmp_path / "mydata.py"
    path.write_text(CALLABLES)
    ns: dict = {}
    exec(compile(CALLABLES, str(path), "exec"), ns)
    return path, ns


def test_callable_tuples(data_module):
    path, ns = data_module
    ds = load_data(f"{path}:tuples")
    batches = _batches(ds)
    assert [b.size for b in batches] == [5, 5, 2]
    assert torch.equal(_cat_inputs(batches), ns["X"])
    assert torch.equal(_cat_targets(batches), ns["Y"])
    assert len(_batches(ds)) == 3  # re-iterable


def test_callable_bare_tensors_from_generator(data_module):
    path, ns = data_module
    ds = load_data(f"{path}:bare")
    first, second = _batches(ds), _batches(ds)  # a fresh generator each pass
    assert [b.size for b in first] == [4, 4, 4]
    assert all(b.targets is None and b.kwargs == {} for b in first)
    assert torch.equal(_cat_inputs(first), ns["X"])
    assert torch.equal(_cat_inputs(second), ns["X"])


def test_callable_singletons(data_module):
    path, ns = data_module
    batches = _batches(load_data(f"{path}:singletons"))
    assert [b.size for b in batches] == [6, 6]
    assert all(b.targets is None for b in batches)


def test_callable_dict_of_kwargs(data_module):
    path, ns = data_module
    batches = _batches(load_data(f"{path}:kwargs"))
    assert len(batches) == 2
    for b, sl in zip(batches, (slice(0, 6), slice(6, 12)), strict=True):
        assert b.args == ()
        assert set(b.kwargs) == {"input_ids", "attention_mask"}  # labels are not a model input
        assert torch.equal(b.kwargs["input_ids"], ns["X"][sl])
        assert torch.equal(b.targets, ns["Y"][sl])
        assert b.size == 6
    b = _batches(load_data(f"{path}:kwargs_targets"))[0]
    assert set(b.kwargs) == {"input_ids"} and torch.equal(b.targets, ns["Y"])


def test_callable_max_batches_and_empty_batches_skipped(data_module):
    path, _ = data_module
    assert [b.size for b in _batches(load_data(f"{path}:many", max_batches=5))] == [1] * 5
    assert [b.size for b in _batches(load_data(f"{path}:with_empty"))] == [3]


@pytest.mark.parametrize("fn,needle", [
    ("bad_items", "3 items"),
    ("not_tensors", "str"),
    ("kwargs_only_labels", "labels"),
    ("raises", "dataset is offline"),
    ("raises_midway", "disk on fire"),
])
def test_callable_errors_are_input_errors(data_module, fn, needle):
    path, _ = data_module
    ds = load_data(f"{path}:{fn}")
    with pytest.raises(InputError) as ei:
        list(ds)
    assert needle in str(ei.value)


def test_callable_spec_errors(data_module, tmp_path):
    path, _ = data_module
    with pytest.raises(InputError):
        load_data(f"{path}:no_such_function")
    with pytest.raises(InputError):
        load_data(f"{path}:NOT_CALLABLE")
    with pytest.raises(InputError):
        load_data(f"{tmp_path / 'nofile.py'}:tuples")
    with pytest.raises(InputError):
        load_data("no_such_package_xyz.sub:fn")
    with pytest.raises((InputError, UsageError)):
        load_data("neither-a-file-nor-a-spec")


def test_as_batch_normalisation():
    x, y = torch.zeros(3, 2), torch.ones(3)
    assert as_batch(x).args[0] is x
    b = as_batch((x, y))
    assert b.args[0] is x and b.targets is y
    b = as_batch([x, None])
    assert b.targets is None and b.size == 3
    b = as_batch({"a": x, "labels": y})
    assert b.kwargs == {"a": x} and b.targets is y
    with pytest.raises(InputError):
        as_batch(42)


# ---------------------------------------------------------------------------------------------
# random


def test_random_spec_shapes_and_count():
    ds = load_data("random:1x4x4,n=10,seed=3", batch_size=4)
    batches = _batches(ds)
    assert [tuple(b.args[0].shape) for b in batches] == [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)]
    assert all(b.targets is None for b in batches)
    assert ds.has_targets is False
    assert parse_random("random:1x28x28") == ((1, 28, 28), 256, None)
    assert parse_random("random:16,n=8,seed=5") == ((16,), 8, 5)
    assert sum(b.size for b in _batches(load_data("random:3"))) == 256  # default n


def test_random_reproducible_per_seed():
    a = _cat_inputs(_batches(load_data("random:5,n=20,seed=7", batch_size=8)))
    b = _cat_inputs(_batches(load_data("random:5,n=20,seed=7", batch_size=8)))
    c = _cat_inputs(_batches(load_data("random:5,n=20,seed=8", batch_size=8)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ds = load_data("random:5,n=20,seed=7", batch_size=8)
    assert torch.equal(_cat_inputs(_batches(ds)), _cat_inputs(_batches(ds)))  # same data on every pass
    # standard normal, roughly
    big = _cat_inputs(_batches(load_data("random:100,n=100,seed=0")))
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05


def test_random_seed_falls_back_to_global_seed():
    a = _cat_inputs(_batches(load_data("random:4,n=6", seed=1)))
    b = _cat_inputs(_batches(load_data("random:4,n=6", seed=1)))
    c = _cat_inputs(_batches(load_data("random:4,n=6", seed=2)))
    d = _cat_inputs(_batches(load_data("random:4,n=6,seed=1", seed=2)))  # the spec's seed wins
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.parametrize("spec", [
    "random:", "random:abc", "random:4x", "random:x4", "random:0", "random:4x0", "random:4,n=0",
    "random:4,n=-3", "random:4,n=abc", "random:4,seed=1.5", "random:4,batch=3", "random:4,n=",
    "random:1x1x1x1x1x1x1", "random:4;n=3",
])
def test_bad_random_specs_are_input_errors(spec):
    """cli.md: a bad data spec is an input error (exit 3)."""
    with pytest.raises(InputError) as ei:
        load_data(spec)
    assert "random" in str(ei.value)


def test_every_source_cast_and_batch_wrapper_lives_in_the_data_module():
    """The library hands ``fitcli.data`` what the caller holds and gets batches back: no other
    module of the library makes batches out of the caller's data (a ``Batch(...)`` call)."""
    import ast
    from pathlib import Path

    import fitcli.data

    root = Path(fitcli.data.__file__).parent
    makers = []
    for name in ("api.py", "engine.py", "studies.py", "ablation.py", "validate.py"):
        tree = ast.parse((root / name).read_text())
        makers += [f"{name}:{n.lineno}" for n in ast.walk(tree)
                   if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Batch"]
        makers += [f"{name}:{n.lineno} class {n.name}" for n in ast.walk(tree)
                   if isinstance(n, ast.ClassDef) and "__iter__" in {f.name for f in n.body if hasattr(f, "name")}]
    assert not makers, makers
    x, y = torch.randn(10, 3), torch.arange(10)
    src = fitcli.data.source([(x[:6], y[:6]), (x[6:], y[6:])], dtype=torch.bfloat16)
    got = list(src)
    assert [b.args[0].dtype for b in got] == [torch.bfloat16] * 2  # the half model's inputs in its dtype
    assert all(b.targets.dtype == torch.int64 for b in got)  # targets as they were
    assert torch.equal(got[1].args[0], x[6:].to(torch.bfloat16))
    assert torch.equal(got[0][1], y[:6])  # the batch reads as the loader's item: (x, y)
    assert [b.size for b in fitcli.data.load_data(x, batch_size=4)] == [4, 4, 2]
    assert fitcli.data.source(None) is None
