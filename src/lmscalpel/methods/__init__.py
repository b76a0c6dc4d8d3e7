"""Editing methods: one module each, all implementing :class:`~lmscalpel.methods.base.Editor`."""

from lmscalpel.methods import ft, ike, lora, mend, rome
from lmscalpel.methods.base import (
    Editor,
    available_methods,
    editor_class,
    get_editor,
    register,
    resolve_layers,
)

__all__ = [
    "Editor",
    "available_methods",
    "editor_class",
    "ft",
    "get_editor",
    "ike",
    "lora",
    "mend",
    "register",
    "resolve_layers",
    "rome",
]
