"""Write a pruned Hugging Face model as a folder that stock ``from_pretrained`` loads: config.json
with the new counts, model.safetensors, and the tokenizer and generation files of the source.

A stock config holds one count per kind for every layer; a model whose blocks differ is refused
with the reason (nothing is written)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from fitcli.errors import InputError, UsageError, first_line
from fitcli.surgery.arch import UNSUPPORTED, find_family
from fitcli.surgery.hf import layer_counts

# copied from the source folder when present (the tokenizer, its vocabulary, generation settings)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json", "spiece.model", "sentencepiece.bpe.model")


def uniform_problem(model: nn.Module) -> str | None:
    """Why a stock config cannot hold ``model`` (per-layer counts differ, or a count its family's
    config has no field for), or None."""
    fam = find_family(model)
    counts = layer_counts(fam)
    if len(set(counts["mlp"])) > 1:
        return (f"the blocks keep different numbers of MLP channels ({counts['mlp']}): a stock config holds one "
                f"{fam.config_keys['mlp']} for every layer")
    if len(set(counts["heads"])) > 1:
        return (f"the blocks keep different numbers of query heads ({counts['heads']}): a stock config holds one "
                f"{fam.config_keys['heads']} for every layer")
    cfg = model.config
    if fam.name == "gpt2" and getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        if any(abs(b.attn.scaling * (j + 1) * b.attn.head_dim ** 0.5 - 1) > 1e-9 for j, b in enumerate(fam.layers)):
            return ("scale_attn_by_inverse_layer_idx scales each block's attention by its position, and blocks "
                    "were removed: a stock config would rebuild the later blocks with other scales")
    if fam.name in UNSUPPORTED:
        heads_now = counts["heads"][0]
        if heads_now != getattr(cfg, fam.config_keys["heads"]):
            return UNSUPPORTED[fam.name]["heads"]
    return None


def pruned_config(model: nn.Module):
    """A copy of the model's config with the counts of the pruned model written in."""
    fam = find_family(model)
    cfg = copy.deepcopy(model.config)
    counts = layer_counts(fam)
    keys = fam.config_keys
    setattr(cfg, keys["blocks"], len(fam.layers))
    setattr(cfg, keys["mlp"], counts["mlp"][0])
    if fam.name == "llama":
        cfg.num_attention_heads = counts["heads"][0]
        cfg.head_dim = fam.attn(0).head_dim  # explicit: hidden_size / heads no longer gives it
        cfg.num_key_value_heads = fam.attn(0).kv_heads
        if counts["hidden"][0] != cfg.hidden_size:
            raise InputError("the model's config does not match its hidden width; prune it with prune_hf")
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) != len(fam.layers):
        raise InputError(f"config.layer_types lists {len(types)} layers for {len(fam.layers)} blocks")
    return cfg


def source_cache_setting(cfg, source_dir: str | os.PathLike | None) -> None:
    """Put back the source folder's ``use_cache`` (fitcli loads a folder without its key/value cache,
    ``loading.no_cache``; the pruned folder generates as the source did;
    True where the source's config.json does not say, transformers' default)."""
    if source_dir is None or not hasattr(cfg, "use_cache"):
        return
    try:
        saved = json.loads((Path(source_dir) / "config.json").read_text())
    except (OSError, ValueError):
        saved = {}
    cfg.use_cache = bool(saved.get("use_cache", True))


def save_pretrained_folder(model: nn.Module, out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` to ``out_dir`` (created; files of the same names replaced). UsageError,
    nothing written, when a stock config cannot hold it or ``out_dir`` is the source folder."""
    out = Path(out_dir)
    problem = uniform_problem(model)
    if problem:
        raise UsageError(f"cannot write a from_pretrained folder: {problem}",
                         hint="keep the same counts in every layer, or save the model another way")
    if source_dir is not None and out.exists() and out.resolve() == Path(source_dir).resolve():
        raise UsageError(f"the output folder {out} is the source folder: refusing to overwrite the input")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    cfg = pruned_config(model)
    source_cache_setting(cfg, source_dir)
    try:  # what from_pretrained will do with it: stock configs validate their fields
        type(cfg).from_dict(cfg.to_dict())
    except Exception as e:
        raise UsageError(f"cannot write a from_pretrained folder: a stock {type(cfg).__name__} refuses the pruned "
                         f"counts: {first_line(e.__cause__ or e)}",
                         hint="keep counts the config accepts (e.g. hidden_size a multiple of the query heads)") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fitcli-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        cfg.save_pretrained(tmp)  # config.json with the new counts
        if source_dir is not None:
            for name in SIDE_FILES:
                src = Path(source_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["SIDE_FILES", "pruned_config", "save_pretrained_folder", "source_cache_setting", "uniform_problem"]
