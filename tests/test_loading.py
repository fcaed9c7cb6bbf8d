"""Loading: every checkpoint format gives the same weights; unsafe pickles are refused; every bad
input is exit 3 (or 2 for a malformed flag) with a short message and no traceback."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from strapi import load_model

from fitcli.discovery import discover
from fitcli.errors import InputError, UnsafeCheckpointError

SAMPLES = ["mlp", "cnn", "resmlp"]


def _norm(text: str) -> str:
    """Whitespace-normalised text (the error console may wrap long lines)."""
    return " ".join(text.split())


def _script_or_trace(model: torch.nn.Module, x: torch.Tensor):
    try:
        return torch.jit.script(model)
    except Exception:  # source not retrievable etc.: tracing is fine for these models
        return torch.jit.trace(model, (x,))


@pytest.fixture
def formats(tmp_path, load_sample, truth, example_input):
    """``formats(name, kinds=None)``: write a sample model in every format (or just ``kinds``);
    return (reference LoadedModel from the shipped safetensors, {kind: path}, example input)."""

    def make(name: str, kinds: tuple[str, ...] | None = None):
        ref = load_sample(name)
        model = ref.module
        x = example_input(truth[name], batch=4)
        want = set(kinds) if kinds else {"pt_state_dict", "pt_wrapped_state_dict", "pickled_module",
                                         "export", "torchscript"}
        paths = {}
        if "pt_state_dict" in want:
            paths["pt_state_dict"] = tmp_path / f"{name}_sd.pt"
            torch.save(model.state_dict(), paths["pt_state_dict"])
        if "pt_wrapped_state_dict" in want:
            paths["pt_wrapped_state_dict"] = tmp_path / f"{name}_wrapped.pth"
            torch.save({"state_dict": model.state_dict(), "epoch": 3}, paths["pt_wrapped_state_dict"])
        if "pickled_module" in want:
            paths["pickled_module"] = tmp_path / f"{name}_module.pt"
            torch.save(model, paths["pickled_module"])
        if "export" in want:
            paths["export"] = tmp_path / f"{name}.pt2"
            torch.export.save(torch.export.export(model, (x,)), paths["export"])
        if "torchscript" in want:
            paths["torchscript"] = tmp_path / f"{name}_ts.pt"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(_script_or_trace(model, x), str(paths["torchscript"]))
        return ref, paths, x

    return make


@pytest.mark.parametrize("name", SAMPLES)
def test_every_format_loads_identical_weights(name, formats, truth, repo):
    ref, paths, x = formats(name)
    ref_sd = ref.state_dict
    arch_file, _, attr = truth[name]["arch"].rpartition(":")
    arch = f"{repo / arch_file}:{attr}"
    weight_keys = {f"{lay}.weight" for lay in truth[name]["layers"]}
    assert weight_keys <= set(ref_sd)

    loaded = {
        "pt_state_dict": load_model(paths["pt_state_dict"], arch=arch),
        "pt_state_dict_bare": load_model(paths["pt_state_dict"]),
        "pt_wrapped_state_dict": load_model(paths["pt_wrapped_state_dict"], arch=arch),
        "pickled_module": load_model(paths["pickled_module"], trust_checkpoint=True),
        "export": load_model(paths["export"]),
    }
    with warnings.catch_warnings():  # torch.jit.load is deprecated in recent torch
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded["torchscript"] = load_model(paths["torchscript"])
        loaded["torchscript_with_arch"] = load_model(paths["torchscript"], arch=arch)
    expected_format = {
        "pt_state_dict": "pt", "pt_state_dict_bare": "pt", "pt_wrapped_state_dict": "pt",
        "pickled_module": "pickled_module", "export": "export", "torchscript": "torchscript",
        "torchscript_with_arch": "torchscript",
    }
    for kind, lm in loaded.items():
        assert lm.format == expected_format[kind], kind
        sd = lm.state_dict
        common = set(sd) & set(ref_sd)
        # every auditable layer's weight is among the compared keys (the comparison is not vacuous)
        assert weight_keys <= common, (kind, sorted(weight_keys - common))
        for k in sorted(common):
            assert sd[k].shape == ref_sd[k].shape, (kind, k)
            assert sd[k].dtype == ref_sd[k].dtype, (kind, k)
            assert torch.equal(sd[k], ref_sd[k]), f"{kind}: {k} differs from the safetensors weights"
        assert len(lm.sha256) == 64

    # state dict formats hold exactly the same keys
    for kind in ("pt_state_dict", "pt_state_dict_bare", "pt_wrapped_state_dict", "pickled_module",
                 "torchscript", "torchscript_with_arch"):
        assert set(loaded[kind].state_dict) == set(ref_sd), kind

    # runnable formats compute the same function
    with torch.no_grad():
        want = ref.module(x)
        for kind in ("pt_state_dict", "pt_wrapped_state_dict", "pickled_module", "export", "torchscript_with_arch"):
            assert loaded[kind].module is not None, kind
            assert torch.allclose(loaded[kind].module(x), want, rtol=1e-4, atol=1e-5), kind

    # a bare state dict / TorchScript without --arch is weight-only, and says so
    assert loaded["pt_state_dict_bare"].module is None
    assert not loaded["pt_state_dict_bare"].runnable
    ts = loaded["torchscript"]
    assert ts.module is None and not ts.runnable
    assert any("TorchScript" in n for n in ts.notes), ts.notes
    assert any("architecture" in n for n in ts.notes), ts.notes
    assert isinstance(loaded["pickled_module"].module, torch.nn.Module)
    assert loaded["export"].exported is not None


def test_pickled_module_refused_without_trust(formats):
    _, paths, _ = formats("mlp", ("pickled_module",))
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_model(paths["pickled_module"])
    assert "trust_checkpoint=True" in str(ei.value)
    assert isinstance(ei.value, InputError) and ei.value.exit_code == 3


def test_pickled_module_cli_needs_trust(formats, run_cli, truth):
    _, paths, _ = formats("mlp", ("pickled_module",))
    code, out, err = run_cli(["inspect", str(paths["pickled_module"]), "--format", "json"])
    assert code == 3
    assert "--trust-checkpoint" in _norm(err) and "Traceback" not in err
    code, out, err = run_cli(["inspect", str(paths["pickled_module"]), "--trust-checkpoint", "--format", "json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["model"]["format"] == "pickled_module"
    assert {x["name"]: x["activation_point"] for x in info["layers"]} == truth["mlp"]["activation_points"]


def _activations_by_hooks(model: torch.nn.Module, x: torch.Tensor, points: dict[str, str]) -> dict[str, torch.Tensor]:
    """Reference activations from the plain Python model with forward hooks.

    ``points`` maps layer -> truth activation point: a module name (hook its output), ``fn(layer)``
    (hook the layer output and apply fn), or the layer itself (its output).
    """
    import torch.nn.functional as F

    fns = {"relu": F.relu, "gelu": F.gelu}
    mods = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []
    for layer, point in points.items():
        if "(" in point:
            fn = fns[point.split("(")[0]]
            handles.append(mods[layer].register_forward_hook(lambda m, i, o, layer=layer, fn=fn: got.__setitem__(layer, fn(o))))
        else:
            handles.append(mods[point].register_forward_hook(lambda m, i, o, layer=layer: got.__setitem__(layer, o)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("name", ["mlp", "cnn", "resmlp"])
def test_export_pt2_layers_points_and_capture(name, formats, truth):
    ref, paths, x = formats(name, ("export",))
    t = truth[name]
    lm = load_model(paths["export"])
    assert lm.runnable
    g = discover(lm.module, lm.state_dict, exported=True)
    assert g.method == "export"
    found = {lay.name: lay for lay in g.layers}
    if name == "resmlp":
        # the aten graph also exposes MultiheadAttention's projections; truth's layers must be there,
        # in order, with their unit counts
        names = [lay.name for lay in g.layers if lay.name in t["layers"]]
        assert names == list(t["layers"])
    else:
        assert [lay.name for lay in g.layers] == list(t["layers"])
    for layer, units in t["layers"].items():
        lay = found[layer]
        assert lay.units == units, layer
        if layer == t["final"]:
            assert lay.point_kind == "output" and lay.point == layer
        elif t["activation_points"][layer] == layer:  # no nonlinearity follows
            assert lay.point_kind == "output" and lay.point == layer
        else:
            # module ReLU and functional relu both become aten relu in an exported graph
            fn = "gelu" if name == "resmlp" else "relu"
            assert lay.point_kind == "function", layer
            assert lay.point == f"{fn}({layer})", layer
    assert [lay.name for lay in g.layers if lay.final] == [t["final"]]

    want = _activations_by_hooks(ref.module, x, t["activation_points"])
    captured: dict[str, torch.Tensor] = {}

    def grab(layer):
        def fn(h):
            captured[layer] = h.detach().clone()
            return h
        return fn

    with torch.no_grad(), g.tap({layer: grab(layer) for layer in t["layers"]}):
        out = g.runner(x)
    assert set(captured) == set(t["layers"])
    for layer in t["layers"]:
        assert captured[layer].shape == want[layer].shape, layer
        assert torch.allclose(captured[layer], want[layer], rtol=1e-4, atol=1e-5), layer
    with torch.no_grad():
        assert torch.allclose(out, ref.module(x), rtol=1e-4, atol=1e-5)

    # tap can also change the activation (ablation): zeroing the last hidden point changes outputs
    hidden = [n for n in t["layers"] if n != t["final"]][-1]
    with torch.no_grad(), g.tap({hidden: torch.zeros_like}):
        ablated = g.runner(x)
    with torch.no_grad():
        after = g.runner(x)
    assert not torch.allclose(ablated, out)
    assert torch.allclose(after, out, atol=1e-6), "tap left a callback installed"


def test_export_pt2_inspect_cli(formats, run_cli):
    _, paths, _ = formats("cnn", ("export",))
    code, out, err = run_cli(["inspect", str(paths["export"]), "--format", "json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["model"]["format"] == "export"
    assert info["discovery"]["method"] == "export"
    assert [x["name"] for x in info["layers"]] == ["conv1", "conv2", "fc1", "fc2"]


# ---------------------------------------------------------------------------------------------
# unsafe pickle


class _Pwn:
    """Unpickling this creates a file (stand-in for arbitrary code execution)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture
def evil_pt(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _Pwn(str(target))}, path)
    assert not target.exists()
    return path, target


def test_unsafe_pickle_refused_by_api(evil_pt, repo):
    path, target = evil_pt
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_model(path)
    assert "trust_checkpoint=True" in str(ei.value)
    assert not target.exists(), "unpickling ran code from the checkpoint"
    with pytest.raises(UnsafeCheckpointError):
        load_model(path, arch=f"{repo / 'sample_models' / 'models.py'}:mlp")
    assert not target.exists()


def test_unsafe_pickle_refused_by_cli(evil_pt, run_cli):
    path, target = evil_pt
    code, out, err = run_cli(["inspect", str(path)])
    assert code == 3
    assert "--trust-checkpoint" in _norm(err)
    assert "Traceback" not in err
    assert out == ""
    assert not target.exists(), "unpickling ran code from the checkpoint"


def test_unsafe_pickle_runs_only_with_trust(evil_pt):
    # sanity check that the payload is real: trusting the file does execute it
    path, target = evil_pt
    with pytest.raises(InputError):  # it holds no state dict / module
        load_model(path, trust_checkpoint=True)
    assert target.exists()


# ---------------------------------------------------------------------------------------------
# bad inputs: exit 3 (2 for a malformed flag), short message, no traceback


def _truncate(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture
def bad_inputs(tmp_path, repo):
    """name -> (argv, expected exit code, substrings expected in stderr)."""
    mlp = repo / "sample_models" / "mlp.safetensors"
    models = repo / "sample_models" / "models.py"
    trunc_st = _truncate(mlp, tmp_path / "trunc.safetensors")
    sd_pt = tmp_path / "mlp.pt"
    from safetensors.torch import load_file

    torch.save(load_file(str(mlp)), sd_pt)
    trunc_pt = _truncate(sd_pt, tmp_path / "trunc.pt")
    return {
        "truncated_safetensors": (["inspect", str(trunc_st)], 3, [str(trunc_st.name), "safetensors"]),
        "truncated_pt": (["inspect", str(trunc_pt)], 3, [str(trunc_pt.name)]),
        "missing_file": (["inspect", str(tmp_path / "nope.safetensors")], 3, ["not found", "nope.safetensors"]),
        "arch_mismatch": (["inspect", str(mlp), "--arch", f"{models}:cnn"], 3,
                          ["missing keys", "conv1.weight", "unexpected keys", "fc3.weight"]),
        "arch_kwargs_mismatch": (["inspect", str(mlp), "--arch", f"{models}:MLP", "--arch-kwargs", '{"hidden": 64}'], 3,
                                 ["shape differences", "fc1.weight", "(32, 16)", "(64, 16)"]),
        "arch_kwargs_not_accepted": (["inspect", str(mlp), "--arch", f"{models}:mlp", "--arch-kwargs", '{"hidden": 64}'], 3,
                                     ["hidden"]),
        "arch_no_colon": (["inspect", str(mlp), "--arch", "sample_models/models.py"], 3, ["--arch", "callable"]),
        "arch_file_missing": (["inspect", str(mlp), "--arch", f"{tmp_path / 'nofile.py'}:mlp"], 3,
                              ["not found", "nofile.py"]),
        "arch_attr_missing": (["inspect", str(mlp), "--arch", f"{models}:mpl"], 3, ["mpl", "mlp"]),
        "arch_kwargs_bad_json": (["inspect", str(mlp), "--arch", f"{models}:MLP", "--arch-kwargs", "{hidden"], 2,
                                 ["--arch-kwargs", "JSON"]),
        "data_shape_mismatch": (["score", str(mlp), "--arch", f"{models}:mlp", "--data", "random:10,n=8",
                                 "--metric", "act_mean", "--quiet"], 3, ["10", "16"]),
    }


BAD_CASES = ["truncated_safetensors", "truncated_pt", "missing_file", "arch_mismatch", "arch_kwargs_mismatch",
             "arch_kwargs_not_accepted", "arch_no_colon", "arch_file_missing", "arch_attr_missing",
             "arch_kwargs_bad_json", "data_shape_mismatch"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exit_code_and_message(case, bad_inputs, run_cli):
    argv, want_code, needles = bad_inputs[case]
    code, out, err = run_cli(argv)
    assert code == want_code, (code, err)
    assert "Traceback" not in err
    assert err.startswith("fitcli: error: "), err
    assert "unexpected" not in err.splitlines()[0][:40], "reported as an internal error"
    msg = _norm(err)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert out == ""


def test_error_messages_are_one_or_two_lines(bad_inputs, run_cli):
    """cli.md: 'Errors are one or two readable lines on stderr' (the message, then an optional
    hint line). Checked for every bad input at once: a failure lists each offending case."""
    problems = []
    for case in BAD_CASES:
        argv, _, _ = bad_inputs[case]
        _, _, err = run_cli(argv)
        lines = err.rstrip("\n").splitlines()
        ok = (1 <= len(lines) <= 2 and lines[0].startswith("fitcli: error: ")
              and (len(lines) == 1 or lines[1].lstrip().startswith("hint:")))
        if not ok:
            problems.append(f"[{case}] {len(lines)} lines:\n{err}")
    assert not problems, f"{len(problems)}/{len(BAD_CASES)} error messages are wrapped or too long:\n" + "\n".join(problems)


def test_bad_inputs_raise_typed_errors_from_api(repo, tmp_path):
    mlp = repo / "sample_models" / "mlp.safetensors"
    models = repo / "sample_models" / "models.py"
    trunc = _truncate(mlp, tmp_path / "t2.safetensors")
    with pytest.raises(InputError):
        load_model(trunc)
    with pytest.raises(InputError):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(InputError) as ei:
        load_model(mlp, arch=f"{models}:cnn")
    assert "missing keys" in str(ei.value) and "unexpected keys" in str(ei.value)
    with pytest.raises(InputError) as ei:
        load_model(mlp, arch=f"{models}:MLP", arch_kwargs='{"hidden": 64}')
    assert "shape differences" in str(ei.value)
    with pytest.raises(InputError):  # cli.md: a bad --arch spec is an input error (exit 3)
        load_model(mlp, arch="no_colon_here")
    with pytest.raises(InputError):
        load_model(mlp, arch=f"{models}:does_not_exist")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError):
        load_model(empty)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(InputError):
        load_model(garbage)
    # a .pt holding something other than tensors (a plain list of ints is weights_only-safe)
    odd = tmp_path / "odd.pt"
    torch.save([1, 2, 3], odd)
    with pytest.raises(InputError):
        load_model(odd)


NONTRACEABLE = '''
import torch, torch.nn as nn, torch.nn.functional as F

class NT(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > -1e9:
            x = x * 1.0
        return self.fc2(F.relu(self.fc1(x)))

def make():
    return NT()
'''


@pytest.mark.parametrize("command", ["inspect", "score"])
def test_data_shape_mismatch_nontraceable_model_is_input_error(command, tmp_path, run_cli):
    """A model that only runtime discovery can handle must report a data/model shape mismatch as
    exit 3 naming both shapes, like a traceable one (not exit 4 'unexpected RuntimeError')."""
    mod = tmp_path / "nt.py"
    mod.write_text(NONTRACEABLE)
    ns: dict = {}
    exec(compile(NONTRACEABLE, str(mod), "exec"), ns)
    ckpt = tmp_path / "nt.safetensors"
    save_file(ns["make"]().state_dict(), str(ckpt))
    argv = [command, str(ckpt), "--arch", f"{mod}:make", "--data", "random:5,n=4", "--quiet"]
    if command == "score":
        argv += ["--metric", "act_mean"]
    ok = run_cli([command, str(ckpt), "--arch", f"{mod}:make", "--data", "random:8,n=4", "--quiet"])
    assert ok.code == 0, ok.stderr
    code, out, err = run_cli(argv)
    assert "Traceback" not in err
    assert code == 3, err
    msg = _norm(err)
    assert "5" in msg and "8" in msg
    assert "unexpected" not in msg
