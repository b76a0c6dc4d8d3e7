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
    from .models import ModelNotAvailableError, UnsupportedArchitectureError
    from .patch import PatchError
    from .requests import EditRequestError

    return (
        ConfigError,
        EditRequestError,
        ModelNotAvailableError,
        PatchError,
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


def _config(
    method: str,
    config: Path | None,
    sets: list[str] | None,
    model_type: str,
    editor: Path | None = None,
):
    from .methods import editor_class

    cls = editor_class(method).config_class
    base = cls.from_yaml(config, model_type) if config else cls.for_model(model_type)
    overrides = _parse_sets(sets)
    if editor is not None:
        if "editor" not in cls.field_names():
            raise typer.BadParameter(
                f"--editor is for learned editors (mend); method {method!r} takes none"
            )
        overrides["editor"] = str(editor)
    return base.replace(**overrides) if overrides else base


EditorOption = Annotated[
    Path | None,
    typer.Option(help="Folder of a trained editor (for learned methods: mend)."),
]


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
    editor: EditorOption = None,
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


@app.command("train-editor")
@friendly
def train_editor(
    data: Annotated[
        Path,
        typer.Option(
            help="Edit records: CounterFact (e.g. ../shared/data/counterfact/train.json), zsRE "
            "(MEND layout) or lmscalpel requests."
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

    from .methods.mend import MENDTrainConfig, load_edit_records, save_editor, train_mend

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
    records = load_edit_records(data)
    console.print(f"{len(records)} edit records from {data}")
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
    for column in ("editor", "step", "edit success", "paraphrase success", "locality drawdown"):
        table.add_column(column)
    for label, row in (("untrained", result.untrained), ("trained (best)", result.best)):
        table.add_row(
            label,
            str(row.get("step", 0)),
            f"{row['es']:.3f}",
            f"{row['ps']:.3f}",
            f"{row['dd']:.3f}",
        )
    console.print(table)
    console.print(
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min (stopped: "
        f"{result.stopped}); editor saved to {out} — use it with "
        f"`lmscalpel edit --method mend --editor {out} ...`"
    )


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
