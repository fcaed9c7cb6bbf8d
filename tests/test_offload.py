"""Block-by-block audits with the weights memory-mapped from safetensors (``fitcli.offload``).

The offloaded audit must equal the in-memory audit (every metric, gradients and Taylor included),
and brute-force values computed here with plain torch, hold at most the cap of weights resident at
once (the offload's count, and the kernel's own page table of the file's mapping, read from
/proc/self/pagemap), and leave the model exactly as it was.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

import fitcli
from fitcli.errors import InputError, UsageError
from fitcli.offload import (
    auto_max_bytes,
    available_bytes,
    file_bytes,
    needs_offload,
    offloaded,
    outermost_blocks,
    read_header,
    weight_bytes,
)

ALL = ["ablation", "act_entropy", "act_mean", "act_var", "apoz", "composite", "dormant", "grad_norm",
       "output_corr", "taylor", "taylor_delta", "weight_change", "weight_change_rel", "weight_norm",
       "weight_norm_out"]
TOL = 1e-5


def _models(repo: Path):
    spec = importlib.util.spec_from_file_location("fitcli_sample_models", repo / "sample_models" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _resmlp(repo: Path, seed: int, blocks: int = 4) -> nn.Module:
    """The resmlp sample architecture, wider and deeper, so each block spans many pages."""
    m = _models(repo)
    torch.manual_seed(seed)
    model = m.ResMLP(in_features=8, d=96, hidden=384)
    model.blocks = nn.ModuleList([m.Block(96, 384) for _ in range(blocks)])
    return model.eval()


def _snapshot(model: nn.Module) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    return [(p, p.data_ptr(), p.detach().clone()) for p in model.parameters()]


def _unchanged(model: nn.Module, snap, hook_free) -> None:
    """Same parameter objects, same storage, bitwise the same values; no hook or wrapper left."""
    now = list(model.parameters())
    assert len(now) == len(snap)
    for p, (q, ptr, value) in zip(now, snap, strict=True):
        assert p is q and p.data_ptr() == ptr
        assert torch.equal(p.detach(), value)
    hook_free(model)
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert not torch.overrides._get_current_function_mode_stack()  # the torch function mode is gone
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # and the saved-tensor hooks


def _same_reports(a, b) -> None:
    """Every metric of every layer equal to TOL (NaN where the other has NaN)."""
    assert [lay.name for lay in a.layers] == [lay.name for lay in b.layers]
    compared = 0
    for la in a.layers:
        lb = b.layer(la.name)
        assert set(la.metrics) == set(lb.metrics), la.name
        for k, va in la.metrics.items():
            x = torch.as_tensor(va, dtype=torch.float64)
            y = torch.as_tensor(lb.metrics[k], dtype=torch.float64)
            assert torch.equal(x.isnan(), y.isnan()), (la.name, k)
            ok = ~x.isnan()
            assert torch.allclose(x[ok], y[ok], atol=TOL, rtol=TOL), (la.name, k, float((x - y)[ok].abs().max()))
            compared += 1
    assert compared > 0


def _mapping(path: Path) -> tuple[int, int]:
    """Address range of ``path``'s mapping in this process (from /proc/self/maps)."""
    target = str(path.resolve())
    with open("/proc/self/maps") as f:
        spans = [line.split()[0].split("-") for line in f if line.rstrip().endswith(" " + target)]
    assert spans, f"{target} is not mapped"
    return int(spans[0][0], 16), int(spans[-1][1], 16)


def _present(lo: int, hi: int) -> set[int]:
    """Pages (index from ``lo``) of [lo, hi) mapped into this process: the kernel's page table
    (/proc/self/pagemap, bit 63 'present')."""
    page = mmap.PAGESIZE
    n = (hi - lo) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo // page * 8)
        raw = f.read(n * 8)
    return {i for i in range(n) if struct.unpack_from("<Q", raw, i * 8)[0] >> 63}


def _fault_span(path: Path) -> int:
    """The most bytes one read fault maps into the process here, measured on a mapping of our
    own: the kernel maps the cached pages around a faulting page (fault-around, 64 KiB windows
    by default; a whole large page-cache folio where there is one). One byte read at the start
    of every tensor, the mapping's pages counted, dropped again."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        view = torch.frombuffer(mm, dtype=torch.uint8)
        lo, size = view.data_ptr(), len(mm) // mmap.PAGESIZE * mmap.PAGESIZE
        most = 1
        for e in read_header(path).values():
            mm.madvise(mmap.MADV_DONTNEED, 0, size)
            int(view[e.start])
            most = max(most, len(_present(lo, lo + size)))
        del view
    finally:
        mm.close()
    return most * mmap.PAGESIZE


class Sampler:
    """After every module's forward (the backward's recomputes too) and whenever a weight's
    gradient is produced: which pages of the file are mapped into the process, by the kernel,
    and which groups the offload holds resident. Hooks removed by ``close``."""

    def __init__(self, model: nn.Module, path: Path, off):
        self.off, self.samples = off, []
        self.lo, self.hi = _mapping(path)
        self.handles = [m.register_forward_hook(self.sample) for m in model.modules()]
        self.handles += [p.register_hook(self.sample_grad) for p in model.parameters()]

    def sample(self, *_):
        self.samples.append((_present(self.lo, self.hi), list(self.off.resident.values()), self.off.resident_bytes))

    def sample_grad(self, g):
        self.sample()
        return g

    def close(self):
        for h in self.handles:
            h.remove()


def _near(groups, span: int) -> set[int]:
    """Pages (index from the mapping's start) within ``span`` bytes of these groups' byte ranges:
    where faults in them may map pages, whatever the alignment of the kernel's windows."""
    out: set[int] = set()
    for g in groups:
        for s, e in g.ranges:
            out.update(range(max(0, s - span) // mmap.PAGESIZE, -(-(e + span) // mmap.PAGESIZE)))
    return out


def _brute(model: nn.Module, data, k: int) -> dict[str, torch.Tensor]:
    """act_mean (E|h|) and taylor (mean over samples of |Σ_positions h·∂L_x/∂h|) at unit i of
    gelu(blocks.k.fc_in), and grad_norm (mean over batches of ‖∂L_batch/∂W[i]‖, L_batch the
    batch-mean cross-entropy): plain torch, one batch at a time."""
    seen = {}

    def keep(mod, args):
        seen["h"] = args[0]  # fc_out's input is gelu(fc_in(...)), the activation point

    handle = model.blocks[k].fc_out.register_forward_pre_hook(keep)
    w = model.blocks[k].fc_in.weight
    abs_sum = taylor_sum = grad_sum = 0
    obs = samples = batches = 0
    try:
        for x, y in data:
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            h = seen.pop("h")
            gh, gw = torch.autograd.grad(losses.sum(), [h, w])
            h, gh, gw = h.double(), gh.double(), gw.double()
            abs_sum = abs_sum + h.abs().sum(dim=(0, 1))
            taylor_sum = taylor_sum + (h * gh).sum(dim=1).abs().sum(dim=0)
            grad_sum = grad_sum + (gw / x.shape[0]).norm(dim=1)
            obs, samples, batches = obs + h.shape[0] * h.shape[1], samples + h.shape[0], batches + 1
    finally:
        handle.remove()
    return {"act_mean": abs_sum / obs, "taylor": taylor_sum / samples, "grad_norm": grad_sum / batches}


def _class_data(n: int = 32, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_block_audit_equals_in_memory_and_stays_under_the_cap(repo, tmp_path, hook_free):
    model = _resmlp(repo, seed=0)
    base = _resmlp(repo, seed=5)
    src = tmp_path / "resmlp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    data = _class_data()
    metrics = [m for m in ALL if m != "ablation"]  # (exact ablation: in the GPT-2 test)
    ref = fitcli.audit(model, data, metrics=metrics, baseline=base, device="cpu")
    total = weight_bytes(model)
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    cap = int(2.5 * block)  # two blocks at once, of four
    assert cap < total / 1.5
    span = _fault_span(src)
    snap = _snapshot(model)
    with offloaded(model, max_bytes=cap, source=src) as off:
        assert outermost_blocks(model) == [f"blocks.{i}" for i in range(4)]
        sampler = Sampler(model, src, off)
        assert not _present(sampler.lo, sampler.hi)  # nothing resident before the audit reads it
        try:
            got = fitcli.audit(model, data, metrics=metrics, baseline=base, device="cpu")
        finally:
            sampler.close()
    _same_reports(ref, got)
    for k in (1, 3):  # and against plain torch: activations, their gradients, the weights' gradients
        want = _brute(model, data, k)
        for name, v in want.items():
            have = torch.as_tensor(got.layer(f"blocks.{k}.fc_in").metrics[name], dtype=torch.float64)
            assert torch.allclose(have, v, rtol=1e-4, atol=1e-7), (k, name, float((have - v).abs().max()))
    assert ref["discovery"]["method"] == got["discovery"]["method"] == "fx"  # traced: blocks are inlined
    assert len(sampler.samples) > 100
    page = mmap.PAGESIZE
    for present, resident, held in sampler.samples:
        assert held <= cap  # the offload's count of resident weight bytes
        # every page the kernel has mapped is one of a resident group's (within a fault's span)
        assert present <= _near(resident, span)
    most = max(len(present) for present, _, _ in sampler.samples) * page
    assert off.high_water <= cap
    assert block <= most < 0.9 * total  # a block at least was read, the whole model never
    assert off.loads > len(off.groups)  # groups were released and loaded again
    _unchanged(model, snap, hook_free)


def test_shipped_resmlp_from_its_own_checkpoint(repo, load_sample, truth, hook_free):
    """The shipped sample, its weights mapped from the shipped checkpoint, one block at a time
    (no checkpointing, blocks named): the same report, the planted dead units found."""
    loaded = load_sample("resmlp")
    model = loaded.module
    d = load_file(repo / truth["resmlp"]["data"])
    data = [(d["inputs"][i : i + 64], d["targets"][i : i + 64]) for i in (0, 64)]
    metrics = [m for m in ALL if m not in ("weight_change", "weight_change_rel")]
    ref = fitcli.audit(model, data, metrics=metrics, device="cpu")
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.blocks)
    snap = _snapshot(model)
    with offloaded(model, max_bytes=block, source=repo / truth["resmlp"]["checkpoint"],
                   blocks=["blocks.0", "blocks.1"], checkpoint=False) as off:
        got = fitcli.audit(model, data, metrics=metrics, device="cpu")
    _same_reports(ref, got)
    assert off.high_water <= block and off.checkpointed == 0
    for layer, units in truth["resmlp"]["dead"].items():
        assert set(units) <= set(got.dead.get(layer, [])), layer
    _unchanged(model, snap, hook_free)


def _gpt2(n_layer: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=n_layer, n_head=2, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (6, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[4:, 9:] = 0  # padding at the end of the last two samples
    data = [{"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3]}  # loss: next token
            for i in (0, 3)]
    return m, data


def test_gpt2_blocks_checkpointed_and_recomputed_in_reverse(tmp_path, hook_free):
    model, data = _gpt2()
    model.config.use_cache = False  # no key/value cache: the blocks can be recomputed
    src = tmp_path / "gpt2.safetensors"
    save_model(model, str(src))  # tied lm_head/wte stored once
    metrics = [m for m in ALL if m not in ("ablation", "weight_change", "weight_change_rel")]  # no baseline here
    ref = fitcli.audit(model, data, metrics=metrics, device="cpu")
    exact = dict(layers=["transformer.h.1.mlp.c_fc"], units=[7, 30], device="cpu")
    ref_ab = fitcli.ablate(model, data, **exact)
    blocks = [f"transformer.h.{i}" for i in range(3)]
    block = sum(p.numel() * p.element_size() for p in model.transformer.h[0].parameters())
    cap = int(1.5 * block)  # one block (and the small rest) at a time
    snap = _snapshot(model)
    with offloaded(model, max_bytes=cap, source=src) as off:
        got = fitcli.audit(model, data, metrics=metrics, device="cpu")
        runs = list(off.runs)
        got_ab = fitcli.ablate(model, data, **exact)
    _same_reports(ref, got)
    _same_reports(ref_ab, got_ab)
    # against plain torch: E|h| over real tokens at transformer.h.1.mlp.act, and each Conv1D unit's
    # weight norm (a column: weight is [in, out]) from the file
    acts = []
    handle = model.transformer.h[1].mlp.act.register_forward_hook(lambda m, a, out: acts.append(out.detach()))
    with torch.no_grad():
        for b in data:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    handle.remove()
    real = torch.cat([a[b["attention_mask"].bool()] for a, b in zip(acts, data, strict=True)]).double()
    c_fc = got.layer("transformer.h.1.mlp.c_fc").metrics
    assert torch.allclose(torch.as_tensor(c_fc["act_mean"], dtype=torch.float64), real.abs().mean(0), rtol=1e-5, atol=1e-8)
    w = load_file(src)["transformer.h.1.mlp.c_fc.weight"].double()
    assert torch.allclose(torch.as_tensor(c_fc["weight_norm"], dtype=torch.float64), w.norm(dim=0), rtol=1e-6)
    assert got["discovery"]["method"] == "runtime"  # eager: the block forwards are checkpointed
    assert [g.name for g in off.groups][:3] == blocks
    # per batch with gradients: each block once forward, then recomputed in reverse in the backward
    assert runs == (blocks + blocks[::-1]) * len(data)
    assert off.recomputed == 3 * len(data)
    assert off.high_water <= cap and off.unchecked == 0
    _unchanged(model, snap, hook_free)


def test_gpt2_with_a_cache_is_not_recomputed(tmp_path, hook_free):
    """A key/value cache passed through the blocks would grow again in a recompute: those block
    calls run without a checkpoint (weights still offloaded), and the results are the same."""
    model, data = _gpt2(n_layer=2)
    assert model.config.use_cache
    src = tmp_path / "gpt2.safetensors"
    save_model(model, str(src))
    metrics = ["act_mean", "taylor", "grad_norm", "weight_norm"]
    ref = fitcli.audit(model, data, metrics=metrics, device="cpu")
    block = sum(p.numel() * p.element_size() for p in model.transformer.h[0].parameters())
    snap = _snapshot(model)
    with offloaded(model, max_bytes=int(1.5 * block), source=src) as off:
        got = fitcli.audit(model, data, metrics=metrics, device="cpu")
    _same_reports(ref, got)
    assert off.unchecked == 2 * len(data) and off.recomputed == 0
    _unchanged(model, snap, hook_free)


def test_cap_below_the_largest_block_is_a_usage_error(repo, tmp_path, hook_free):
    model = _resmlp(repo, seed=0, blocks=2)
    src = tmp_path / "m.safetensors"
    save_file(dict(model.state_dict()), src)
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    snap = _snapshot(model)
    with pytest.raises(UsageError, match=r"smaller than the largest block \(blocks\.\d"):
        with offloaded(model, max_bytes=block - 1, source=src):
            pass
    _unchanged(model, snap, hook_free)
    with offloaded(model, max_bytes=block, source=src) as off:  # exactly one block fits
        model(torch.randn(2, 6, 8))
    assert off.high_water <= block
    _unchanged(model, snap, hook_free)


def test_file_that_does_not_hold_the_model_is_an_input_error(repo, tmp_path, hook_free):
    model = _resmlp(repo, seed=0, blocks=2)
    sd = dict(model.state_dict())
    snap = _snapshot(model)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "head.weight"}, missing)
    with pytest.raises(InputError, match="no tensor for parameter head.weight"):
        with offloaded(model, max_bytes=10**9, source=missing):
            pass
    shaped = tmp_path / "shaped.safetensors"
    save_file({**sd, "head.weight": torch.zeros(3, 16)}, shaped)
    with pytest.raises(InputError, match=r"head.weight is torch.float32 \[3, 16\]"):
        with offloaded(model, max_bytes=10**9, source=shaped):
            pass
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(InputError, match="not a safetensors file"):
        with offloaded(model, max_bytes=10**9, source=junk):
            pass
    _unchanged(model, snap, hook_free)


def test_error_inside_restores_the_model_and_reads_the_file(repo, tmp_path, hook_free):
    model = _resmlp(repo, seed=0, blocks=2)
    src = tmp_path / "m.safetensors"
    save_file(dict(model.state_dict()), src)
    x = torch.randn(3, 6, 8)
    want = model(x)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with offloaded(model, max_bytes=10**9, source=src):
            # the parameters are views of the file now, not the original tensors
            assert all(p.data_ptr() != ptr for _, ptr, _ in snap for p in [_])
            assert torch.equal(model(x), want)
            raise RuntimeError("boom")
    _unchanged(model, snap, hook_free)


def test_header_offsets_match_the_tensors(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.float64)}
    src = tmp_path / "t.safetensors"
    save_file(t, src)
    raw = src.read_bytes()
    head = read_header(src)
    for k, v in t.items():
        e = head[k]
        assert e.dtype == v.dtype and e.shape == tuple(v.shape) and e.end - e.start == v.numel() * v.element_size()
        assert raw[e.start : e.end] == v.numpy().tobytes()


def test_needs_offload_against_free_memory(monkeypatch):
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    got = available_bytes("cpu")
    assert abs(got - avail) < 256 * 2**20  # read a moment apart
    assert needs_offload(10 * got, "cpu") and not needs_offload(1024, "cpu")
    monkeypatch.setattr("fitcli.offload.available_bytes", lambda device="cpu": 1000)
    assert needs_offload(nn.Linear(20, 20), "cpu")  # 420 floats: 1680 bytes > 0.8 * 1000
    assert not needs_offload(nn.Linear(10, 10), "cpu")  # 110 floats: 440 bytes
    assert math.isclose(weight_bytes(nn.Linear(10, 10)), 440)
    assert auto_max_bytes(440, "cpu") is None  # fits: no offload
    assert auto_max_bytes(1680, "cpu") == 500  # half the free memory


def test_file_bytes_from_the_header_only(tmp_path):
    src = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.float16)}, src)
    assert file_bytes(src) == 3 * 5 * 4 + 7 * 2


def test_cli_max_memory_equals_the_in_memory_audit(repo, run_cli, tmp_path):
    """``fitcli score --max-memory``: the model is built without reading its weights (lazy), the
    audit maps them block by block, and the report equals the in-memory one; it says the cap and
    the most weight bytes resident at once, which stays under it."""
    import json

    args = ["score", str(repo / "sample_models/resmlp.safetensors"), "--arch", str(repo / "sample_models/models.py") + ":resmlp",
            "--data", str(repo / "sample_models/resmlp_data.safetensors"), "--device", "cpu", "--format", "json", "-q"]
    plain = run_cli(args)
    assert plain.code == 0, plain.stderr
    capped = run_cli([*args, "--max-memory", "12KiB"])
    assert capped.code == 0, capped.stderr
    a, b = json.loads(plain.stdout), json.loads(capped.stdout)
    fitcli.report.validate(b)
    assert b["offload"]["max_memory"] == 12 * 1024 and 0 < b["offload"]["high_water"] <= 12 * 1024
    assert b["offload"]["blocks"] == 2
    assert "offload" not in a
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        assert la["name"] == lb["name"] and la["dead"] == lb["dead"]
        for m, vals in la["metrics"].items():
            for x, y in zip(vals, lb["metrics"][m], strict=True):
                assert (x is None and y is None) or abs(x - y) <= 1e-5 * max(1.0, abs(x)), (la["name"], m)
    small = run_cli([*args, "--max-memory", "1KB"])
    assert small.code == 2 and "--max-memory" in small.stderr and "largest block" in small.stderr
    bad = run_cli([*args, "--max-memory", "lots"])
    assert bad.code == 2 and "give a size" in bad.stderr
    both = run_cli([*args, "--max-memory", "12KiB", "--dtype", "bfloat16"])
    assert both.code == 2 and "--max-memory and --dtype together" in both.stderr


@pytest.mark.parametrize(("text", "size"), [("2GB", 2 * 1000**3), ("500MiB", 500 * 1024**2), ("1.5G", int(1.5 * 1024**3)),
                                            ("1048576", 1048576), ("12 kb", 12000)])
def test_sizes_parse_like_people_write_them(text, size):
    from fitcli.clikit import parse_size

    assert parse_size(text) == size
