"""Process-wide settings the ``fitcli`` command applies to its own process.

Not applied by the library (``fitcli.api``): they change the whole process, which belongs to
whoever imported fitcli. A program embedding fitcli can call ``keep_freed_memory()`` itself.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # requests up to 1 GiB come from the heap, where freed memory is reused
TRIM_THRESHOLD = (1 << 31) - 1  # give free heap memory back to the OS only above ~2 GiB (C int)

# the user's own malloc settings win over ours
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory(env: Mapping[str, str] | None = None) -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    With glibc's defaults, the heap grows while a batch's activations and gradients are alive
    and is trimmed when they are freed, so the next batch faults the same pages back in (each a
    zero-filled 4 KiB page from the kernel). On a CPU score run that was 100k+ page faults per
    dozen batches and ~10% of the wall time; PyTorch's CPU tuning guide suggests a caching
    allocator (jemalloc, tcmalloc) for the same reason. What is kept is memory the run already
    used, back to the OS when the process exits; peak RSS was 2-4% higher in the score benchmark
    (freed blocks that do not fit the next request exactly stay in the heap).

    Returns True when applied. Not applied outside glibc, when ``FITCLI_MALLOC_TUNE=0``, or when
    the environment already sets malloc tunables (``MALLOC_*_``, ``GLIBC_TUNABLES``).
    """
    env = os.environ if env is None else env
    if env.get("FITCLI_MALLOC_TUNE", "1") == "0" or any(k in env for k in USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has no such tunables)  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the mmap threshold first: setting either one turns glibc's dynamic thresholds off
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def available_bytes(device: Any = "cpu") -> int | None:
    """Free memory of a device: ``torch.cuda.mem_get_info`` for CUDA, ``MemAvailable`` of
    ``/proc/meminfo`` for the CPU; None when it cannot be known."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0]) if torch.cuda.is_available() else None
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None



# Hugging Face's own switches; a value the user set in the environment wins
HF_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_hf(verbose: bool = False) -> bool:
    """Silence Hugging Face's progress bars ("Loading weights", "Writing model shards"), its log
    messages below errors and its Python warnings for the rest of the process, unless
    ``verbose``. Before ``transformers``/``huggingface_hub`` are imported this sets their
    environment switches; after, it calls their own ``set_verbosity_error`` and
    ``disable_progress_bar(s)`` too. Returns True when applied."""
    if verbose:
        return False
    for k, v in HF_QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging

        disable_progress_bars()
        hub_logging.set_verbosity_error()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub|tokenizers)(\.|$)")
    return True
