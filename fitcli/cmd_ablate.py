"""``fitcli ablate MODEL``: exact ablation of units (or of residual blocks, ``--blocks``)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from fitcli.clikit import (
    ArchKwOpt,
    ArchOpt,
    BatchOpt,
    ChunkOpt,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    DistTimeoutOpt,
    DtypeOpt,
    KindsOpt,
    LossOpt,
    MaxBatchOpt,
    MaxMemoryOpt,
    ModelArg,
    ModeOpt,
    OutputOpt,
    QuietOpt,
    ReportFormatOpt,
    SeedOpt,
    SeqLenOpt,
    TauOpt,
    TextOpt,
    TopOpt,
    TrustOpt,
    VerboseOpt,
    auto_max_memory,
    checked_settings,
    data_of,
    emit,
    emit_ranked,
    loss_of,
    merge,
    model_of,
    parse_units,
    progress_of,
    terminal_page,
)
from fitcli.errors import UsageError

SHORT = "Exact ablation: the loss change when each unit, layer or residual block is removed."
EXAMPLES = """Examples:

\b
  fitcli ablate model.pt --arch models.py:Net --data val.pt --layer fc2
  fitcli ablate model.pt --arch models.py:Net --data val.pt --layer fc2 --units 0,3,7-9 --mode mean
  fitcli ablate model.pt --arch models.py:Net --data val.pt --layer 'blocks.*' --whole-layer
  fitcli ablate model.pt --arch models.py:Net --data val.pt --blocks --greedy 3
  fitcli ablate ./llm-folder --text calib.txt --kinds heads   # every attention head of a transformer
"""

AblateLayerOpt = Annotated[list[str] | None, typer.Option("--layer", metavar="NAME", help="layer name or glob to ablate (required unless --blocks, --kinds or --units heads; repeatable)")]
UnitsOpt = Annotated[str | None, typer.Option("--units", metavar="UNITS", help="units to ablate, e.g. 0,3,7-9, or heads: every attention head [default: all]")]
WholeLayerOpt = Annotated[bool | None, typer.Option("--whole-layer", help="also ablate each entire layer at once")]
BlocksOpt = Annotated[bool | None, typer.Option("--blocks", help="residual blocks as units: each replaced by the identity")]
GreedyOpt = Annotated[int | None, typer.Option("--greedy", min=0, metavar="N", help="with --blocks: remove the block of smallest |Δloss| N times, re-measuring exactly (layer-removal curve)")]


def command(
    model: ModelArg, layer: AblateLayerOpt = None, kinds: KindsOpt = None, units: UnitsOpt = None, mode: ModeOpt = None,
    whole_layer: WholeLayerOpt = None, blocks: BlocksOpt = None, greedy: GreedyOpt = None,
    chunk_size: ChunkOpt = None, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None,
    trust_checkpoint: TrustOpt = None, data: DataOpt = None, text: TextOpt = None, max_seq_len: SeqLenOpt = None,
    batch_size: BatchOpt = None,
    max_batches: MaxBatchOpt = None, loss: LossOpt = None, device: DeviceOpt = None, seed: SeedOpt = None,
    tau: TauOpt = None, top: TopOpt = None, fmt: ReportFormatOpt = None, output: OutputOpt = None,
    dtype: DtypeOpt = None, dist_timeout: DistTimeoutOpt = None, max_memory: MaxMemoryOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Exact ablation of each unit (and optionally whole layers): the loss change when it is masked.
    Under torchrun the batches are sharded over the ranks; rank 0 prints and writes the report."""
    m = merge(config, dict(layers=layer, kinds=kinds, units=units, ablation_mode=mode, whole_layer=whole_layer,
                           chunk_size=chunk_size, arch=arch, arch_kwargs=arch_kwargs,
                           trust_checkpoint=trust_checkpoint, data=data, text=text, max_seq_len=max_seq_len,
                           batch_size=batch_size, max_batches=max_batches, loss=loss, device=device, seed=seed,
                           tau=tau, top=top, format=fmt, output=output, dtype=dtype, dist_timeout=dist_timeout,
                           max_memory=max_memory, quiet=quiet, verbose=verbose))
    terminal_page(m["format"], m.get("output"))
    if greedy is not None and not blocks:
        raise UsageError(f"--greedy {greedy}: removes residual blocks one by one, so it needs --blocks")
    if blocks:
        _blocks(model, m, greedy or 0)
        return
    if m.get("units") == "heads":  # every attention head of the model (the layers named *.heads)
        m["layers"], m["units"] = [*(m.get("layers") or []), "*.heads"], None
    if not m.get("layers") and not m.get("kinds"):
        raise UsageError("ablate needs --layer NAME (see `fitcli inspect MODEL` for the names)")
    settings = checked_settings(m)
    if auto_max_memory(model, m):  # too big for memory: block by block
        settings = checked_settings(m)
    unit_list = parse_units(m.get("units"))
    if not m.get("data") and not m.get("text"):
        raise UsageError("ablate needs --data (or --text)")
    from fitcli import api, distributed

    with distributed.launched(settings.device, m.get("dist_timeout")) as (group, device):
        settings = dataclasses.replace(settings, device=device)
        with distributed.phase(distributed.of(group)):  # a checkpoint one rank cannot read stops all
            loss_fn = loss_of(m.get("loss"))
            loaded = model_of(model, m)
        report = api.ablate(loaded, data_of(model, m, settings), units=unit_list, loss=loss_fn,
                            settings=settings, progress=progress_of(m), group=group)
        emit_ranked(report, m, [model, m.get("data"), m.get("text"), m.get("_config")], group)


def _blocks(model: str, m: dict, greedy: int) -> None:
    """--blocks: residual blocks as units, one process."""
    from fitcli.distributed import torchrun_env

    if torchrun_env() is not None:
        raise UsageError("--blocks does not run under torchrun: run it as one process")
    settings = checked_settings({k: v for k, v in m.items() if k != "layers"})
    from fitcli import api

    report = api.blocks(model_of(model, m), data_of(model, m, settings), greedy=greedy,
                        loss=loss_of(m.get("loss")), settings=settings, progress=progress_of(m))
    emit(report, m, [model, m.get("data"), m.get("text"), m.get("_config")])
