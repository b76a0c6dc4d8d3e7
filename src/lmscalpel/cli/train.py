"""``train-editor``: meta-train a learned editor (MEND) and save it for ``edit --editor``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmscalpel.cli.app import (
    DeviceOption,
    DtypeOption,
    ModelOption,
    app,
    console,
    friendly,
    load,
    overrides,
    placement,
)


@app.command("train-editor")
@friendly
def train_editor(
    data: Annotated[
        Path,
        typer.Option(
            help="Edit records, in any layout `eval` reads: CounterFact (e.g. "
            "../shared/data/counterfact/train.json), zsRE (MEND layout), lmscalpel requests..."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to write the trained editor to.")],
    method: Annotated[str, typer.Option(help="Learned editing method.")] = "mend",
    steps: Annotated[int | None, typer.Option(help="Training steps (at most).")] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="Wall-time budget for training (default 25).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of training settings.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a training setting: key=value.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")
    ] = None,
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Meta-train a learned editor (MEND) for a model and save it for `edit --editor`."""
    import time

    import torch

    from lmscalpel.core.config import ConfigError
    from lmscalpel.methods.config_files import build_config, check_methods
    from lmscalpel.methods.mend import MENDTrainConfig
    from lmscalpel.methods.mend.workflow import SCORES, read_edit_records
    from lmscalpel.methods.mend.workflow import train_editor as train

    check_methods([method])
    if method != "mend":
        raise ConfigError(f"{method!r} is not a learned editor; use --method mend")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    started = time.monotonic()
    sets = overrides(set_)
    if steps is not None:
        sets["steps"] = steps
    if max_minutes is not None:
        sets["max_minutes"] = max_minutes
    build_config(MENDTrainConfig, None, config, sets)  # a bad setting fails before the model loads
    records = read_edit_records(data)
    if threads:
        torch.set_num_threads(threads)
    lm = load(model, **placement(device, dtype))
    cfg = build_config(MENDTrainConfig, lm.model_type, config, sets)
    skipped = len(records.problems)
    console.print(
        f"{len(records.requests)} edit records from {data} ({records.layout})"
        + (f", {skipped} malformed record(s) skipped" if skipped else "")
    )
    trained = train(lm, records, out, cfg, started=started)
    result = trained.result
    table = Table(
        title=f"MEND editor for {lm.name}: trained on {result.n_train} of "
        f"{len(records.requests)} records, {result.n_val} held out"
    )
    columns = ("editor", "step", "edit success", "paraphrase success", "neighbourhood success")
    for column in (*columns, "locality drawdown", "score"):
        table.add_column(column, no_wrap=column == "editor")
    for row in trained.rows():
        step = "-" if row.step is None else str(row.step)
        table.add_row(row.label, step, *(f"{row.scores[k]:.3f}" for k in SCORES))
    console.print(table)
    console.print(
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min (stopped: "
        f"{result.stopped}); editor saved to {out} — use it with "
        f"`lmscalpel edit --method mend --editor {out} ...`"
    )
