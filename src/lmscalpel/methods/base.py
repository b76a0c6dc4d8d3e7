"""The editor protocol and the method registry.

Every editing method is an :class:`Editor` subclass in its own module, registered by name with
:func:`register`. An editor turns a model and edit requests into a :class:`~lmscalpel.patch.Patch`
*without changing the model* (it may change weights temporarily, but must restore them exactly,
also on error); the caller decides whether to apply the patch.
"""

from __future__ import annotations

import dataclasses
import difflib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from lmscalpel.core.config import ConfigError, MethodConfig, short_repr
from lmscalpel.core.requests import EditRequest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.rewriters import PromptRewriter, register_rewriter
from lmscalpel.patch import Patch, PatchError


class UnknownMethodError(ConfigError):
    """An editing method name that is not registered; the message suggests close matches
    (``suggestions``, from :func:`difflib.get_close_matches`)."""

    def __init__(self, name: Any, known: Sequence[str]) -> None:
        self.name, self.known = name, list(known)
        self.suggestions = (
            difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
            if isinstance(name, str)
            else []
        )
        hint = " or ".join(repr(s) for s in self.suggestions)
        hint = f"did you mean {hint}? " if hint else ""
        super().__init__(
            f"unknown editing method {short_repr(name, 60)}; {hint}"
            f"available: {', '.join(self.known)}"
        )

    def __reduce__(self):  # pickles (e.g. to another process) with its arguments
        return (type(self), (self.name, self.known))


class Editor(ABC):
    """One editing method. Subclasses set ``name``, ``config_class`` and ``citation`` and
    implement :meth:`compute`; in-context methods set ``kind = "context"`` and implement
    :meth:`build_rewriter`."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    citation: ClassVar[str] = ""
    kind: ClassVar[str] = "weights"

    def __init__(self, config: MethodConfig | dict[str, Any] | str | Path | None = None) -> None:
        self._config = config

    def config_for(self, lm: LoadedModel) -> MethodConfig:
        """The configuration to use on ``lm``: the given one, or the family defaults."""
        config = self._config
        if config is None:
            return self.config_class.for_model(lm.model_type)
        if isinstance(config, (str, Path)):
            return self.config_class.from_yaml(config, lm.model_type)
        if isinstance(config, dict):
            return self.config_class.from_dict(config, lm.model_type)
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"method {self.name!r} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        return config

    def depends_on(self, config: MethodConfig) -> dict[str, Any]:
        """What the method's edits depend on besides ``config`` (e.g. the digest of a trained
        editor's weights), recorded in run manifests so that a resumed run never mixes edits
        from two different artefacts behind one configuration. Default: nothing."""
        return {}

    def prepare(self, lm: LoadedModel, config: MethodConfig) -> None:
        """Do the one-time, cached work a method needs for ``lm`` (statistics, generated
        prefixes...) so that later edits are fast. Optional: :meth:`compute` does it when needed."""
        return None

    @abstractmethod
    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: MethodConfig
    ) -> Patch:
        """Compute the patch that makes ``requests`` true; leave ``lm`` exactly as it was."""

    def build_rewriter(self, patches: Sequence[Patch], lm: LoadedModel) -> PromptRewriter:
        """For in-context methods: the one prompt rewriter that realises all of this method's
        patches applied to ``lm`` (oldest first) together."""
        raise PatchError(f"method {self.name!r} makes weight patches, not in-context ones")


_REGISTRY: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    """Class decorator: make an editor available by its ``name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    if cls.kind == "context":
        register_rewriter(cls.name, lambda patches, lm: cls().build_rewriter(patches, lm))
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def editor_class(name: str) -> type[Editor]:
    """The editor class registered as ``name``; :class:`UnknownMethodError` otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownMethodError(name, available_methods())
    return _REGISTRY[name]


def get_editor(
    name: str, config: MethodConfig | dict[str, Any] | str | Path | None = None
) -> Editor:
    """An editor instance of method ``name`` (optionally with a config, dict or YAML path)."""
    return editor_class(name)(config)


def resolve_layers(
    layers: Sequence[int] | None, default: Sequence[float], n_layers: int
) -> list[int]:
    """Layer indices from a config: explicit (negative counts from the top) or, when ``None``,
    ``default`` given as fractions of the depth (so shallow test models get sensible layers)."""
    if layers is None:
        chosen = sorted({min(n_layers - 1, round(f * (n_layers - 1))) for f in default})
    else:
        chosen = [layer + n_layers if layer < 0 else layer for layer in layers]
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise ConfigError(f"layer {layer} out of range for a model with {n_layers} layers")
    return chosen


def new_default(config_class: type[MethodConfig], name: str, default: Any) -> Any:
    """Field ``name`` of ``config_class`` with another default and the same help line and
    bounds, for a subclass that changes only a default (the field is declared once, its help and
    allowed values written once)::

        @dataclass
        class FTLConfig(FTConfig):
            lr: float = new_default(FTConfig, "lr", 1e-3)
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    if name not in fields:
        raise TypeError(f"{config_class.__name__} has no field {name!r}")
    return dataclasses.field(default=default, metadata=fields[name].metadata)
