"""The ``lmscalpel`` command: a thin shell over the library.

One module per command group, each parsing arguments, calling the library and printing:
:mod:`.app` (the typer app, shared options, one-line errors), :mod:`.model` (``info``,
``generate``, ``score``), :mod:`.methods` (``methods``), :mod:`.edit` (``edit``, ``apply``),
:mod:`.train` (``train-editor``), :mod:`.evaluate` (``eval``, ``compare``), :mod:`.stats`
(``stats``), :mod:`.trace` (``trace``) and :mod:`.demo` (``demo``).
"""

import importlib

from lmscalpel.cli.app import app, console, friendly

#: Importing a group registers its commands; this order is the order of `lmscalpel --help`.
COMMAND_GROUPS = (
    "model",
    "methods",
    "edit",
    "train",
    "evaluate",
    "stats",
    "trace",
    "demo",
    "serve",
)
for _group in COMMAND_GROUPS:
    importlib.import_module(f"lmscalpel.cli.{_group}")

__all__ = ["COMMAND_GROUPS", "app", "console", "friendly", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
