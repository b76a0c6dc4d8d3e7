"""The ``lmscalpel`` command: a thin shell over the library."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(
    help="Minimally invasive surgery on language models: edit facts, verify, revert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Embedded model name (smollm2-135m, gemma3-270m), local folder, .gguf file or "
        "cached hub id. Default: the embedded SmolLM2-135M-Instruct.",
    ),
]
ChatOption = Annotated[bool, typer.Option("--chat", help="Wrap prompts in the chat template.")]


def _user_errors() -> tuple[type[Exception], ...]:
    from lmscalpel.core.config import ConfigError
    from lmscalpel.core.requests import EditRequestError
    from lmscalpel.evaluation import DatasetError, EvaluationError
    from lmscalpel.locate import TracingError
    from lmscalpel.models import ModelNotAvailableError, UnsupportedArchitectureError
    from lmscalpel.patch import PatchError

    return (
        ConfigError,
        DatasetError,
        EvaluationError,
        EditRequestError,
        ModelNotAvailableError,
        PatchError,
        TracingError,
        UnsupportedArchitectureError,
        FileNotFoundError,
    )


def friendly(command: Callable) -> Callable:
    """Report a user's mistake as one clear line and exit status 2, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _user_errors() as error:
            console.print(f"[bold red]error:[/bold red] {error}")
            raise typer.Exit(2) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    _setup_logging(verbose)


def _load(model: str | None, chat: bool = False):
    from lmscalpel import load_model

    with console.status(f"loading {model or 'the embedded model'}..."):
        return load_model(model, chat=chat)


def _parse_sets(values: list[str] | None) -> dict:
    overrides = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


def _config(
    method: str,
    config: Path | None,
    sets: list[str] | None,
    model_type: str,
    editor: Path | None = None,
):
    from lmscalpel.methods import editor_class

    cls = editor_class(method).config_class
    base = cls.from_yaml(config, model_type) if config else cls.for_model(model_type)
    overrides = _parse_sets(sets)
    if editor is not None:
        _editor_takers([method], editor)
        overrides["editor"] = str(editor)
    return base.replace(**overrides) if overrides else base


def _editor_takers(methods: list[str], editor: Path) -> list[str]:
    """The methods that take ``--editor`` (learned editors); none of them is a usage error."""
    from lmscalpel.methods import editor_class

    takers = [m for m in methods if "editor" in editor_class(m).config_class.field_names()]
    if not takers:
        raise typer.BadParameter(
            f"--editor {editor} is for learned editors (mend); {', '.join(methods)} takes none"
        )
    return takers


EditorOption = Annotated[
    Path | None,
    typer.Option(help="Folder of a trained editor (for learned methods: mend)."),
]


@app.command()
@friendly
def info(model: ModelOption = None) -> None:
    """Show a model's architecture, size, fingerprint and the available methods."""
    from lmscalpel import available_methods
    from lmscalpel.core.paths import lmscalpel_home
    from lmscalpel.models import supported_model_types

    lm = _load(model)
    a = lm.adapter
    table = Table(show_header=False)
    rows = {
        "model": lm.name,
        "source": str(lm.path or "?"),
        "architecture": f"{a.model_type} ({type(lm.model).__name__})",
        "layers": str(a.num_layers),
        "hidden size": str(a.hidden_size),
        "MLP key size": str(a.mlp_key_size(0)),
        "parameters": f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f} M",
        "context": str(a.max_context),
        "fingerprint": lm.fingerprint,
        "MLP output matrix": a.mlp_out_weight_name(0).replace(".0.", ".{l}."),
        "cache": str(lmscalpel_home()),
        "methods": ", ".join(available_methods()),
        "architectures": ", ".join(supported_model_types()),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


@app.command()
@friendly
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 20,
    chat: ChatOption = False,
) -> None:
    """Greedy continuation of each prompt."""
    from lmscalpel import generate as gen

    lm = _load(model, chat)
    for p, text in zip(prompt, gen(lm, prompt, max_new_tokens=max_new_tokens)):
        console.print(f"[bold]{p}[/bold]{text}")


@app.command()
@friendly
def score(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    targets: Annotated[list[str], typer.Argument(help="Continuations to score.")],
    model: ModelOption = None,
    chat: ChatOption = False,
    top: Annotated[int, typer.Option(help="Also show the top-k next tokens.")] = 5,
) -> None:
    """Teacher-forced log-probabilities of continuations of a prompt."""
    from lmscalpel import score_targets, top_tokens

    lm = _load(model, chat)
    table = Table(title=prompt)
    for column in ("target", "tokens", "mean log P", "P(target)", "token accuracy"):
        table.add_column(column)
    for target, s in zip(targets, score_targets(lm, [prompt] * len(targets), targets)):
        pieces = [lm.tokenizer.decode([t]) for t in s.token_ids]
        table.add_row(
            target,
            repr(pieces),
            f"{s.mean_logprob:.3f}",
            f"{s.prob:.4f}",
            f"{s.token_accuracy:.2f}",
        )
    console.print(table)
    if top:
        console.print(
            "top next tokens: "
            + ", ".join(f"{t!r} {p:.3f}" for t, p in top_tokens(lm, [prompt], top)[0])
        )


@app.command()
@friendly
def edit(
    prompt: Annotated[
        str | None, typer.Option(help="Prompt containing the subject (or {}).")
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="The subject, verbatim in the prompt.")
    ] = None,
    target: Annotated[str | None, typer.Option(help="The new target.")] = None,
    target_true: Annotated[str | None, typer.Option(help="The current (true) target.")] = None,
    paraphrase: Annotated[
        list[str] | None, typer.Option(help="Paraphrase prompt (repeat).")
    ] = None,
    unrelated: Annotated[
        list[str] | None,
        typer.Option(help="Unrelated prompt whose answer must stay, as 'prompt=>answer' (repeat)."),
    ] = None,
    requests: Annotated[
        Path | None, typer.Option(help="JSON/JSONL file of edit requests instead of the flags.")
    ] = None,
    method: Annotated[str, typer.Option(help="Editing method.")] = "ft-l",
    config: Annotated[Path | None, typer.Option(help="YAML file of hyperparameters.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a hyperparameter: key=value.")
    ] = None,
    save: Annotated[Path | None, typer.Option(help="Save the patch to this folder.")] = None,
    editor: EditorOption = None,
    model: ModelOption = None,
    chat: ChatOption = False,
) -> None:
    """Edit a fact and show the model's answers before and after."""
    from lmscalpel import EditRequest, LocalityProbe, load_requests
    from lmscalpel import edit as do_edit
    from lmscalpel.report import before_after_table, probe, probes_for

    if requests is not None:
        reqs = load_requests(requests)
    else:
        if not (prompt and subject and target):
            raise typer.BadParameter("give --prompt, --subject and --target (or --requests FILE)")
        locality = []
        for item in unrelated or []:
            p, sep, answer = item.partition("=>")
            if not sep:
                raise typer.BadParameter(f"--unrelated takes 'prompt=>answer', got {item!r}")
            locality.append(LocalityProbe(p.strip(), answer.strip()))
        reqs = [
            EditRequest(
                prompt=prompt,
                subject=subject,
                target_new=target,
                target_true=target_true,
                paraphrases=tuple(paraphrase or ()),
                locality=tuple(locality),
            )
        ]
    lm = _load(model, chat)
    cfg = _config(method, config, set_, lm.model_type, editor)
    probes = [p for r in reqs for p in probes_for(r)]
    before = probe(lm, probes)
    with console.status(f"editing with {method}..."):
        patch = do_edit(lm, reqs, method=method, config=cfg)
    after = probe(lm, probes)
    console.print(before_after_table(before, after, title=f"{method}: {len(reqs)} edit(s)"))
    if save:
        patch.save(save)
        console.print(f"patch saved to {save}")


@app.command()
@friendly
def apply(
    patch_dir: Annotated[Path, typer.Argument(help="A saved patch folder.")],
    model: ModelOption = None,
    chat: ChatOption = False,
    export: Annotated[
        Path | None, typer.Option(help="Write the edited model as a Hugging Face folder.")
    ] = None,
) -> None:
    """Apply a saved patch and show its requests' answers before and after (optionally export)."""
    from lmscalpel.patch import Patch
    from lmscalpel.report import before_after_table, probe, probes_for

    patch = Patch.load(patch_dir)
    lm = _load(model, chat)
    probes = [p for r in patch.requests for p in probes_for(r)]
    before = probe(lm, probes)
    patch.apply(lm)
    after = probe(lm, probes)
    console.print(before_after_table(before, after, title=f"applied {patch_dir} ({patch.method})"))
    if export:
        patch.export(lm, export)
        console.print(f"edited model exported to {export} (loads with transformers alone)")


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
) -> None:
    """Meta-train a learned editor (MEND) for a model and save it for `edit --editor`."""
    import time

    import torch

    from lmscalpel.evaluation import read_dataset
    from lmscalpel.methods.mend import MENDTrainConfig, save_editor, train_mend

    if method != "mend":
        raise typer.BadParameter(f"{method!r} is not a learned editor; use --method mend")
    if threads:
        torch.set_num_threads(threads)
    start = time.monotonic()
    lm = _load(model)
    base = (
        MENDTrainConfig.from_yaml(config, lm.model_type)
        if config
        else MENDTrainConfig.for_model(lm.model_type)
    )
    overrides = _parse_sets(set_)
    if steps is not None:
        overrides["steps"] = steps
    if max_minutes is not None:
        overrides["max_minutes"] = max_minutes
    cfg = base.replace(**overrides) if overrides else base
    dataset = read_dataset(data)
    records = [request for case in dataset.cases for request in case.requests]
    console.print(
        f"{len(records)} edit records from {data} ({dataset.layout})"
        + (f", {len(dataset.problems)} malformed record(s) skipped" if dataset.problems else "")
    )
    result = train_mend(lm, records, cfg)
    training = {
        "data": str(data),
        "config": cfg.to_dict(),
        **result.summary(),
        "command_seconds": round(time.monotonic() - start, 1),
    }
    save_editor(result.network, lm, out, training)
    table = Table(
        title=f"MEND editor for {lm.name}: trained on {result.n_train} of {len(records)} "
        f"records, {result.n_val} held out"
    )
    columns = ("editor", "step", "edit success", "paraphrase success", "neighbourhood success")
    for column in (*columns, "locality drawdown", "score"):
        table.add_column(column, no_wrap=column == "editor")
    best_step = result.best["step"]
    rows = [
        ("unedited model", "-", result.unedited),
        ("untrained", 0, result.untrained),
        ("trained (best)", best_step, result.best),
    ]
    if result.step_scale_scan and result.step_scale != 1.0:
        chosen = result.step_scale_scan[str(result.step_scale)]
        rows.append((f"x{result.step_scale} (default)", best_step, chosen))
    for label, step, row in rows:
        values = [row[k] for k in ("es", "ps", "ns", "dd", "score")]
        table.add_row(label, str(step), *(f"{v:.3f}" for v in values))
    console.print(table)
    console.print(
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min (stopped: "
        f"{result.stopped}); editor saved to {out} — use it with "
        f"`lmscalpel edit --method mend --editor {out} ...`"
    )


_N = Annotated[int | None, typer.Option("--n", help="Number of cases (default: all).")]
_START = Annotated[int, typer.Option(help="Skip this many cases first (after the shuffle).")]
_SEED = Annotated[int | None, typer.Option(help="Shuffle the cases with this seed before slicing.")]
_LAYOUT = Annotated[str, typer.Option(help="Data layout (default: detected).")]
_PROTOCOL = Annotated[
    str, typer.Option(help="single (edit, measure, revert), batch, or sequential.")
]
_BATCH = Annotated[
    int | None, typer.Option(help="batch protocol: cases per editor call (default: all).")
]
_CHECKPOINTS = Annotated[
    str, typer.Option(help="sequential protocol: re-measure all earlier edits after k edits.")
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
    checkpoints: _CHECKPOINTS = "1,10,100,1000",
    out: _OUT = None,
    config: _CONFIG = None,
    set_: _SETS = None,
    model: ModelOption = None,
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
    dataset = read_dataset(data, layout)
    cases = dataset.select(n, start=start, seed=seed)
    if dataset.problems:
        console.print(
            f"[yellow]{len(dataset.problems)} malformed record(s) of {data} skipped[/yellow] "
            f"(first: {dataset.problems[0]})"
        )
    lm = _load(model, chat)
    configs = _method_configs(methods, config, set_, lm.model_type, editor)
    specs = [MethodSpec(m, c) for m, c in configs]
    if out is None:
        tag = f"{'+'.join(methods)}-{data.stem}-{protocol}-n{len(cases)}"
        tag += (f"-from{start}" if start else "") + (f"-seed{seed}" if seed is not None else "")
        out = Path("runs") / tag
    console.print(
        f"evaluating {', '.join(methods)} on {len(cases)} {dataset.layout} case(s) of {data} "
        f"({protocol} protocol) -> {out}"
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


def _method_configs(
    methods: list[str],
    config: Path | None,
    sets: list[str] | None,
    model_type,
    editor: Path | None = None,
):
    """One config per method: the family defaults, or a YAML file (for several methods: one
    section per method name), then `--set` overrides (`key=value` for every method that has the
    key, `method.key=value` for one), then `--editor` for the learned editors among them."""
    from lmscalpel.core.config import ConfigError
    from lmscalpel.methods import editor_class

    sections: dict = {}
    if config is not None:
        if not config.is_file():
            raise FileNotFoundError(f"no config file at {config}")
        data = yaml.safe_load(config.read_text()) or {}
        if len(methods) > 1 or (isinstance(data, dict) and methods[0] in data):
            if not isinstance(data, dict) or not set(data) <= set(methods):
                raise ConfigError(
                    f"{config}: for several methods, give one section per method "
                    f"({', '.join(methods)}); found {sorted(data) if isinstance(data, dict) else data}"
                )
            sections = data
        else:
            sections = {methods[0]: data}
    overrides = _parse_sets(sets)
    per_method: dict[str, dict] = {m: {} for m in methods}
    for key, value in overrides.items():
        prefix, dot, field = key.partition(".")
        if dot and prefix in per_method:
            per_method[prefix][field] = value
            continue
        takers = [m for m in methods if key in editor_class(m).config_class.field_names()]
        if not takers:
            raise ConfigError(f"no method among {methods} has a hyperparameter {key!r}")
        for m in takers:
            per_method[m][key] = value
    if editor is not None:
        for m in _editor_takers(methods, editor):
            per_method[m]["editor"] = str(editor)
    result = []
    for m in methods:
        cls = editor_class(m).config_class
        base = (
            cls.from_dict(sections[m], model_type, where=f"{config}:{m}")
            if m in sections
            else cls.for_model(model_type)
        )
        result.append((m, base.replace(**per_method[m]) if per_method[m] else base))
    return result


app.command(
    "eval",
    help="Evaluate a method on a benchmark: efficacy, generalization, locality, portability, "
    "fluency; the unedited model is the baseline row.",
)(friendly(evaluate_command))
app.command(
    "compare", help="Evaluate several methods (--methods a,b) on the same cases, side by side."
)(friendly(evaluate_command))


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
    """Compute (once; cached) the key statistics C = E[k kᵀ] that ROME uses for one layer."""
    import time

    from lmscalpel.core.config import ConfigError
    from lmscalpel.mechanics.stats import key_statistics
    from lmscalpel.methods.rome import ROMEConfig

    lm = _load(model)
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
    model: ModelOption = None,
    chat: ChatOption = False,
) -> None:
    """Causal tracing (Meng et al. 2022): where a fact flows from the subject to the answer."""
    from lmscalpel.locate import KINDS, TracingError, noise_level

    kinds = list(KINDS) if kind == "all" else [kind]
    if any(k not in KINDS for k in kinds):
        raise TracingError(f"--kind must be hidden, mlp, attn or all, got {kind!r}")
    if known is None and not (prompt and subject):
        raise typer.BadParameter("give --prompt and --subject (or --known FILE for aggregate mode)")
    if noise_sample is not None and not noise_sample.is_file():
        raise FileNotFoundError(f"no noise sample file at {noise_sample}")
    lm = _load(model, chat)
    sigma = noise if noise is not None else noise_level(lm, noise_sample)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(
        kinds=kinds, samples=samples, window=window, noise=sigma, seed=seed, precision=precision
    )
    if known is not None:
        _trace_aggregate(lm, known, out, n=n, tokens=tokens, **options)
    else:
        _trace_one(lm, prompt, subject, answer, out, **options)


def _trace_one(lm, prompt, subject, answer, out: Path, **options) -> None:
    from lmscalpel.locate import trace
    from lmscalpel.locate.plots import plot_trace, plot_traces

    result = trace(lm, prompt, subject, answer, progress=True, **options)
    files = result.save(out)
    files += [plot_trace(result, k, out / f"trace_{k}.png") for k in result.kinds]
    if len(result.kinds) > 1:
        files.append(plot_traces(result, out / "trace.png"))
    table = Table(title=f"{prompt!r} -> {result.answer!r}")
    for column in ("kind", "strongest restoration (token, layer)", "P_restored", "effect"):
        table.add_column(column)
    for k in result.kinds:
        token, layer = result.strongest(k)
        table.add_row(
            k,
            f"{result.tokens[token]!r} (#{token}), layer {layer}",
            f"{float(result.restored[k][token, layer]):.4f}",
            f"{float(result.indirect_effect(k)[token, layer]):+.4f}",
        )
    console.print(table)
    console.print(
        f"P_clean = {result.p_clean:.4f}, P_corrupted = {result.p_corrupted:.4f} "
        f"(noise sigma {result.noise:.3g}, {result.samples} samples, window {result.window}); "
        f"{result.seconds:.1f} s"
    )
    for path in files:
        console.print(f"wrote {path}")


def _trace_aggregate(lm, known: Path, out: Path, *, n: int, tokens: str, **options) -> None:
    from lmscalpel.locate.aggregate import aggregate as run_aggregate
    from lmscalpel.locate.aggregate import load_knowns
    from lmscalpel.locate.plots import plot_layer_curves, plot_token_classes
    from lmscalpel.mechanics.peaks import MIN_FACTS, record_peak

    summary = run_aggregate(lm, load_knowns(known), n=n, tokens=tokens, out_dir=out, **options)
    curves = summary["last_subject_token"]
    peak = summary.get("mlp_peak_layer")
    title = (
        f"{lm.name}: average indirect effect at the last subject token, "
        f"{summary['facts_traced']} known facts"
    )
    files = [
        out / "summary.json",
        plot_layer_curves(
            {k: v["mean"] for k, v in curves.items()},
            {k: v["stderr"] for k, v in curves.items()},
            out / "last_subject_token.png",
            title=title,
            window=summary["window"],
            peak=peak,
        ),
    ]
    if tokens != "last-subject":
        files.append(
            plot_token_classes(
                summary["token_classes"],
                out / "token_classes.png",
                title=f"{lm.name}: {summary['facts_traced']} known facts",
                window=summary["window"],
            )
        )
    table = Table(title=title)
    for column in ("kind", "peak layer", "peak effect", "effect at last token, same layer"):
        table.add_column(column)
    for k, curve in curves.items():
        best = max(range(len(curve["mean"])), key=curve["mean"].__getitem__)
        last = summary["token_classes"][k]["last token"]
        table.add_row(
            k,
            str(best),
            f"{curve['mean'][best]:+.4f}",
            "-" if last is None else f"{last[best]:+.4f}",
        )
    console.print(table)
    console.print(
        f"{summary['facts_known']} of {summary['facts_checked']} facts checked are known to the "
        f"model; P_clean {summary['p_clean_mean']:.3f}, P_corrupted "
        f"{summary['p_corrupted_mean']:.3f}; {summary['seconds_per_fact']:.1f} s per fact"
    )
    if peak is not None:
        kept = record_peak(summary)
        console.print(
            f"[bold]MLP effect at the last subject token peaks at layer {peak}[/bold] "
            + (
                "(recorded as ROME's default edit layer for this model)"
                if kept
                else f"(fewer than {MIN_FACTS} facts: not recorded as ROME's default layer)"
            )
        )
    for path in files:
        console.print(f"wrote {path}")


@app.command()
@friendly
def demo(
    model: ModelOption = None,
    method: Annotated[
        str | None, typer.Option(help="Editing method (default: the best one).")
    ] = None,
) -> None:
    """Edit 'The Eiffel Tower is in Paris' to Rome on the embedded model, show it, revert it."""
    from lmscalpel.demo import run_demo

    run_demo(console, model=model, method=method)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
