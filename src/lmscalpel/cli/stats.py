"""``stats``: ROME's key statistics C = E[k kᵀ] for one layer (computed once, then cached)."""

from __future__ import annotations

from typing import Annotated

import typer

from lmscalpel.cli.app import ModelOption, app, console, friendly, load


@app.command()
@friendly
def stats(
    layer: Annotated[
        int | None, typer.Option(help="Layer whose MLP keys to measure (default: ROME's layer).")
    ] = None,
    corpus: Annotated[
        str,
        typer.Option(
            help="'model' (text the model samples itself), a .txt/.jsonl/.json file or a folder, "
            "a Hugging Face dataset folder (save_to_disk) or hf:NAME[:CONFIG][@SPLIT] from the "
            "local datasets cache."
        ),
    ] = "model",
    samples: Annotated[int | None, typer.Option(help="Tokens to accumulate.")] = None,
    model: ModelOption = None,
) -> None:
    """Compute (once; cached) ROME's key statistics for one layer: C, the MLP keys' 2nd moment."""
    import time

    from lmscalpel.core.config import ConfigError
    from lmscalpel.mechanics.stats import key_statistics
    from lmscalpel.methods.rome import ROMEConfig

    lm = load(model)
    config = ROMEConfig.for_model(lm.model_type)
    layer = config.edit_layer(lm.adapter.num_layers, lm.fingerprint) if layer is None else layer
    if not 0 <= layer < lm.adapter.num_layers:
        raise ConfigError(
            f"layer {layer} out of range: this model has layers 0..{lm.adapter.num_layers - 1}"
        )
    start = time.perf_counter()
    result = key_statistics(lm, layer, corpus, samples or config.stats_samples)
    console.print(
        f"layer {layer}: C = E[k kᵀ] ({result.moment.shape[0]}×{result.moment.shape[1]}) over "
        f"{result.count} tokens of {result.corpus} in {time.perf_counter() - start:.1f} s\n"
        f"cached at {result.path}"
    )
