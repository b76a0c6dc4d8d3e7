"""``edit`` and ``apply``: change a fact, show the answers before and after, save or export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscalpel.cli.app import (
    ChatOption,
    EditorOption,
    ModelOption,
    app,
    console,
    friendly,
    load,
    overrides,
)
from lmscalpel.cli.methods import config_table


def _flag_request(prompt, subject, target, target_true, paraphrase, unrelated):
    """The one edit request the flags describe."""
    from lmscalpel.core.requests import EditRequest, LocalityProbe

    if not (prompt and subject and target):
        raise typer.BadParameter("give --prompt, --subject and --target (or --requests FILE)")
    locality = []
    for item in unrelated or []:
        p, sep, answer = item.partition("=>")
        if not sep:
            raise typer.BadParameter(f"--unrelated takes 'prompt=>answer', got {item!r}")
        locality.append(LocalityProbe(p.strip(), answer.strip()))
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=target,
        target_true=target_true,
        paraphrases=tuple(paraphrase or ()),
        locality=tuple(locality),
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
    help_config: Annotated[
        bool,
        typer.Option(
            "--help-config",
            help="List --method's hyperparameters (type, default for the model, help) and exit.",
        ),
    ] = False,
) -> None:
    """Edit a fact and show the model's answers before and after."""
    from lmscalpel.core.requests import load_requests
    from lmscalpel.editing import edit as do_edit
    from lmscalpel.methods.config_files import check_methods, method_configs
    from lmscalpel.report import before_after_table, probe, probes_for

    if help_config:
        check_methods([method])
        console.print(config_table(method, load(model, chat).model_type))
        return
    if requests is not None:
        reqs = load_requests(requests)
    else:
        reqs = [_flag_request(prompt, subject, target, target_true, paraphrase, unrelated)]
    sets = overrides(set_)
    lm = load(model, chat)
    [(_, cfg)] = method_configs([method], lm.model_type, config, sets, editor)
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
    lm = load(model, chat)
    probes = [p for r in patch.requests for p in probes_for(r)]
    before = probe(lm, probes)
    patch.apply(lm)
    after = probe(lm, probes)
    console.print(before_after_table(before, after, title=f"applied {patch_dir} ({patch.method})"))
    if export:
        patch.export(lm, export)
        console.print(f"edited model exported to {export} (loads with transformers alone)")
