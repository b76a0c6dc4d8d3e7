"""Prompt rewriters: how applied in-context patches reach the model without it knowing the methods.

An in-context patch (IKE's, for instance) changes no weight; while applied, every prompt is
rewritten before the model reads it. The patch carries only its state (JSON); the method that made
it registers, under its name, a *builder* that turns all of its applied patches into one
:class:`PromptRewriter`. :class:`~lmscalpel.models.loaded.LoadedModel` and
:class:`~lmscalpel.patch.Patch` look builders up here by the patch's method name, so neither
imports the methods (which sit floors above them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

Message = dict[str, str]


class PromptRewriter(Protocol):
    """What the applied in-context patches of one method do: rewrite every prompt before the model
    reads it.

    A rewriter may also define ``rewrite_chat(messages) -> messages`` to shape a chat conversation
    (e.g. demonstrations as earlier turns) when the model is used with its chat template; without
    it, the last user message is passed through :meth:`rewrite`.
    """

    def rewrite(self, prompt: str) -> str: ...


class ContextPatch(Protocol):
    """What a model needs of an applied in-context patch (a :class:`~lmscalpel.patch.Patch` of
    kind ``"context"``): the method that made it, and its rewriter state."""

    method: str
    context_state: dict[str, Any] | None


RewriterBuilder = Callable[[Sequence[Any], Any], PromptRewriter]
"""``builder(patches, lm)``: one rewriter realising all of a method's applied
:class:`ContextPatch` es (oldest first) on ``lm`` (a :class:`~lmscalpel.models.loaded.LoadedModel`)."""

_BUILDERS: dict[str, RewriterBuilder] = {}


class NoRewriterError(LookupError):
    """No in-context method of that name is registered."""


def register_rewriter(method: str, builder: RewriterBuilder) -> None:
    """Make ``method``'s in-context patches realisable (called when the method is registered)."""
    _BUILDERS[method] = builder


def has_rewriter(method: str) -> bool:
    """Whether ``method`` makes in-context patches that a model can realise."""
    return method in _BUILDERS


def rewriter_builder(method: str) -> RewriterBuilder:
    """The registered builder of ``method``'s rewriters."""
    try:
        return _BUILDERS[method]
    except KeyError:
        known = ", ".join(sorted(_BUILDERS)) or "none registered"
        raise NoRewriterError(
            f"method {method!r} makes no in-context patches (in-context methods: {known})"
        ) from None
