"""Shared fixtures for the fitcli test suite.

Fixtures (general, used by every test module):

- ``repo``: Path of the repository root (computed from this file, not from the cwd).
- ``truth``: ``sample_models/truth.json`` parsed (facts about the three sample models).
- ``in_repo``: chdir to the repository root for the test (truth.json paths such as
  ``sample_models/models.py:mlp`` are relative to it); yields the root Path.
- ``run_cli``: ``run_cli(args) -> CliResult(code, stdout, stderr)``; runs ``fitcli.cli.main``
  in-process (no subprocess), catching SystemExit. ``args`` is a list or a shell-like string.
  It does not change the cwd: request ``in_repo`` for repo-relative paths.
- ``load_sample``: ``load_sample(name) -> LoadedModel`` for ``mlp``/``cnn``/``resmlp`` from
  their shipped safetensors with their ``--arch`` (absolute paths, cwd-independent).
- ``example_input``: ``example_input(truth_entry, batch=4, seed=0)`` -> a deterministic tensor of
  the model's input shape.
- ``hook_free`` (function): ``assert_no_hooks(module)`` checks no forward/pre/backward hook is
  left on any submodule (and no global module hook).
"""

from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
SAMPLE_NAMES = ("mlp", "cnn", "resmlp")


class CliResult(NamedTuple):
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def truth(repo: Path) -> dict:
    return json.loads((repo / "sample_models" / "truth.json").read_text())


@pytest.fixture
def in_repo(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(repo)
    return repo


def _invoke(argv: list[str]) -> int:
    from fitcli.cli import main

    old_term = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        return code if isinstance(code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
    return 0  # main() always exits; reaching here means it returned normally


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Call ``fitcli.cli.main(args)`` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.delenv("FITCLI_VERBOSE", raising=False)

    def run(args: list[str] | tuple[str, ...] | str) -> CliResult:
        argv = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
        capsys.readouterr()  # drop anything printed before this call
        code = _invoke(argv)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def load_sample(repo: Path, truth: dict):
    """``load_sample(name, **kw)`` -> fitcli LoadedModel of a shipped sample model."""
    from strapi import load_model

    def load(name: str, **kw):
        t = truth[name]
        ckpt = repo / t["checkpoint"]
        file, _, attr = t["arch"].rpartition(":")
        return load_model(ckpt, arch=f"{repo / file}:{attr}", **kw)

    return load


@pytest.fixture
def example_input():
    def make(entry: dict, batch: int = 4, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *entry["input_shape"]), generator=g)

    return make


def assert_no_hooks(model: nn.Module) -> None:
    """No hook of any kind is left on ``model`` or its submodules, nor a global module hook."""
    from torch.nn.modules import module as _m

    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            d = getattr(mod, attr, None)
            assert not d, f"{attr} left on module {name or '<root>'}: {dict(d)}"
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        d = getattr(_m, attr, None)
        assert not d, f"global {attr} left: {dict(d)}"


@pytest.fixture
def hook_free():
    return assert_no_hooks
