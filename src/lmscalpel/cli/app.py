"""The typer app, the options every command shares, and one-line reports of user mistakes.

Commands live one group per module (:mod:`.model`, :mod:`.edit`, :mod:`.methods`, :mod:`.train`,
:mod:`.evaluate`, :mod:`.stats`, :mod:`.trace`, :mod:`.demo`); each parses its arguments, calls
the library and prints. They import the library inside the command so that ``lmscalpel --help``
starts fast.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from typer.core import TyperGroup

errors = Console(stderr=True, soft_wrap=True, highlight=False)


#: click's base of usage errors, as the click typer runs on (typer vendors one) defines it.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """The root command: click's own usage errors (an unknown option, a missing value, a number
    that is not one) are one line on stderr and exit status 2, like lmscalpel's errors."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except (_CLICK_ERROR, typer.TyperException) as error:
            message = _one_line(error.format_message())
            if message:  # (none when the help was shown instead: no arguments at all)
                context = getattr(error, "ctx", None)
                where = f"{context.command_path} --help" if context is not None else "--help"
                hint = f" (see '{where}')"
                errors.print(f"[bold red]error:[/bold red] {escape(message)}{hint}")
            sys.exit(getattr(error, "exit_code", 2))
        except typer.Abort:
            errors.print("Aborted!")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


app = typer.Typer(
    cls=OneLineErrors,
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
_DEVICE_HELP = "Where to run the model: auto (a GPU when there is one), cpu, cuda, cuda:N or mps."
_DTYPE_HELP = (
    "Parameter dtype: float32, bfloat16 (bf16) or float16 (fp16); edits compute in float32 "
    "whatever it is."
)
#: A command's own --device / --dtype (default: the root's), for commands that load a model.
DeviceOption = Annotated[str | None, typer.Option(help=_DEVICE_HELP + " Default: the root's.")]
DtypeOption = Annotated[str | None, typer.Option(help=_DTYPE_HELP + " Default: the root's.")]


def placement(device: str | None, dtype: str | None) -> dict[str, str]:
    """A command's own ``--device`` / ``--dtype`` as :func:`load` options (unset: the root's)."""
    chosen = {"device": device, "dtype": dtype}
    return {key: value for key, value in chosen.items() if value is not None}


#: Errors of lmscalpel's that are not importable everywhere yet (module, class name).
_OPTIONAL_ERRORS = (
    ("lmscalpel.mechanics.keys_values", "DivergedError"),
    ("lmscalpel.models.loading", "UnsafeModelError"),
    ("lmscalpel.guard", "GuardRejected"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Every error that means "the input was wrong" (a bad request, config, file, patch, model
    or dataset, a refused or diverging edit; an operating-system error about a file), reported
    as one line with exit status 2."""
    import importlib

    from lmscalpel.core.config import ConfigError
    from lmscalpel.core.requests import EditRequestError
    from lmscalpel.data.datasets import DatasetError
    from lmscalpel.evaluation import EvaluationError
    from lmscalpel.locate import TracingError
    from lmscalpel.models import ModelNotAvailableError, UnsupportedArchitectureError
    from lmscalpel.patch import PatchError
    from lmscalpel.tokens import SubjectNotFoundError

    found: list[type[BaseException]] = [
        ConfigError,
        DatasetError,
        EvaluationError,
        EditRequestError,
        ModelNotAvailableError,
        PatchError,
        SubjectNotFoundError,
        TracingError,
        UnsupportedArchitectureError,
        OSError,  # a file the user named: missing, a folder, not allowed, a name too long...
    ]
    for module, name in _OPTIONAL_ERRORS:
        try:
            error = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


def report_error(error: BaseException) -> None:
    """``error: <message>`` as one line on stderr."""
    message = _one_line(str(error)) or type(error).__name__
    if isinstance(error, OSError) and error.strerror:  # the system's own: say it briefly
        name = str(error.filename) if error.filename is not None else ""
        shown = name if len(name) <= 80 else name[:77] + "..."
        message = f"{error.strerror}: {shown}" if shown else error.strerror
    errors.print(f"[bold red]error:[/bold red] {escape(message)}")


def friendly(command: Callable) -> Callable:
    """Report a user's mistake as one clear line on stderr and exit status 2, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except user_errors() as error:
            report_error(error)
            raise typer.Exit(2) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 logs progress
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: The root command's model options (safety opt-ins, placement), which :func:`load` passes to
#: ``load_model``.
LOAD_OPTIONS: dict[str, Any] = {
    "trust_remote_code": False,
    "allow_pickle": False,
    "device": "cpu",
    "dtype": "float32",
    "device_map": None,
}


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Run the modelling code a model folder ships (auto_map, *.py); refused otherwise.",
        ),
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Read pickle weights (pytorch_model.bin) of a folder without safetensors; "
            "refused otherwise.",
        ),
    ] = False,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "float32",
    device_map: Annotated[
        str | None,
        typer.Option(
            help="Spread the model with accelerate: 'auto' (needs accelerate's placement) — "
            "weights an edit changes must stay resident."
        ),
    ] = None,
) -> None:
    _setup_logging(verbose)
    LOAD_OPTIONS.update(
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device=device,
        dtype=dtype,
        device_map=device_map,
    )


def load(model: str | None, chat: bool = False, **options: Any):
    """The model named by ``--model``, loaded behind a status line (``options``: ``load_model``'s
    keywords; default the root's ``--trust-remote-code``, ``--allow-pickle``, ``--device``,
    ``--dtype`` and ``--device-map``)."""
    from lmscalpel.models import load_model
    from lmscalpel.runtime.distributed import rank_device

    chosen = {**LOAD_OPTIONS, **options}
    chosen["device"] = rank_device(chosen["device"])  # under torchrun: one GPU per process
    with console.status(f"loading {model or 'the embedded model'}..."):
        return load_model(model, chat=chat, **chosen)


def overrides(values: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` options as a dict (a malformed one is a
    :class:`~lmscalpel.core.config.ConfigError`)."""
    from lmscalpel.methods.config_files import parse_overrides

    return parse_overrides(values)
