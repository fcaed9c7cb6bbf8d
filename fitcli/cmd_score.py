"""``fitcli score MODEL``: every metric, ranked dead-weight tables, a report, optionally a gate."""

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
    LayerOpt,
    LossOpt,
    MaxBatchOpt,
    MaxDeadLayerOpt,
    MaxDeadOpt,
    MaxMemoryOpt,
    MetricOpt,
    MinCoverageOpt,
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
    emit_ranked,
    loss_of,
    merge,
    model_of,
    progress_of,
    terminal_page,
)

SHORT = "Score every metric of every unit: dead units, ranked tables, a JSON report, a CI gate."
EXAMPLES = """Examples:

\b
  fitcli score model.safetensors --arch models.py:Net --data val.safetensors
  fitcli score model.pt --arch mypkg.models:resnet --data val.pt --format json -o report.json
  fitcli score model.pt --arch models.py:Net --data val.pt --rank-by apoz --top 30
  fitcli score model.pt --arch models.py:Net --data val.pt --max-dead 5   # CI gate: exit 1 above 5 %
  fitcli score model.pt --arch models.py:Net --data val.pt --validate --rank-by auto
  fitcli score ./llm-folder --text calib.txt --kinds heads,mlp,blocks   # a transformer's own units
"""

RankByOpt = Annotated[str | None, typer.Option("--rank-by", metavar="METRIC", help="metric for the ranked table (least fit first, in the metric's direction), or auto (best validated) [default: taylor, else act_mean, else weight_norm]")]
BaselineOpt = Annotated[str | None, typer.Option("--baseline", metavar="CHECKPOINT", help="earlier checkpoint: enables weight_change")]
ValidateOpt = Annotated[bool | None, typer.Option("--validate", help="measure each metric against exact ablation")]
ValidateUnitsOpt = Annotated[int | None, typer.Option("--validate-units", min=2, help="ablate a stratified sample of K units per layer")]


def command(
    model: ModelArg, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, text: TextOpt = None, max_seq_len: SeqLenOpt = None, batch_size: BatchOpt = None,
    max_batches: MaxBatchOpt = None, loss: LossOpt = None,
    layer: LayerOpt = None, kinds: KindsOpt = None, metric: MetricOpt = None, device: DeviceOpt = None, seed: SeedOpt = None,
    tau: TauOpt = None, top: TopOpt = None, rank_by: RankByOpt = None,
    fmt: ReportFormatOpt = None, output: OutputOpt = None, baseline: BaselineOpt = None,
    max_dead: MaxDeadOpt = None, max_dead_layer: MaxDeadLayerOpt = None, min_coverage: MinCoverageOpt = None,
    mode: ModeOpt = None, chunk_size: ChunkOpt = None, validate: ValidateOpt = None,
    validate_units: ValidateUnitsOpt = None,
    dtype: DtypeOpt = None, dist_timeout: DistTimeoutOpt = None, max_memory: MaxMemoryOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Score every metric, show ranked dead-weight tables, write a report, optionally gate.
    Under torchrun the batches are sharded over the ranks; rank 0 prints and writes the report."""
    m = merge(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                           text=text, max_seq_len=max_seq_len,
                           batch_size=batch_size, max_batches=max_batches, loss=loss, layers=layer, kinds=kinds,
                           metrics=metric, device=device, seed=seed, tau=tau, top=top, rank_by=rank_by,
                           format=fmt, output=output, baseline=baseline, max_dead=max_dead,
                           max_dead_layer=max_dead_layer, min_coverage=min_coverage, ablation_mode=mode,
                           chunk_size=chunk_size, dtype=dtype, dist_timeout=dist_timeout, max_memory=max_memory,
                           validate=validate, validate_units=validate_units, quiet=quiet, verbose=verbose))
    settings = checked_settings(m)  # every setting checked before torch is even imported
    terminal_page(m["format"], m.get("output"))
    if auto_max_memory(model, m):  # too big for memory: block by block
        settings = checked_settings(m)
    from fitcli import api, distributed

    with distributed.launched(settings.device, m.get("dist_timeout")) as (group, device):
        settings = dataclasses.replace(settings, device=device)
        with distributed.phase(distributed.of(group)):  # a checkpoint one rank cannot read stops all
            loss_fn = loss_of(m.get("loss"))
            loaded = model_of(model, m)
            base = api.load(m["baseline"]) if m.get("baseline") else None
        report = api.audit(loaded, data_of(model, m, settings), loss=loss_fn, baseline=base, settings=settings,
                           progress=progress_of(m), group=group)
        emit_ranked(report, m, [model, m.get("data"), m.get("text"), m.get("baseline"), m.get("_config")], group)
