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
    from .config import ConfigError
    from .locate import TracingError
    from .models import ModelNotAvailableError, UnsupportedArchitectureError
    from .patch import PatchError
    from .requests import EditRequestError

    return (
        ConfigError,
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
    from . import load_model

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


def _config(method: str, config: Path | None, sets: list[str] | None, model_type: str):
    from .methods import editor_class

    cls = editor_class(method).config_class
    base = cls.from_yaml(config, model_type) if config else cls.for_model(model_type)
    overrides = _parse_sets(sets)
    return base.replace(**overrides) if overrides else base


@app.command()
@friendly
def info(model: ModelOption = None) -> None:
    """Show a model's architecture, size, fingerprint and the available methods."""
    from . import available_methods
    from .models import lmscalpel_home, supported_model_types

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
    from . import generate as gen

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
    from . import score_targets, top_tokens

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
    model: ModelOption = None,
    chat: ChatOption = False,
) -> None:
    """Edit a fact and show the model's answers before and after."""
    from . import EditRequest, LocalityProbe, load_requests
    from . import edit as do_edit
    from .report import before_after_table, probe, probes_for

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
    cfg = _config(method, config, set_, lm.model_type)
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
    from .patch import Patch
    from .report import before_after_table, probe, probes_for

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
    from .locate import KINDS, TracingError, noise_level

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
    from .locate import trace
    from .locate.plots import plot_trace, plot_traces

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
    from .locate.aggregate import aggregate as run_aggregate
    from .locate.aggregate import load_knowns
    from .locate.plots import plot_layer_curves, plot_token_classes

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
        console.print(
            f"[bold]MLP effect at the last subject token peaks at layer {peak}[/bold] "
            "(ROME's default edit layer for this model)"
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
    from .demo import run_demo

    run_demo(console, model=model, method=method)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
