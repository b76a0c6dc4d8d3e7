"""``info``, ``generate``, ``score``: look at a model.

Each takes ``--trust-remote-code`` and ``--allow-pickle``, the opt-ins without which a model folder
that ships its own code or holds only pickle weights is refused (see
:mod:`lmscalpel.models.loading`); every command takes them as root options too
(``lmscalpel --allow-pickle edit ...``). Prompts and targets are checked before the model loads.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
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

TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run the modelling code a model folder ships (auto_map, *.py). Read it first: "
        "without this option such a folder is refused.",
    ),
]
AllowPickleOption = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Read pickle weights (pytorch_model.bin) from a folder without safetensors; "
        "without this option such a folder is refused (unpickling can run code).",
    ),
]


def opt_ins(trust_remote_code: bool, allow_pickle: bool) -> dict[str, bool]:
    """The model-safety opt-ins given to a command, for :func:`~lmscalpel.cli.app.load` (which
    otherwise uses the root's ``lmscalpel --trust-remote-code/--allow-pickle``)."""
    given = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    return {name: True for name, value in given.items() if value}


REASONS = {
    "config": "set in the config",
    "recorded": "your recorded trace peak",
    "shipped": "trace peak shipped with lmscalpel",
    "depth": "family default depth",
}


@app.command()
@friendly
def info(
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Show a model's architecture, size, fingerprint, methods, and which layer ROME edits (why)."""
    from lmscalpel.core.paths import lmscalpel_home
    from lmscalpel.methods import available_methods
    from lmscalpel.methods.rome import ROMEConfig
    from lmscalpel.models import supported_model_types

    lm = load(model, **opt_ins(trust_remote_code, allow_pickle), **placement(device, dtype))
    a = lm.adapter
    choice = ROMEConfig.for_model(lm.model_type).layer_choice(a.num_layers, lm.fingerprint)
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
        "ROME edit layer": f"{choice.layer} ({REASONS[choice.reason]})",
        "cache": str(lmscalpel_home()),
        "methods": ", ".join(available_methods()),
        "architectures": ", ".join(supported_model_types()),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)
    console.print(escape(f"ROME edits layer {choice.layer}: {choice.explain()}."))


@app.command()
@friendly
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 20,
    chat: ChatOption = False,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Greedy continuation of each prompt."""
    from lmscalpel.core.requests import check_text
    from lmscalpel.scoring import generate as greedy

    prompt = [check_text(p, "the prompt") for p in prompt]  # before the model loads
    lm = load(model, chat, **opt_ins(trust_remote_code, allow_pickle), **placement(device, dtype))
    for p, text in zip(prompt, greedy(lm, prompt, max_new_tokens=max_new_tokens)):
        console.print(f"[bold]{p}[/bold]{text}")


@app.command()
@friendly
def score(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    targets: Annotated[list[str], typer.Argument(help="Continuations to score.")],
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    chat: ChatOption = False,
    top: Annotated[int, typer.Option(help="Also show the top-k next tokens.")] = 5,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Teacher-forced log-probabilities of continuations of a prompt."""
    from lmscalpel.core.requests import check_text
    from lmscalpel.scoring import score_targets, top_tokens

    prompt = check_text(prompt, "the prompt")  # before the model loads
    targets = [check_text(t, "a target") for t in targets]
    lm = load(model, chat, **opt_ins(trust_remote_code, allow_pickle), **placement(device, dtype))
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
