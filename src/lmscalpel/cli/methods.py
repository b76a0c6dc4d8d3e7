"""``methods``: every editing method's hyperparameters, with their defaults and help lines."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lmscalpel.cli.app import app, console, friendly, load


def config_table(method: str, model_type: str | None) -> Table:
    """One method's config fields (:meth:`~lmscalpel.core.config.MethodConfig.describe`) as a
    table: name, type, default for ``model_type``'s family (generic when ``None``), help."""
    from lmscalpel.methods import editor_class

    cls = editor_class(method)
    family = f"defaults for {model_type}" if model_type else "generic defaults"
    title = f"{method}: {cls.citation}" if cls.citation else method
    title = escape(f"{title} ({cls.config_class.__name__}, {family})")
    table = Table(title=title, title_justify="left")
    for column in ("field", "type", "default", "help"):
        table.add_column(column, no_wrap=column == "field")
    for field in cls.config_class.describe(model_type):
        help_line = field.help or "-"
        if field.allowed:
            help_line = f"{help_line} [{field.allowed}]"
        cells = (field.name, field.type, repr(field.default), help_line)
        table.add_row(*(escape(cell) for cell in cells))
    return table


@app.command("methods")
@friendly
def methods_command(
    names: Annotated[
        list[str] | None, typer.Argument(help="Methods to show (default: every method).")
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(
            help="Model family (config.model_type: llama, gpt2, ...) whose defaults to show; "
            "default: the generic ones, or the family of --model."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Show the defaults for this model's family (loads the model)."
        ),
    ] = None,
) -> None:
    """List the editing methods and every hyperparameter: type, default and what it does."""
    from lmscalpel.core.config import ConfigError
    from lmscalpel.methods import available_methods
    from lmscalpel.methods.config_files import check_methods
    from lmscalpel.models import supported_model_types

    names = list(names or available_methods())
    check_methods(names)
    if family is not None and family not in supported_model_types():
        raise ConfigError(
            f"unknown model family {family!r}; supported: {', '.join(supported_model_types())}"
        )
    model_type = load(model).model_type if model is not None else family
    for name in names:
        console.print(config_table(name, model_type))
    console.print("Set any of them with --set field=value or --config FILE.yaml.")
