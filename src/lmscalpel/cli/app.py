"""The typer app, the options every command shares, and one-line reports of user mistakes.

Commands live one group per module (:mod:`.model`, :mod:`.edit`, :mod:`.methods`, :mod:`.train`,
:mod:`.evaluate`, :mod:`.stats`, :mod:`.trace`, :mod:`.demo`); each parses its arguments, calls
the library and prints. They import the library inside the command so that ``lmscalpel --help``
starts fast.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

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
EditorOption = Annotated[
    Path | None,
    typer.Option(help="Folder of a trained editor (for learned methods: mend)."),
]


def _user_errors() -> tuple[type[Exception], ...]:
    from lmscalpel.core.config import ConfigError
    from lmscalpel.core.requests import EditRequestError
    from lmscalpel.data.datasets import DatasetError
    from lmscalpel.evaluation import EvaluationError
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
            console.print(f"[bold red]error:[/bold red] {escape(str(error))}", soft_wrap=True)
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


def load(model: str | None, chat: bool = False):
    """The model named by ``--model``, loaded behind a status line."""
    from lmscalpel.models import load_model

    with console.status(f"loading {model or 'the embedded model'}..."):
        return load_model(model, chat=chat)


def overrides(values: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` options as a dict (a malformed one is a usage error)."""
    from lmscalpel.core.config import ConfigError
    from lmscalpel.methods.config_files import parse_overrides

    try:
        return parse_overrides(values)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--set") from None
