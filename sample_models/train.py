"""Deterministically (re)generate the sample models, data and truth.json.

Usage (from the repo root or from inside sample_models/):

    python sample_models/train.py

For each model (mlp, cnn, resmlp) this writes, next to this file:

    <name>_data.safetensors   synthetic dataset: inputs (float32), targets (int64)
    <name>_init.safetensors   initial weights (after planting, before training)
    <name>.safetensors        trained weights

then reloads the shipped files, verifies the planted facts with forward hooks,
and only if every check passes writes truth.json. Any failed check exits
non-zero and removes truth.json (the checkpoints no longer match it).

Planted units (enforced at init and re-set after every optimizer step):
  * dead units: incoming weights 0 and bias 0 -> activation exactly 0;
  * one constant unit per model: incoming weights 0 and bias c -> activation
    exactly act(c) on every input.

Training knobs chosen so every verification passes with margin (see SPECS):
10% label noise (keeps the loss away from 0 so ablations are measurable), a
small positive bias init on some ReLU layers (no naturally dead units), and
the constant unit's outgoing weights scaled up at init (the model genuinely
relies on it, so zero-ablating it hurts while mean-replacing it is a no-op).
The *_init.safetensors baseline is saved after these tweaks and planting.
"""

import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # keep sample_models/ free of __pycache__

import models  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

N_SAMPLES = 512
N_CLASSES = 4
REL = "sample_models"  # paths in truth.json are relative to the repo root

# --------------------------------------------------------------------------
# Per-model specification
# --------------------------------------------------------------------------
# activation_points: layer -> where its activation is observed.
#   a module name   -> output of that module (e.g. "relu1")
#   "<fn>(<layer>)" -> fn applied to that layer's output
#   "<layer>"       -> the layer's own output (no elementwise nonlinearity)
# ablate_site: where the verification hook overwrites the constant unit's
#   activation: (module, "output") or (module, "input") (forward pre-hook on
#   the module that consumes the activation).

SPECS = {
    "mlp": dict(
        cls="MLP",
        factory="mlp",
        input_shape=[16],
        seed=2,
        lr=3e-3,
        steps=250,
        label_noise=0.1,
        # a small positive fc2 bias keeps all unplanted fc2 units well alive
        bias_init={"fc2": 0.6},
        consumer_scale=("fc3", 4.0),
        activation_points={"fc1": "relu1", "fc2": "relu2", "fc3": "fc3"},
        final="fc3",
        dead={"fc1": [3, 17], "fc2": [5, 20]},
        constant=dict(layer="fc2", unit=9, bias=5.0, act="relu"),
        ablate_site=("relu2", "output"),
        unsupported=[],
    ),
    "cnn": dict(
        cls="CNN",
        factory="cnn",
        input_shape=[1, 8, 8],
        seed=2,
        lr=3e-3,
        steps=800,
        label_noise=0.1,
        # fc1 sees pooled, non-negative, nearly sample-independent features
        # (incl. the constant 4.0 channel); a positive bias keeps every fc1
        # unit alive at init so no unit is naturally dead.
        bias_init={"fc1": 1.0},
        activation_points={
            "conv1": "relu(conv1)",
            "conv2": "relu(conv2)",
            "fc1": "relu(fc1)",
            "fc2": "fc2",
        },
        final="fc2",
        dead={"conv1": [2], "conv2": [4, 11], "fc1": []},
        constant=dict(layer="conv2", unit=6, bias=4.0, act="relu"),
        # relu is the identity on the values written here (0 and a positive
        # mean), so overwriting the conv2 output overwrites relu(conv2).
        ablate_site=("conv2", "output"),
        unsupported=[],
    ),
    "resmlp": dict(
        cls="ResMLP",
        factory="resmlp",
        input_shape=[6, 8],
        seed=7,
        lr=1e-3,
        steps=300,
        label_noise=0.1,
        consumer_scale=("blocks.1.fc_out", 16.0),
        activation_points={
            "embed": "embed",
            "blocks.0.fc_in": "gelu(blocks.0.fc_in)",
            "blocks.0.fc_out": "blocks.0.fc_out",
            "blocks.1.fc_in": "gelu(blocks.1.fc_in)",
            "blocks.1.fc_out": "blocks.1.fc_out",
            "head": "head",
        },
        final="head",
        dead={
            "embed": [],
            "blocks.0.fc_in": [7],
            "blocks.0.fc_out": [],
            "blocks.1.fc_in": [3, 30],
            "blocks.1.fc_out": [],
        },
        constant=dict(layer="blocks.1.fc_in", unit=12, bias=3.0, act="gelu"),
        # blocks.1.fc_out's input is exactly gelu(blocks.1.fc_in(...)).
        ablate_site=("blocks.1.fc_out", "input"),
        unsupported=["blocks.0.attn.out_proj", "blocks.1.attn.out_proj"],
    ),
}

ACTS = {"relu": F.relu, "gelu": F.gelu}

FAILURES = []


def check(cond, msg):
    status = "ok  " if cond else "FAIL"
    print(f"    [{status}] {msg}")
    if not cond:
        FAILURES.append(msg)


# --------------------------------------------------------------------------
# Data: standard-normal inputs, labels from a fixed random teacher
# --------------------------------------------------------------------------


PRIOR = torch.tensor([0.4, 0.0, -0.2, -0.4])


def _teacher_labels(logits):
    # Centre and scale each class logit over the dataset, then add a fixed
    # class prior so the classes are mildly imbalanced (the constant unit then
    # has a useful job: carrying the class prior).
    z = (logits - logits.mean(dim=0, keepdim=True)) / logits.std(dim=0, keepdim=True)
    return (z + PRIOR).argmax(dim=1)


def make_data(name, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    shape = SPECS[name]["input_shape"]
    x = torch.randn(N_SAMPLES, *shape, generator=g)
    if name == "mlp":
        w1 = torch.randn(16, 8, generator=g)
        w2 = torch.randn(8, N_CLASSES, generator=g)
        logits = F.relu(x @ w1) @ w2
    elif name == "cnn":
        filt = torch.randn(N_CLASSES, 1, 3, 3, generator=g)
        logits = F.relu(F.conv2d(x, filt, padding=1)).mean(dim=(2, 3))
    elif name == "resmlp":
        a = torch.randn(8, 8, generator=g)
        b = torch.randn(8, N_CLASSES, generator=g)
        logits = F.relu(x @ a).mean(dim=1) @ b
    else:
        raise ValueError(name)
    y = _teacher_labels(logits).to(torch.int64)
    # Label noise keeps the trained model from becoming arbitrarily confident
    # (so ablation effects stay measurable in the loss).
    flip = torch.rand(N_SAMPLES, generator=g) < SPECS[name].get("label_noise", 0.0)
    rand = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g)
    y = torch.where(flip, rand, y)
    return x.contiguous(), y.contiguous()


# --------------------------------------------------------------------------
# Planting
# --------------------------------------------------------------------------


@torch.no_grad()
def plant(model, spec):
    mods = dict(model.named_modules())
    for layer, units in spec["dead"].items():
        if units:
            m = mods[layer]
            m.weight[units] = 0.0
            m.bias[units] = 0.0
    c = spec["constant"]
    m = mods[c["layer"]]
    m.weight[c["unit"]] = 0.0
    m.bias[c["unit"]] = c["bias"]


def save(tensors, fname):
    path = os.path.join(HERE, fname)
    save_file(tensors, path)
    os.chmod(path, 0o644)


def state(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def train(name):
    spec = SPECS[name]
    x, y = make_data(name, spec["seed"])
    save({"inputs": x, "targets": y}, f"{name}_data.safetensors")

    torch.manual_seed(spec["seed"])
    model = getattr(models, spec["factory"])()
    with torch.no_grad():
        for layer, b in spec.get("bias_init", {}).items():
            model.get_submodule(layer).bias.fill_(b)
        if "consumer_scale" in spec:
            # Scale the constant unit's outgoing weights so the network
            # genuinely depends on it (learns to compensate around it).
            layer, k = spec["consumer_scale"]
            model.get_submodule(layer).weight[:, spec["constant"]["unit"]] *= k
    plant(model, spec)
    save(state(model), f"{name}_init.safetensors")

    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    model.train()
    for step in range(spec["steps"]):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        plant(model, spec)
    save(state(model), f"{name}.safetensors")
    print(f"  trained {name}: final train loss {loss.item():.4f}")


# --------------------------------------------------------------------------
# Verification (on the shipped files, with forward hooks)
# --------------------------------------------------------------------------


def parse_point(point):
    """'relu(conv1)' -> ('relu', 'conv1'); 'relu1' -> (None, 'relu1')."""
    if point.endswith(")") and "(" in point:
        fn, inner = point[:-1].split("(", 1)
        return fn, inner
    return None, point


def load_shipped(name):
    spec = SPECS[name]
    model = getattr(models, spec["factory"])()
    model.load_state_dict(load_file(os.path.join(HERE, f"{name}.safetensors")))
    model.eval()
    data = load_file(os.path.join(HERE, f"{name}_data.safetensors"))
    return model, data["inputs"], data["targets"]


def units_view(t):
    """[B, C, ...] or [B, T, C] -> [observations, units]."""
    if t.dim() == 2:
        return t
    if t.dim() == 4:  # conv: [B, C, H, W]
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])  # sequence: [B, T, C]


@torch.no_grad()
def called_layers(model, x):
    """Linear/Conv2d modules called as modules, in forward execution order."""
    order = []
    handles = []
    typed = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for n, m in typed:
        handles.append(
            m.register_forward_hook(lambda mod, inp, out, n=n: order.append((n, units_view(out).shape[1])))
        )
    model(x[:2])
    for h in handles:
        h.remove()
    seen = []
    for n, k in order:
        if n not in [s[0] for s in seen]:
            seen.append((n, k))
    unsupported = [n for n, _ in typed if n not in [s[0] for s in seen]]
    return seen, unsupported


@torch.no_grad()
def capture(model, x, points):
    mods = dict(model.named_modules())
    acts, handles = {}, []
    for layer, point in points.items():
        fn, target = parse_point(point)

        def hook(mod, inp, out, layer=layer, fn=fn):
            a = ACTS[fn](out) if fn else out
            acts[layer] = units_view(a).clone()

        handles.append(mods[target].register_forward_hook(hook))
    logits = model(x)
    for h in handles:
        h.remove()
    return logits, acts


@torch.no_grad()
def loss_with_override(model, x, y, site, unit, value):
    mods = dict(model.named_modules())
    name, kind = site

    def overwrite(t):
        t = t.clone()
        if t.dim() == 4:  # conv: channel dim 1
            t[:, unit] = value
        else:  # [B, C] or [B, T, C]: unit dim last
            t[..., unit] = value
        return t

    if kind == "output":
        h = mods[name].register_forward_hook(lambda m, i, o: overwrite(o))
    else:
        h = mods[name].register_forward_pre_hook(lambda m, i: (overwrite(i[0]),) + tuple(i[1:]))
    try:
        return F.cross_entropy(model(x), y).item()
    finally:
        h.remove()


@torch.no_grad()
def verify(name):
    spec = SPECS[name]
    print(f"  verifying {name}")
    model, x, y = load_shipped(name)

    check(x.dtype == torch.float32 and list(x.shape) == [N_SAMPLES] + spec["input_shape"],
          f"inputs float32 {[N_SAMPLES] + spec['input_shape']}")
    check(y.dtype == torch.int64 and y.shape == (N_SAMPLES,), "targets int64 [512]")
    counts = torch.bincount(y, minlength=N_CLASSES).tolist()
    check(min(counts) > 0, f"all classes present (counts {counts})")

    # layers: called Linear/Conv2d in forward order; unsupported: never called
    layers, unsupported = called_layers(model, x)
    layer_names = [n for n, _ in layers]
    check(layer_names == list(spec["activation_points"]),
          f"called layers in order {layer_names}")
    check(unsupported == spec["unsupported"], f"uncalled linear layers {unsupported}")
    check(layer_names[-1] == spec["final"], f"final layer {spec['final']}")

    # (iii) accuracy
    logits, acts = capture(model, x, spec["activation_points"])
    base_loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(dim=1) == y).double().mean().item()
    check(acc > 1.0 / N_CLASSES + 0.25, f"train accuracy {acc:.4f} (chance {1.0 / N_CLASSES:.2f})")

    # (i) exactly-dead set == planted set, for every non-final layer
    dead = {}
    for layer in layer_names:
        if layer == spec["final"]:
            continue
        a = acts[layer]
        found = torch.nonzero((a == 0).all(dim=0)).flatten().tolist()
        dead[layer] = found
        check(found == spec["dead"][layer],
              f"dead units of {layer} ({spec['activation_points'][layer]}): {found} "
              f"({a.shape[0]} observations)")
        # Live units must be robustly alive (not "barely" non-zero on a
        # handful of observations), so the dead set does not depend on
        # last-bit numerics of whoever recomputes it.
        live = [u for u in range(a.shape[1]) if u not in found]
        peak = a[:, live].abs().amax(dim=0)
        nz = (a[:, live] != 0).sum(dim=0)
        check(bool(peak.min() > 0.05) and bool(nz.min() >= 0.02 * a.shape[0]),
              f"live units of {layer} clearly alive (min peak |act| {peak.min().item():.3g}, "
              f"min #non-zero observations {nz.min().item()})")
    check(set(dead) == set(spec["dead"]), "dead keys cover every non-final layer")

    # (ii) constant unit
    c = spec["constant"]
    # Reference act(c) from a float64 scalar; the in-model (vectorised float32)
    # kernel may differ from it by an ulp or two, so truth.json records the
    # value the model actually produces, after checking it is exactly constant.
    ref = float(ACTS[c["act"]](torch.tensor(c["bias"], dtype=torch.float64)))
    col = acts[c["layer"]][:, c["unit"]]
    value = col[0]
    check(bool((col == value).all()),
          f"{c['layer']}[{c['unit']}] exactly constant ({value.item()!r}) on all "
          f"{col.numel()} observations")
    check(abs(value.item() - ref) < 1e-5, f"constant value matches {c['act']}({c['bias']}) = {ref!r}")
    mean = col.double().mean().to(torch.float32)
    zero_loss = loss_with_override(model, x, y, spec["ablate_site"], c["unit"], 0.0)
    mean_loss = loss_with_override(model, x, y, spec["ablate_site"], c["unit"], mean)
    d_zero, d_mean = abs(zero_loss - base_loss), abs(mean_loss - base_loss)
    check(d_zero > 0.05, f"zero-ablating constant unit changes loss by {d_zero:.4f} (> 0.05)")
    check(d_mean < 1e-6, f"mean-replacing constant unit changes loss by {d_mean:.3g} (< 1e-6)")
    print(f"    loss {base_loss:.4f}, zero-ablated {zero_loss:.4f}, mean-replaced {mean_loss:.4f}")

    return {
        "class": spec["cls"],
        "arch": f"{REL}/models.py:{spec['factory']}",
        "checkpoint": f"{REL}/{name}.safetensors",
        "baseline": f"{REL}/{name}_init.safetensors",
        "data": f"{REL}/{name}_data.safetensors",
        "input_shape": list(spec["input_shape"]),
        "layers": {n: k for n, k in layers},
        "final": spec["final"],
        "activation_points": dict(spec["activation_points"]),
        "dead": dead,
        "constant": {"layer": c["layer"], "unit": c["unit"], "value": float(value.item())},
        "unsupported": unsupported,
        "accuracy": round(acc, 3),
    }


TRUTH = os.path.join(HERE, "truth.json")


def format_truth(truth):
    """Two levels of indentation; every field value on one line."""
    lines = ["{"]
    for i, (name, facts) in enumerate(truth.items()):
        lines.append(f"  {json.dumps(name)}: {{")
        items = list(facts.items())
        for j, (k, v) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            lines.append(f"    {json.dumps(k)}: {json.dumps(v)}{comma}")
        lines.append("  }" + ("," if i < len(truth) - 1 else ""))
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == truth
    return text


def main():
    t0 = time.time()
    for name in SPECS:
        train(name)
    truth = {name: verify(name) for name in SPECS}
    if FAILURES:
        if os.path.exists(TRUTH):
            os.remove(TRUTH)
        print(f"\n{len(FAILURES)} verification(s) FAILED; truth.json removed:", file=sys.stderr)
        for f in FAILURES:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    with open(TRUTH, "w") as fh:
        fh.write(format_truth(truth))
    for name, t in truth.items():
        print(f"  {name}: accuracy {t['accuracy']}")
    print(f"all checks passed; wrote truth.json ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
