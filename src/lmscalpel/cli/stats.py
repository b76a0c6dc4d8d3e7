"""``stats``: key statistics C = E[k kᵀ] — computed once and cached (``stats``), exported as a
shareable bundle (``stats export``), imported from one (``stats import``).

``torchrun --nproc-per-node N -m lmscalpel stats ...`` shares the pass among N processes
(:mod:`lmscalpel.runtime.distributed`); rank 0 writes the cache and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscalpel.cli.app import (
    DeviceOption,
    DtypeOption,
    ModelOption,
    app,
    console,
    friendly,
    load,
    placement,
)

stats_app = typer.Typer(
    help="Compute (once; cached) ROME's key statistics for one layer: C, the MLP keys' 2nd "
    "moment. `stats export` / `stats import` share them as a bundle file.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(stats_app, name="stats")

CorpusOption = Annotated[
    str,
    typer.Option(
        help="'model' (text the model samples itself), a .txt/.jsonl/.json file or a folder, "
        "a Hugging Face dataset folder (save_to_disk) or hf:NAME[:CONFIG][@SPLIT] from the "
        "local datasets cache."
    ),
]
SamplesOption = Annotated[int | None, typer.Option(help="Tokens to accumulate.")]


def _rome_layer(lm, layer: int | None) -> tuple[int, int]:
    """The layer asked for (default: ROME's), checked, and ROME's default sample count."""
    from lmscalpel.core.config import ConfigError
    from lmscalpel.methods.rome import ROMEConfig

    config = ROMEConfig.for_model(lm.model_type)
    layer = config.edit_layer(lm.adapter.num_layers, lm.fingerprint) if layer is None else layer
    if not 0 <= layer < lm.adapter.num_layers:
        raise ConfigError(
            f"layer {layer} out of range: this model has layers 0..{lm.adapter.num_layers - 1}"
        )
    return layer, config.stats_samples


@stats_app.callback()
@friendly
def stats(
    ctx: typer.Context,
    layer: Annotated[
        int | None, typer.Option(help="Layer whose MLP keys to measure (default: ROME's layer).")
    ] = None,
    corpus: CorpusOption = "model",
    samples: SamplesOption = None,
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Compute (once; cached) ROME's key statistics for one layer: C, the MLP keys' 2nd moment."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    from lmscalpel.mechanics.stats import key_statistics
    from lmscalpel.runtime.distributed import is_rank_zero

    lm = load(model, **placement(device, dtype))
    layer, default_samples = _rome_layer(lm, layer)
    start = time.perf_counter()
    result = key_statistics(lm, layer, corpus, samples or default_samples)
    if not is_rank_zero():  # under torchrun: every rank took part, rank 0 reports
        return
    console.print(
        f"layer {layer}: C = E[k kᵀ] ({result.moment.shape[0]}×{result.moment.shape[1]}) over "
        f"{result.count} tokens of {result.corpus} in {time.perf_counter() - start:.1f} s\n"
        f"cached at {result.path}"
    )


@stats_app.command("export")
@friendly
def export(
    out: Annotated[Path, typer.Argument(help="The bundle file to write (.safetensors).")],
    layers: Annotated[
        str | None,
        typer.Option(help="Comma-separated layers whose MLP keys to export (default: ROME's)."),
    ] = None,
    corpus: CorpusOption = "model",
    samples: SamplesOption = None,
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Write key statistics (computed where not cached) to a bundle others can import."""
    from lmscalpel.core.config import ConfigError
    from lmscalpel.mechanics.stats_bundle import export_statistics

    lm = load(model, **placement(device, dtype))
    try:
        chosen = [int(x) for x in layers.split(",")] if layers else [None]
    except ValueError:
        raise ConfigError(f"--layers takes comma-separated integers, got {layers!r}") from None
    checked = [_rome_layer(lm, layer) for layer in chosen]
    weights = [lm.adapter.mlp_out_weight_name(layer) for layer, _ in checked]
    path = export_statistics(lm, weights, out, corpus, samples or checked[0][1])
    console.print(f"statistics of {', '.join(weights)} written to {path}")


@stats_app.command("import")
@friendly
def import_(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by `stats export`.")],
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Check a statistics bundle against the model and put it in the cache."""
    from lmscalpel.mechanics.stats_bundle import import_statistics

    lm = load(model, **placement(device, dtype))
    for entry in import_statistics(lm, bundle):
        console.print(
            f"{entry.weight} (layer {entry.layer}, {entry.count} tokens) -> {entry.cached_at}"
        )
