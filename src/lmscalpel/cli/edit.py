"""``edit`` and ``apply``: change a fact, show the answers before and after, save or export."""

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
from lmscalpel.cli.methods import config_table


def _flag_request(prompt, subject, target, target_true, paraphrase, unrelated):
    """The one edit request the flags describe (an :class:`EditRequestError` naming the flag when
    they do not describe one)."""
    from lmscalpel.core.requests import EditRequest, EditRequestError, LocalityProbe

    missing = [
        flag
        for flag, value in (("--prompt", prompt), ("--subject", subject), ("--target", target))
        if value is None
    ]
    if missing:
        raise EditRequestError(
            f"give --prompt, --subject and --target (or --requests FILE); missing "
            f"{', '.join(missing)}"
        )
    locality = []
    for i, item in enumerate(unrelated or []):
        p, sep, answer = item.partition("=>")
        if not sep:
            raise EditRequestError(f"--unrelated takes 'prompt=>answer', got {item!r}")
        try:
            locality.append(LocalityProbe(p.strip(), answer.strip()))
        except EditRequestError as error:
            raise EditRequestError(f"--unrelated {i + 1} ({item!r}): {error}") from None
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=target,
        target_true=target_true,
        paraphrases=tuple(paraphrase or ()),
        locality=tuple(locality),
    )


def _check_output(path: Path | None, marker: str, what: str) -> None:
    """Refuse, before any work, an output folder that the writer would refuse at the end: a file
    in the way, or a folder of something else (the writers never delete a stranger's folder)."""
    from lmscalpel.core.files import replaceable
    from lmscalpel.patch import PatchError

    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise PatchError(f"cannot write {what} to {path}: a file is in the way")
    if not replaceable(path, marker):
        raise PatchError(f"{path} exists and is not {what}; choose another folder")


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
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    help_config: Annotated[
        bool,
        typer.Option(
            "--help-config",
            help="List --method's hyperparameters (type, default for the model, help) and exit.",
        ),
    ] = False,
) -> None:
    """Edit a fact and show the model's answers before and after."""
    from lmscalpel.core.requests import as_requests, load_requests
    from lmscalpel.editing import edit as do_edit
    from lmscalpel.editing import validate_requests
    from lmscalpel.methods.config_files import check_methods, method_configs
    from lmscalpel.patch import META_FILE
    from lmscalpel.report import before_after_table, probe, probes_for

    check_methods([method])
    if help_config:
        console.print(
            config_table(method, load(model, chat, **placement(device, dtype)).model_type)
        )
        return
    # Everything the user gave is checked before the model runs (and, where it can be, before it
    # loads): the method, the overrides, the requests, the --save path; then the config for the
    # model's family, and the requests against its tokenizer and context.
    sets = overrides(set_)
    if requests is not None:
        reqs = as_requests(load_requests(requests))
    else:
        reqs = [_flag_request(prompt, subject, target, target_true, paraphrase, unrelated)]
    _check_output(save, META_FILE, "a saved patch")
    method_configs([method], None, config, sets, editor)  # generic check, before the model loads
    lm = load(model, chat, **placement(device, dtype))
    [(_, cfg)] = method_configs([method], lm.model_type, config, sets, editor)
    validate_requests(lm, reqs)
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
    patch_dirs: Annotated[
        list[Path], typer.Argument(help="Saved patch folder(s), applied in order.")
    ],
    model: ModelOption = None,
    chat: ChatOption = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    export: Annotated[
        Path | None, typer.Option(help="Write the edited model as a Hugging Face folder.")
    ] = None,
    export_lora: Annotated[
        Path | None,
        typer.Option(
            help="Write the patch(es), stacked, as one PEFT LoRA adapter folder "
            "(adapter_config.json + adapter_model.safetensors)."
        ),
    ] = None,
    lora_rank: Annotated[
        int | None,
        typer.Option(
            help="Rank of the truncated SVD for dense deltas (fine-tuning patches); low-rank "
            "patches are exported exactly."
        ),
    ] = None,
) -> None:
    """Apply saved patches and show their requests' answers before and after (optionally
    export the edited model, or the patches as a LoRA adapter)."""
    from lmscalpel.core.config import ConfigError
    from lmscalpel.editing import validate_requests
    from lmscalpel.lora_adapter import AUDIT_FILE, export_lora_adapter
    from lmscalpel.patch import EXPORT_FILE, Patch
    from lmscalpel.report import before_after_table, probe, probes_for

    if export is not None and len(patch_dirs) > 1:
        raise ConfigError("--export takes one patch; use --export-lora to export several")
    if lora_rank is not None and lora_rank < 1:
        raise ConfigError(f"--lora-rank must be at least 1, got {lora_rank}")
    _check_output(export, EXPORT_FILE, "an exported model")
    _check_output(export_lora, AUDIT_FILE, "an exported adapter")
    patches = [Patch.load(folder) for folder in patch_dirs]
    lm = load(model, chat, **placement(device, dtype))
    # refused before the model runs: a first patch made for other weights, a request too long
    patches[0].check_compatible(lm)
    validate_requests(lm, [r for patch in patches for r in patch.requests])
    if export_lora is not None:
        export_lora_adapter(lm, patches, export_lora, rank=lora_rank)
        console.print(
            f"LoRA adapter written to {export_lora} "
            f"(load with peft.PeftModel.from_pretrained(base, {str(export_lora)!r}))"
        )
    probes = [p for patch in patches for r in patch.requests for p in probes_for(r)]
    before = probe(lm, probes)
    for patch in patches:
        patch.apply(lm)
    after = probe(lm, probes)
    names = ", ".join(str(folder) for folder in patch_dirs)
    methods = ", ".join(dict.fromkeys(patch.method for patch in patches))
    console.print(before_after_table(before, after, title=f"applied {names} ({methods})"))
    if export:
        patches[0].export(lm, export)
        console.print(f"edited model exported to {export} (loads with transformers alone)")
