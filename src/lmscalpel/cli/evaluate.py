"""``eval`` and ``compare``: evaluate methods on a benchmark beside the unedited model.

``torchrun --nproc-per-node N -m lmscalpel eval ...`` shards the cases of the single and batch
protocols among N processes (:mod:`lmscalpel.evaluation.runner`); rank 0 writes the run folder
and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscalpel.cli.app import (
    ChatOption,
    DeviceOption,
    DtypeOption,
    EditorOption,
    ModelOption,
    app,
    console,
    friendly,
    load,
    overrides,
    placement,
)

_N = Annotated[int | None, typer.Option("--n", help="Number of cases (default: all).")]
_START = Annotated[int, typer.Option(help="Skip this many cases first (after the shuffle).")]
_SEED = Annotated[int | None, typer.Option(help="Shuffle the cases with this seed before slicing.")]
_LAYOUT = Annotated[str, typer.Option(help="Data layout (default: detected).")]
_PROTOCOL = Annotated[
    str, typer.Option(help="single (edit, measure, revert), batch, or sequential.")
]
_BATCH = Annotated[
    int | None,
    typer.Option(
        help="Cases per editor call: batch protocol (default: all), sequential protocol "
        "(edits accumulate in groups of this size; default 1)."
    ),
]
_CHECKPOINTS = Annotated[
    str,
    typer.Option(
        help="sequential protocol: re-measure all earlier edits after k edits (a checkpoint "
        "inside a group: at the first group boundary after it)."
    ),
]
_OUT = Annotated[
    Path | None,
    typer.Option(
        help="Output folder (default: runs/<methods>-<data>-<protocol>-n<N>); "
        "the same folder resumes a killed run."
    ),
]
_CONFIG = Annotated[
    Path | None,
    typer.Option(help="YAML hyperparameters (compare: one section per method)."),
]
_SETS = Annotated[
    list[str] | None,
    typer.Option("--set", help="Hyperparameter override key=value (compare: method.key=value)."),
]
_FLUENCY_CASES = Annotated[
    int, typer.Option(help="Cases whose long generations measure fluency (0: off).")
]
_FLUENCY_PROMPTS = Annotated[int, typer.Option(help="Fluency prompts per case.")]
_FLUENCY_TOKENS = Annotated[int, typer.Option(help="Tokens generated per fluency prompt.")]
_EXACT = Annotated[
    bool, typer.Option(help="Also judge answers by greedy generation (exact match).")
]
_OVERWRITE = Annotated[bool, typer.Option(help="Start over in an existing output folder.")]


DataOption = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Benchmark file (CounterFact, ROME, zsRE, KnowEdit, MQuAKE, "
        "knowns, or a JSON/JSONL of edit requests).",
    ),
]


def evaluate_command(
    methods: Annotated[
        str, typer.Option("--method", "--methods", help="Method, or comma-separated methods.")
    ],
    data: DataOption,
    n: _N = None,
    start: _START = 0,
    seed: _SEED = None,
    layout: _LAYOUT = "auto",
    protocol: _PROTOCOL = "single",
    batch_size: _BATCH = None,
    checkpoints: _CHECKPOINTS = "1,10,100,500,1000,2000",  # EvalOptions.checkpoints
    out: _OUT = None,
    config: _CONFIG = None,
    set_: _SETS = None,
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    chat: ChatOption = False,
    fluency_cases: _FLUENCY_CASES = 10,
    fluency_prompts: _FLUENCY_PROMPTS = 2,
    fluency_tokens: _FLUENCY_TOKENS = 100,
    exact_match: _EXACT = True,
    overwrite: _OVERWRITE = False,
    editor: EditorOption = None,
) -> None:
    """`eval` and `compare`: load the data, evaluate, print the table and write the results."""
    import time

    from lmscalpel.evaluation import EvalOptions, MethodSpec, compare, console_table, read_dataset
    from lmscalpel.methods.config_files import method_configs
    from lmscalpel.runtime.distributed import is_rank_zero

    shown = is_rank_zero()  # under torchrun every rank evaluates its share, rank 0 reports

    started = time.perf_counter()
    try:
        points = tuple(int(c) for c in checkpoints.split(",") if c.strip())
    except ValueError:
        raise typer.BadParameter(
            f"--checkpoints takes numbers like 1,10,100, got {checkpoints!r}"
        ) from None
    options = EvalOptions(
        protocol=protocol,
        batch_size=batch_size,
        checkpoints=points,
        exact_match=exact_match,
        fluency_cases=fluency_cases,
        fluency_prompts=fluency_prompts,
        fluency_tokens=fluency_tokens,
    )
    methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise typer.BadParameter("--method takes a method name (or several, comma-separated)")
    sets = overrides(set_)
    dataset = read_dataset(data, layout)
    cases = dataset.select(n, start=start, seed=seed)
    if dataset.problems and shown:
        console.print(
            f"[yellow]{len(dataset.problems)} malformed record(s) of {data} skipped[/yellow] "
            f"(first: {dataset.problems[0]})"
        )
    lm = load(model, chat, **placement(device, dtype))
    configs = method_configs(methods, lm.model_type, config, sets, editor)
    specs = [MethodSpec(m, c) for m, c in configs]
    if out is None:
        tag = f"{'+'.join(methods)}-{data.stem}-{protocol}-n{len(cases)}"
        tag += f"-b{batch_size}" if batch_size is not None and protocol != "single" else ""
        tag += (f"-from{start}" if start else "") + (f"-seed{seed}" if seed is not None else "")
        out = Path("runs") / tag
    per_call = f", {batch_size} per editor call" if batch_size and protocol != "single" else ""
    if shown:
        console.print(
            f"evaluating {', '.join(methods)} on {len(cases)} {dataset.layout} case(s) of {data} "
            f"({protocol} protocol{per_call}) -> {out}"
        )
    summary = compare(
        lm,
        cases,
        specs,
        options=options,
        out=out,
        overwrite=overwrite,
        info={
            "data": str(data),
            "layout": dataset.layout,
            "selection": {"n": n, "start": start, "seed": seed},
            "malformed_records": [str(p) for p in dataset.problems],
        },
    )
    if not shown:
        return
    if not console.is_terminal:
        console.width = max(console.width, 200)
    console.print(console_table(summary))
    left_out = summary.info["left_out_cases"]
    if left_out:
        console.print(f"[yellow]{len(left_out)} case(s) left out[/yellow]: {left_out[0]['reason']}")
    written = ["summary.json", "table.md", "metrics.png"]
    written += ["retention.png"] if summary.retention else []
    console.print(
        f"wrote {', '.join(str(out / w) for w in written)} and per-case JSONL "
        f"in {time.perf_counter() - started:.0f} s"
    )


app.command(
    "eval",
    help="Evaluate a method on a benchmark: efficacy, generalization, locality, portability, "
    "fluency; the unedited model is the baseline row.",
)(friendly(evaluate_command))
app.command(
    "compare", help="Evaluate several methods (--methods a,b) on the same cases, side by side."
)(friendly(evaluate_command))
