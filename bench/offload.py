"""Offload benchmark: a GPT-2-medium-shaped model (24 layers, 1024 wide, 16 heads, vocabulary
50257: about 355M parameters, 1.4 GB in float32; random init, saved to a temporary safetensors
file) audited in memory, and block by block with at most a quarter of its weights resident
(``fitcli.offload.offloaded``). Goal: peak RSS of the offloaded audit at most the cap plus the
activations plus 400 MB, and the same metric values (1e-5).

Each run is a fresh child process; its peak RSS is the peak of the audit itself (VmHWM, reset
just before the audit through /proc/self/clear_refs; where that is refused, the process's
``ru_maxrss``). Both children build the model on the meta device and give it uninitialised CPU
storage (``to_empty``: pages never touched are not resident); the in-memory child then reads the
weights from the file into it, the offloaded one maps the file instead. Each child also reports its RSS before the audit (after the
imports, the model and the data): the baseline the audit's own memory is taken over.

``--sets default`` runs fitcli's default metrics (grad_norm and the composite among them: the
weight gradient of every layer, consumed as autograd produces it) and checks the goal for it:
peak RSS offloaded at most its RSS before the audit + 1.25 x (cap + activations), the
activations being what the in-memory audit adds over its own baseline; every layer, the final
one (the head) included, equal to 1e-5. ``--untied`` gives the head its own weight (GPT-2-medium
with an untied head: 406M parameters).

Two metric sets: ``acts`` (activation statistics: forward only) and ``taylor`` (activation
statistics and Taylor: forward and backward). With a backward, the engine asks autograd for the
weight gradient of every audited layer (grad_norm reads it), which is as big as the weights:
the ``taylor`` figures carry it, resident or not.

``--arch opt`` builds the same shape from OPT's classes, whose layers are ``nn.Linear`` (weight
[out, in]): the engine reads a Conv1D weight ([in, out]) as rows through a transposed copy, made
per layer and batch, which the GPT-2 figures carry.

Usage: python bench/offload.py [--arch gpt2|opt] [--layers 24] [--width 1024] [--heads 16] [--vocab 50257]
       [--batches 2] [--batch-size 2] [--tokens 32] [--fraction 0.25] [--sets acts,taylor,default] [--untied]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETS = {"acts": ["act_mean", "act_var", "apoz", "dormant"],
        "taylor": ["act_mean", "act_var", "apoz", "dormant", "taylor"],
        "default": None}  # fitcli's default metrics: grad_norm reads every layer's weight gradient
SLACK = 400 * 2**20


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Start the peak-RSS count afresh (Linux: ``5`` to /proc/self/clear_refs resets VmHWM), so
    the peak is the audit's, not the load's (reading a checkpoint briefly holds it twice)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(reset: bool) -> int:
    """VmHWM (the peak since the reset) or, without one, the process's ru_maxrss."""
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def config(a):
    """GPT-2's own classes (Conv1D layers: weight [in, out]), or OPT's at the same shape (nn.Linear)."""
    if a.arch == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        return OPTForCausalLM, OPTConfig(vocab_size=a.vocab, hidden_size=a.width, num_hidden_layers=a.layers,
                                         ffn_dim=4 * a.width, num_attention_heads=a.heads, word_embed_proj_dim=a.width,
                                         max_position_embeddings=1024, use_cache=False, bos_token_id=0,
                                         eos_token_id=0, pad_token_id=1, tie_word_embeddings=not a.untied)
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel, GPT2Config(n_layer=a.layers, n_embd=a.width, n_head=a.heads, vocab_size=a.vocab,
                                       n_positions=1024, use_cache=False, bos_token_id=0, eos_token_id=0,
                                       tie_word_embeddings=not a.untied)


def empty_model(a):
    """The model with uninitialised storage: nothing resident until written or read."""
    import torch

    cls, cfg = config(a)
    with torch.device("meta"):
        m = cls(cfg)
    m = m.to_empty(device="cpu")
    m.tie_weights()  # to_empty gives the tied lm_head its own tensor: tie it back
    return m.eval()


def data(a):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batches * a.batch_size, a.tokens), generator=g)
    return [{"input_ids": ids[i : i + a.batch_size], "labels": ids[i : i + a.batch_size]}
            for i in range(0, ids.shape[0], a.batch_size)]


def make(a) -> None:
    """Random init (seeded), saved without the tied copy."""
    import torch
    from safetensors.torch import save_model

    torch.manual_seed(0)
    cls, cfg = config(a)
    m = cls(cfg)
    save_model(m, a.file)
    n = sum(p.numel() for p in m.parameters())
    print(json.dumps({"parameters": n, "bytes": sum(p.numel() * p.element_size() for p in m.parameters())}))


def child(a) -> None:
    import torch

    import fitcli
    from fitcli.offload import offloaded

    torch.set_num_threads(a.threads)
    model = empty_model(a)
    batches = data(a)
    metrics = SETS[a.set]
    out: dict = {"mode": a.mode, "set": a.set}
    if a.mode == "memory":
        from safetensors.torch import load_model

        load_model(model, a.file)
        out["rss_before"] = rss_now()
        reset = reset_peak()
        t = time.perf_counter()
        report = fitcli.audit(model, batches, metrics=metrics, device="cpu")
        out["seconds"] = time.perf_counter() - t
    else:
        out["rss_before"] = rss_now()
        reset = reset_peak()
        t = time.perf_counter()
        with offloaded(model, max_bytes=a.cap, source=a.file) as off:
            report = fitcli.audit(model, batches, metrics=metrics, device="cpu")
        out["seconds"] = time.perf_counter() - t
        out.update(high_water=off.high_water, loads=off.loads, recomputed=off.recomputed, unchecked=off.unchecked)
    out["peak_rss"] = peak_rss(reset)
    out["peak_since"] = "audit" if reset else "process"
    torch.save({f"{lay.name}/{k}": torch.as_tensor(v) for lay in report.layers for k, v in lay.metrics.items()},
               a.values)
    out["final"] = report.layers[-1].name
    print(json.dumps(out))


def run(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"child {args[:4]} failed ({p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def max_diff(a: str, b: str, layer: str | None = None) -> float:
    """The largest |difference| of any metric of any layer (of ``layer`` alone when given)."""
    import torch

    x, y = torch.load(a), torch.load(b)
    assert x.keys() == y.keys()
    worst = 0.0
    for k in x:
        if layer is not None and k.rpartition("/")[0] != layer:
            continue
        u, v = x[k].double(), y[k].double()
        both = ~(u.isnan() | v.isnan())
        assert torch.equal(u.isnan(), v.isnan()), k
        if both.any():
            worst = max(worst, float((u[both] - v[both]).abs().max()))
    return worst


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["gpt2", "opt"], default="gpt2")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default="acts,taylor")
    ap.add_argument("--untied", action="store_true", help="the head has its own weight (not the embedding's)")
    ap.add_argument("--json")
    ap.add_argument("--child", choices=["make", "memory", "offload"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--values", help=argparse.SUPPRESS)
    ap.add_argument("--set", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "make":
        return make(a)
    if a.child:
        a.mode = a.child
        return child(a)
    shape = ["--arch", a.arch, "--layers", str(a.layers), "--width", str(a.width), "--heads", str(a.heads), "--vocab", str(a.vocab),
             "--batches", str(a.batches), "--batch-size", str(a.batch_size), "--tokens", str(a.tokens),
             "--threads", str(a.threads), *(["--untied"] if a.untied else [])]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        f = os.path.join(tmp, "gpt2.safetensors")
        made = run(["--child", "make", "--file", f, *shape])
        cap = int(made["bytes"] * a.fraction)
        print(f"model: {a.arch}, {made['parameters'] / 1e6:.0f}M parameters, {mib(made['bytes'])} of weights; "
              f"cap {mib(cap)} ({a.fraction:g} of it); {a.batches} batches of {a.batch_size} x {a.tokens} tokens")
        for s in a.sets.split(","):
            got = {}
            for mode in ("memory", "offload"):
                vals = os.path.join(tmp, f"{s}-{mode}.pt")
                got[mode] = run(["--child", mode, "--file", f, "--values", vals, "--set", s, "--cap", str(cap), *shape])
                got[mode]["values"] = vals
            mem, off = got["memory"], got["offload"]
            diff = max_diff(mem["values"], off["values"])
            final = max_diff(mem["values"], off["values"], layer=off["final"])
            row = {"arch": a.arch, "set": s, "metrics": SETS[s] or "default", "cap": cap, "weights": made["bytes"], "max_abs_diff": diff,
                   **{f"memory_{k}": v for k, v in mem.items() if k not in ("values", "mode", "set")},
                   **{f"offload_{k}": v for k, v in off.items() if k not in ("values", "mode", "set")}}
            row["offload_over_cap"] = off["peak_rss"] - cap
            act = mem["peak_rss"] - mem["rss_before"]  # what the in-memory audit adds: activations, state
            goal = off["rss_before"] + 1.25 * (cap + act)
            row.update(final_layer=off["final"], final_max_abs_diff=final, activations=act, goal=goal,
                       goal_met=off["peak_rss"] <= goal)
            results.append(row)
            print(f"[{s}: {', '.join(SETS[s] or ['fitcli defaults'])}]")
            print(f"  in memory: peak RSS {mib(mem['peak_rss'])} (before the audit {mib(mem['rss_before'])}), "
                  f"{mem['seconds']:.1f} s")
            print(f"  offloaded: peak RSS {mib(off['peak_rss'])} (before the audit {mib(off['rss_before'])}), "
                  f"{off['seconds']:.1f} s; weights resident at most {mib(off['high_water'])} "
                  f"(cap {mib(cap)}), {off['loads']} block loads, {off['recomputed']} block recomputes")
            print(f"  ratio: peak RSS offloaded/in memory {off['peak_rss'] / mem['peak_rss']:.2f}x, time "
                  f"{off['seconds'] / mem['seconds']:.2f}x; max |difference| {diff:.2e}")
            print(f"  offloaded peak = cap + {mib(off['peak_rss'] - cap)} = cap + imports and data "
                  f"{mib(off['rss_before'])} + the rest {mib(off['peak_rss'] - cap - off['rss_before'])} "
                  f"(activations, the engine's state; goal: cap + activations + 400 MiB)")
            print(f"  goal: peak RSS offloaded <= before + 1.25 x (cap + activations {mib(act)}) = {mib(goal)}: "
                  f"{'met' if row['goal_met'] else 'NOT met'}; final layer {off['final']} max |difference| {final:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
