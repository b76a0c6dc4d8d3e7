"""``trace``: causal tracing of one prompt, or the aggregate over known facts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmscalpel.cli.app import (
    ChatOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    app,
    console,
    friendly,
    load,
    placement,
)


@app.command("trace")
@friendly
def trace_command(
    out: Annotated[Path, typer.Option(help="Folder for the arrays, JSON and PNG heatmaps.")],
    prompt: Annotated[str | None, typer.Option(help="The prompt to trace.")] = None,
    subject: Annotated[
        str | None, typer.Option(help="The subject, verbatim in the prompt (it gets the noise).")
    ] = None,
    answer: Annotated[
        str | None, typer.Option(help="The answer to trace (default: the model's top token).")
    ] = None,
    known: Annotated[
        Path | None,
        typer.Option(
            help="Aggregate mode: a known-facts JSON (e.g. ../shared/data/knowns/known_1000.json)"
            "; traces the first --n facts the model gets right and averages them."
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Aggregate mode: facts to trace.")] = 100,
    tokens: Annotated[
        str,
        typer.Option(
            help="Aggregate mode: tokens to trace: last-subject, classes (first/last subject, "
            "first subsequent, last token) or all."
        ),
    ] = "last-subject",
    kind: Annotated[str, typer.Option(help="hidden, mlp, attn or all.")] = "all",
    samples: Annotated[int, typer.Option(help="Noise samples averaged over.")] = 10,
    window: Annotated[
        int | None,
        typer.Option(help="Layers restored together for mlp/attn (default: 10, fewer if shallow)."),
    ] = None,
    noise: Annotated[
        float | None,
        typer.Option(help="Noise sigma (default: 3 x std of subject-token embeddings)."),
    ] = None,
    noise_sample: Annotated[
        Path | None,
        typer.Option(help="Known-facts JSON whose subjects set the noise (default: known_1000)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise draws.")] = 0,
    precision: Annotated[
        str,
        typer.Option(help="float32, or bfloat16 (about 2.4x faster on CPUs with AVX512-BF16)."),
    ] = "float32",
    record_peak: Annotated[
        bool,
        typer.Option(
            "--record-peak",
            help="Aggregate mode: keep the MLP peak as ROME's default edit layer for this model "
            "(needs enough facts, see --n; `lmscalpel info` shows it). Without it, "
            "tracing changes nothing outside --out.",
        ),
    ] = False,
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    chat: ChatOption = False,
) -> None:
    """Causal tracing (Meng et al. 2022): where a fact flows from the subject to the answer."""
    from lmscalpel.locate import KINDS, TracingError, noise_level
    from lmscalpel.mechanics import peaks

    kinds = list(KINDS) if kind == "all" else [kind]
    if any(k not in KINDS for k in kinds):
        raise TracingError(f"--kind must be hidden, mlp, attn or all, got {kind!r}")
    if known is None and not (prompt and subject):
        raise typer.BadParameter("give --prompt and --subject (or --known FILE for aggregate mode)")
    if record_peak:
        if known is None:
            raise typer.BadParameter("--record-peak records an aggregate's peak: add --known FILE")
        if "mlp" not in kinds:
            raise typer.BadParameter("--record-peak records the MLP peak: trace --kind mlp or all")
        if n < peaks.MIN_FACTS:
            raise typer.BadParameter(
                f"--record-peak needs at least {peaks.MIN_FACTS} facts (--n {n}): fewer give "
                "too noisy a peak to become a default"
            )
    if noise_sample is not None and not noise_sample.is_file():
        raise FileNotFoundError(f"no noise sample file at {noise_sample}")
    lm = load(model, chat, **placement(device, dtype))
    sigma = noise if noise is not None else noise_level(lm, noise_sample)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(
        kinds=kinds, samples=samples, window=window, noise=sigma, seed=seed, precision=precision
    )
    if known is not None:
        _trace_aggregate(lm, known, out, n=n, tokens=tokens, record=record_peak, **options)
    else:
        _trace_one(lm, prompt, subject, answer, out, **options)


def _trace_one(lm, prompt, subject, answer, out: Path, **options) -> None:
    from lmscalpel.locate import trace
    from lmscalpel.locate.outputs import save_trace, strongest_restorations

    result = trace(lm, prompt, subject, answer, progress=True, **options)
    files = save_trace(result, out)
    table = Table(title=f"{prompt!r} -> {result.answer!r}")
    for column in ("kind", "strongest restoration (token, layer)", "P_restored", "effect"):
        table.add_column(column)
    for row in strongest_restorations(result):
        table.add_row(
            row.kind,
            f"{result.tokens[row.token]!r} (#{row.token}), layer {row.layer}",
            f"{row.restored:.4f}",
            f"{row.effect:+.4f}",
        )
    console.print(table)
    console.print(
        f"P_clean = {result.p_clean:.4f}, P_corrupted = {result.p_corrupted:.4f} "
        f"(noise sigma {result.noise:.3g}, {result.samples} samples, window {result.window}); "
        f"{result.seconds:.1f} s"
    )
    for path in files:
        console.print(f"wrote {path}")


def _trace_aggregate(lm, known: Path, out: Path, *, n: int, tokens: str, record: bool, **options):
    from lmscalpel.locate.outputs import trace_known_facts
    from lmscalpel.mechanics.peaks import MIN_FACTS, peaks_file, record_peak

    done = trace_known_facts(lm, known, out, n=n, tokens=tokens, **options)
    summary = done.summary
    table = Table(title=done.title)
    for column in ("kind", "peak layer", "peak effect", "effect at last token, same layer"):
        table.add_column(column)
    for peak in done.peaks:
        last = "-" if peak.last_token_effect is None else f"{peak.last_token_effect:+.4f}"
        table.add_row(peak.kind, str(peak.layer), f"{peak.effect:+.4f}", last)
    console.print(table)
    console.print(
        f"{summary['facts_known']} of {summary['facts_checked']} facts checked are known to the "
        f"model; P_clean {summary['p_clean_mean']:.3f}, P_corrupted "
        f"{summary['p_corrupted_mean']:.3f}; {summary['seconds_per_fact']:.1f} s per fact"
    )
    layer = done.mlp_peak_layer
    if layer is not None:
        console.print(f"[bold]MLP effect at the last subject token peaks at layer {layer}[/bold]")
        if not record:
            console.print(
                "not recorded: add --record-peak to make it ROME's default edit layer for this "
                "model"
            )
        elif record_peak(summary, source=f"lmscalpel trace --known {known} --out {out}"):
            console.print(
                f"recorded as ROME's default edit layer for this model in {peaks_file()} "
                "(`lmscalpel info` shows it; `--set layer=L` still wins)"
            )
        else:
            console.print(
                f"[yellow]not recorded[/yellow]: only {summary['facts_traced']} facts traced "
                f"(the model knows too few of {known}); a default needs at least "
                f"{MIN_FACTS}"
            )
    for path in done.files:
        console.print(f"wrote {path}")
