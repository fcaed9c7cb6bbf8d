"""Layers, units and activation points (metrics.md 'Units, layers, observations')."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from strapi import load_model
from torch import nn

from fitcli.data import Batch
from fitcli.discovery import discover, unit_view, weight_layers
from fitcli.errors import FitcliError

SAMPLES = ["mlp", "cnn", "resmlp"]


# ---------------------------------------------------------------------------------------------
# the sample models against truth.json


@pytest.mark.parametrize("name", SAMPLES)
def test_discover_matches_truth(name, load_sample, truth):
    t = truth[name]
    lm = load_sample(name)
    g = discover(lm.module, lm.state_dict)
    assert g.method == "fx"
    heads = [lay for lay in g.layers if lay.point_kind == "heads"]  # MultiheadAttention heads: opt-in units
    assert [lay.name for lay in heads] == (["blocks.0.attn.heads", "blocks.1.attn.heads"] if name == "resmlp" else [])
    hidden = [lay.name for lay in g.layers if lay.point_kind == "hidden"]  # residual-stream channels: opt-in
    assert hidden == (["hidden"] if name == "resmlp" else [])
    g.layers = [lay for lay in g.layers if lay.point_kind not in ("heads", "hidden")]
    assert [lay.name for lay in g.layers] == list(t["layers"])  # names and forward order
    assert {lay.name: lay.units for lay in g.layers} == t["layers"]
    assert {lay.name: lay.point for lay in g.layers} == t["activation_points"]
    assert [lay.name for lay in g.layers if lay.final] == [t["final"]]
    # auditable layers that cannot be hooked are the truth's; every other parameterised module
    # (LayerNorm, MultiheadAttention's own projections) is listed with its type, never dropped
    # MultiheadAttention's out_proj is never called as a module, but its columns are the heads'
    # weights: it is covered by the heads layer, not listed
    hook = [u["name"] for u in g.unsupported if "cannot be hooked" in u["reason"]]
    assert hook == [u for u in t["unsupported"] if not u.endswith("attn.out_proj")]
    others = [u for u in g.unsupported if "cannot be hooked" not in u["reason"]]
    assert all(u["type"] == "LayerNorm" and "not an auditable layer type" in u["reason"] for u in others), others
    assert len(others) == (5 if name == "resmlp" else 0)
    mods = dict(lm.module.named_modules())
    for lay in g.layers:
        assert lay.weight is mods[lay.name].weight  # shares the model's parameters
        assert lay.type == type(mods[lay.name]).__name__
        assert lay.unit_dim == (1 if lay.type.startswith("Conv") else -1)
        if lay.point == lay.name:
            assert lay.point_kind == "output"
        elif "(" in lay.point:
            assert lay.point_kind == "function"
        else:
            assert lay.point_kind == "module" and lay.point in mods


@pytest.mark.parametrize("name", SAMPLES)
def test_discover_with_example_still_uses_fx(name, load_sample, truth, example_input):
    t = truth[name]
    lm = load_sample(name)
    g = discover(lm.module, lm.state_dict, example=Batch((example_input(t),)))
    assert g.method == "fx"
    assert {lay.name: lay.point for lay in g.layers if lay.point_kind not in ("heads", "hidden")} == t["activation_points"]


@pytest.mark.parametrize("name", SAMPLES)
def test_tap_captures_activation_points(name, load_sample, truth, example_input, hook_free):
    """Captured values equal what the truth's activation point gives with plain forward hooks."""
    t = truth[name]
    lm = load_sample(name)
    model = lm.module
    x = example_input(t, batch=3)
    g = discover(model, lm.state_dict)
    mods = dict(model.named_modules())
    acts = {"relu": F.relu, "gelu": F.gelu}
    want: dict[str, torch.Tensor] = {}
    handles = []
    for layer, point in t["activation_points"].items():
        if "(" in point:
            fn = acts[point.split("(")[0]]
            handles.append(mods[layer].register_forward_hook(lambda m, i, o, k=layer, fn=fn: want.__setitem__(k, fn(o))))
        else:
            handles.append(mods[point].register_forward_hook(lambda m, i, o, k=layer: want.__setitem__(k, o)))
    with torch.no_grad():
        ref_out = model(x)
    for h in handles:
        h.remove()
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad(), g.tap({n: (lambda h, n=n: got.__setitem__(n, h.clone()) or h) for n in t["layers"]}):
        out = g(Batch((x,)))
    assert torch.equal(out, ref_out)
    for n in t["layers"]:
        assert torch.equal(got[n], want[n]), n
    # planted dead units read exactly 0 at the activation point, the constant unit its value
    for layer, dead in t["dead"].items():
        lay = g.layer(layer)
        v = unit_view(got[layer], lay.unit_dim)
        for u in dead:
            assert torch.all(v[:, u] == 0), (layer, u)
    c = t["constant"]
    v = unit_view(got[c["layer"]], g.layer(c["layer"]).unit_dim)
    assert torch.allclose(v[:, c["unit"]], torch.full_like(v[:, c["unit"]], c["value"]), atol=1e-5)
    hook_free(model)


def test_weights_only_bare_state_dict(repo, truth):
    for name in ("mlp", "cnn"):
        t = truth[name]
        lm = load_model(repo / t["checkpoint"])  # no --arch
        assert lm.module is None
        g = discover(None, lm.state_dict)
        assert g.method == "weights"
        assert g.runner is None
        assert {lay.name: lay.units for lay in g.layers} == t["layers"]
        for lay in g.layers:
            assert lay.weight.dim() in (2, 4)
            assert torch.equal(lay.weight, lm.state_dict[f"{lay.name}.weight"])
            assert torch.equal(lay.bias, lm.state_dict[f"{lay.name}.bias"])
            assert lay.type == ("Linear" if lay.weight.dim() == 2 else "Conv2d")
        assert sum(lay.final for lay in g.layers) == 0  # the output layer is not guessed from key names
        assert any("output layer is unknown" in n for n in g.notes)
        with pytest.raises(FitcliError):  # nothing to run
            with g.tap({}):
                pass


def test_weight_layers_skips_non_matrix_weights():
    sd = {
        "norm.weight": torch.ones(4), "norm.bias": torch.zeros(4),  # 1-D: LayerNorm, not a layer
        "fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3),
        "conv.weight": torch.zeros(5, 2, 3, 3),
        "emb.weight_scale": torch.zeros(2),
        "running_mean": torch.zeros(3, 3),  # not a weight
    }
    g = weight_layers(sd)
    assert {lay.name: (lay.type, lay.units) for lay in g.layers} == {"fc": ("Linear", 3), "conv": ("Conv2d", 5)}
    assert g.layer("conv").bias is None


# ---------------------------------------------------------------------------------------------
# fx vs runtime discovery


class Acts(nn.Module):
    """Every activation spelling: F.relu, torch.relu, Tensor.relu, nn.ReLU module, F.gelu.

    ``branch=True`` adds data-dependent control flow, so torch.fx cannot trace it.
    """

    def __init__(self, branch: bool):
        super().__init__()
        self.branch = branch
        for i in range(1, 7):
            setattr(self, f"fc{i}", nn.Linear(8, 8))
        self.act = nn.ReLU()

    def forward(self, x):
        if self.branch and x.sum() > -1e9:
            x = x * 1.0
        x = F.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = self.fc3(x).relu()
        x = self.act(self.fc4(x))
        x = F.gelu(self.fc5(x))
        return self.fc6(x)


EXPECTED_POINTS = {"fc1": "relu(fc1)", "fc2": "relu(fc2)", "fc3": "relu(fc3)", "fc4": "act",
                   "fc5": "gelu(fc5)", "fc6": "fc6"}
EXPECTED_KINDS = {"fc1": "function", "fc2": "function", "fc3": "function", "fc4": "module",
                  "fc5": "function", "fc6": "output"}


def _pair():
    torch.manual_seed(0)
    traceable = Acts(branch=False)
    nontraceable = Acts(branch=True)
    nontraceable.load_state_dict(traceable.state_dict())
    return traceable, nontraceable


def _x():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def test_runtime_discovery_matches_fx():
    traceable, nontraceable = _pair()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(nontraceable)  # precondition: really not traceable
    g_fx = discover(traceable, example=Batch((_x(),)))
    g_rt = discover(nontraceable, example=Batch((_x(),)))
    assert g_fx.method == "fx"
    assert g_rt.method == "runtime"
    for g in (g_fx, g_rt):
        assert [lay.name for lay in g.layers] == list(EXPECTED_POINTS)
        assert {lay.name: lay.point for lay in g.layers} == EXPECTED_POINTS
        assert {lay.name: lay.point_kind for lay in g.layers} == EXPECTED_KINDS
        assert [lay.name for lay in g.layers if lay.final] == ["fc6"]
        assert all(lay.units == 8 for lay in g.layers)
    assert any("torch.fx" in n for n in g_rt.notes)


def test_runtime_without_example_says_data_is_needed():
    _, nontraceable = _pair()
    g = discover(nontraceable)
    assert g.method == "runtime"
    assert [lay.name for lay in g.layers] and all("unknown" in lay.point for lay in g.layers)
    assert any("give data" in n for n in g.notes)


def test_runtime_and_fx_capture_same_values_and_ablate_alike(hook_free):
    traceable, nontraceable = _pair()
    x = _x()
    g_fx = discover(traceable, example=Batch((x,)))
    g_rt = discover(nontraceable, example=Batch((x,)))

    def capture(g):
        got = {}
        with torch.no_grad(), g.tap({n: (lambda h, n=n: got.__setitem__(n, h.clone()) or h) for n in EXPECTED_POINTS}):
            out = g(Batch((x,)))
        return got, out

    got_fx, out_fx = capture(g_fx)
    got_rt, out_rt = capture(g_rt)
    assert set(got_fx) == set(got_rt) == set(EXPECTED_POINTS)
    for n in EXPECTED_POINTS:
        assert torch.equal(got_fx[n], got_rt[n]), n
    assert torch.equal(out_fx, out_rt)
    # the captured values really are post-nonlinearity (relu points are >= 0 and have zeros)
    for n in ("fc1", "fc2", "fc3", "fc4"):
        assert got_rt[n].min() >= 0 and (got_rt[n] == 0).any(), n
    assert (got_rt["fc5"] < 0).any()  # gelu lets small negatives through

    # ablation through tap: zeroing the most active unit of a point changes the output the same way
    def zero_unit_of(layer):
        u = int(got_fx[layer].abs().mean(0).argmax())

        def fn(h):
            h = h.clone()
            h[..., u] = 0
            return h
        return fn

    for layer in ("fc1", "fc4", "fc5"):
        with torch.no_grad(), g_fx.tap({layer: zero_unit_of(layer)}):
            a_fx = g_fx(Batch((x,)))
        with torch.no_grad(), g_rt.tap({layer: zero_unit_of(layer)}):
            a_rt = g_rt(Batch((x,)))
        assert not torch.equal(a_fx, out_fx), layer
        assert torch.allclose(a_fx, a_rt, atol=1e-6), layer
    with torch.no_grad():
        assert torch.equal(g_rt(Batch((x,))), nontraceable(x))  # nothing left installed
        assert torch.equal(g_fx(Batch((x,))), traceable(x))
    hook_free(traceable)
    hook_free(nontraceable)


# ---------------------------------------------------------------------------------------------
# no hook is ever left behind on the user's model


def _graphs():
    traceable, nontraceable = _pair()
    x = _x()
    return {
        "fx": (traceable, discover(traceable, example=Batch((x,)))),
        "runtime": (nontraceable, discover(nontraceable, example=Batch((x,)))),
    }


@pytest.mark.parametrize("method", ["fx", "runtime"])
def test_no_hooks_after_discovery_and_normal_tap(method, hook_free):
    model, g = _graphs()[method]
    assert g.method == method
    modules_before = [n for n, _ in model.named_modules()]
    hook_free(model)
    seen = []
    with g.tap({n: (lambda h, n=n: seen.append(n) or h) for n in EXPECTED_POINTS}):
        g(Batch((_x(),)))
    assert sorted(seen) == sorted(EXPECTED_POINTS)
    hook_free(model)
    assert [n for n, _ in model.named_modules()] == modules_before  # no probe grafted onto the user's model
    seen.clear()
    g(Batch((_x(),)))  # callbacks are gone too
    assert seen == []


@pytest.mark.parametrize("method", ["fx", "runtime"])
def test_no_hooks_after_forward_raises_inside_tap(method, hook_free):
    model, g = _graphs()[method]
    with pytest.raises(RuntimeError):
        with g.tap({"fc1": lambda h: h, "fc4": lambda h: h, "fc6": lambda h: h}):
            g(Batch((torch.randn(2, 3),)))  # wrong width: the forward raises
    hook_free(model)

    class Boom(Exception):
        pass

    def boom(h):
        raise Boom()

    with pytest.raises(Boom):
        with g.tap({"fc2": boom, "fc4": lambda h: h}):
            g(Batch((_x(),)))
    hook_free(model)
    with torch.no_grad():
        assert torch.equal(g(Batch((_x(),))), model(_x()))


@pytest.mark.parametrize("method", ["fx", "runtime"])
@pytest.mark.parametrize("callbacks", [("no_such_layer",), ("fc1", "no_such_layer"), ("fc4", "fc5", "nope")])
def test_no_hooks_after_bad_layer_name(method, callbacks, hook_free):
    model, g = _graphs()[method]
    with pytest.raises((KeyError, FitcliError)):
        with g.tap({n: (lambda h: h * 0) for n in callbacks}):
            g(Batch((_x(),)))
    hook_free(model)
    with torch.no_grad():  # a later plain forward is unaffected (no zeroing callback left over)
        assert torch.equal(g(Batch((_x(),))), model(_x()))


# ---------------------------------------------------------------------------------------------
# unit_view


def test_unit_view_layouts():
    lin = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3)  # [batch, units]
    v = unit_view(lin, -1)
    assert v.shape == (2, 3, 1) and torch.equal(v[:, 1, 0], lin[:, 1])
    seq = torch.randn(2, 5, 3)  # [batch, seq, units]: every position is an observation
    v = unit_view(seq, -1)
    assert v.shape == (2, 3, 5) and torch.equal(v[1, 2], seq[1, :, 2])
    conv = torch.randn(2, 4, 3, 3)  # [batch, channels, h, w]
    v = unit_view(conv, 1)
    assert v.shape == (2, 4, 9) and torch.equal(v[0, 3], conv[0, 3].flatten())


def test_score_through_runtime_hooks_equals_score_through_fx():
    """Every default metric, audited through the runtime fallback (module hooks + the
    TorchFunctionMode, with the per-batch statistics taken inside those callbacks) equals the same
    audit through the fx probes, on identical weights and data."""
    from fitcli.data import DataSource
    from fitcli.engine import audit
    from fitcli.loading import LoadedModel

    traceable, nontraceable = _pair()
    g = torch.Generator().manual_seed(5)
    batches = [Batch((torch.randn(n, 8, generator=g),), {}, torch.randint(0, 8, (n,), generator=g)) for n in (16, 9, 16)]
    data = DataSource("test", lambda: iter(batches), None)

    def run(model):
        loaded = LoadedModel("m", "memory", "-", model.state_dict(), module=model)
        return audit(loaded, data, device="cpu")

    fx, rt = run(traceable), run(nontraceable)
    assert fx.graph.method == "fx" and rt.graph.method == "runtime"
    assert set(fx.values) == set(rt.values) == set(EXPECTED_POINTS)
    for layer, metrics in fx.values.items():
        # weight_norm_out needs the consumers of each unit, which only a traced graph gives
        assert set(metrics) - set(rt.values[layer]) <= {"weight_norm_out"} and set(rt.values[layer]) <= set(metrics)
        for name, v in rt.values[layer].items():
            assert torch.allclose(metrics[name], v, rtol=1e-6, atol=1e-9, equal_nan=True), (layer, name)
        assert float(metrics["act_mean"].sum()) > 0 and float(metrics["taylor"].sum()) > 0  # fed, not empty


def test_runtime_discovery_marks_the_output_layer_final_when_heads_are_found():
    """Run-time discovery lists attention-head layers after the others (then the opt-in hidden
    channels of the residual stream); the output layer is still the final one (its units are the
    outputs: never dead weight)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
    from models import resmlp

    from fitcli.discovery import runtime_discover

    g = runtime_discover(resmlp().eval(), Batch((torch.randn(4, 6, 8),)))
    assert [lay.name for lay in g.layers][-3:] == ["blocks.0.attn.heads", "blocks.1.attn.heads", "hidden"]
    assert [lay.name for lay in g.layers if lay.final] == ["head"]
