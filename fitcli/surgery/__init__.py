"""Transformer surgery: remove MLP channels, query heads, hidden channels and whole blocks from a
Hugging Face model (LLaMA-style, GPT-2, BERT), compensate by least squares, and write a folder
that stock ``from_pretrained`` loads."""

from fitcli.surgery.arch import KINDS, Family, find_family
from fitcli.surgery.calib import collect_stats
from fitcli.surgery.folder import save_pretrained_folder, uniform_problem
from fitcli.surgery.hf import Plan, check_plan, layer_counts, prune_hf
from fitcli.surgery.select import lowest, uniform_plan

__all__ = ["KINDS", "Family", "Plan", "check_plan", "collect_stats", "find_family", "layer_counts", "lowest", "prune_hf",
           "save_pretrained_folder", "uniform_plan", "uniform_problem"]
