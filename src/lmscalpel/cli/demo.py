"""``demo``: one real edit on the embedded model, shown before and after, then reverted."""

from __future__ import annotations

from typing import Annotated

import typer

from lmscalpel.cli.app import ModelOption, app, console, friendly


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
