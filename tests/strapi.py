"""The library called with the command line's strings (``file.py:fn`` architectures, ``0,3,7-9``
units, ``--mode``), converted the way ``fitcli.cli`` converts them. Many tests were written
against paths and specs; they exercise the same library calls the CLI makes."""

from __future__ import annotations

from typing import Any

import fitcli
from fitcli import clikit as cli
from fitcli.loading import LoadedModel


def _model(model: Any, arch: str | None, arch_kwargs: str | None, trust_checkpoint: bool) -> Any:
    if isinstance(model, LoadedModel):
        return model
    return load_model(model, arch, arch_kwargs, trust_checkpoint)


def score(model: Any, *, arch: str | None = None, arch_kwargs: str | None = None, trust_checkpoint: bool = False,
          data: Any = None, loss: str | None = None, baseline: str | None = None, **options: Any) -> dict:
    if "mode" in options:
        options["ablation_mode"] = options.pop("mode")
    options.pop("progress", None)
    loaded = _model(model, arch, arch_kwargs, trust_checkpoint)
    base = fitcli.load(baseline) if baseline else None
    return fitcli.audit(loaded, data, loss=cli.loss_of(loss), baseline=base, **options).to_dict()


def ablate(model: Any, *, arch: str | None = None, arch_kwargs: str | None = None, trust_checkpoint: bool = False,
           data: Any = None, loss: str | None = None, units: str | None = None, **options: Any) -> dict:
    if "mode" in options:
        options["ablation_mode"] = options.pop("mode")
    options.pop("progress", None)
    loaded = _model(model, arch, arch_kwargs, trust_checkpoint)
    return fitcli.ablate(loaded, data, units=cli.parse_units(units), loss=cli.loss_of(loss), **options).to_dict()


def load_model(path: Any, arch: str | None = None, arch_kwargs: str | None = None,
               trust_checkpoint: bool = False) -> LoadedModel:
    """``fitcli.load`` with ``--arch``/``--arch-kwargs`` strings parsed as the CLI parses them."""
    a = cli.arch_of({"arch": arch, "arch_kwargs": arch_kwargs})
    return fitcli.load(path, arch=a["arch"], arch_kwargs=a["arch_kwargs"], trust_checkpoint=trust_checkpoint,
                       arch_label=a.get("arch_label"))
