"""Editing methods: one module each, all implementing :class:`~lmscalpel.methods.base.Editor`."""

from lmscalpel.methods import alphaedit, ft, ike, lora, memit, mend, rome
from lmscalpel.methods.base import (
    Editor,
    UnknownMethodError,
    available_methods,
    editor_class,
    get_editor,
    register,
    resolve_layers,
)

__all__ = [
    "Editor",
    "UnknownMethodError",
    "alphaedit",
    "available_methods",
    "editor_class",
    "ft",
    "get_editor",
    "ike",
    "lora",
    "memit",
    "mend",
    "register",
    "resolve_layers",
    "rome",
]
