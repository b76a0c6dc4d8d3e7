"""Typed method configurations with defaults per model family, loadable from YAML.

Each method defines a dataclass subclass of :class:`MethodConfig`. Its field defaults are the
method's generic defaults; ``family_defaults`` overrides them per ``config.model_type`` (e.g. a
tuned edit layer for ``llama``). A YAML file may hold flat keys, or ``defaults:`` plus per-family
sections::

    defaults: {lr: 0.001}
    families:
      llama: {layers: [4]}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

C = TypeVar("C", bound="MethodConfig")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A config field with a one-line ``help`` (shown by ``lmscalpel methods``)::

    lr: float = option(0.5, "Adam's step size, in units of the value's norm per sqrt(d)")
    """
    if not help:
        raise TypeError("every config field needs a help line")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class FieldHelp:
    """One config field as ``lmscalpel methods`` shows it."""

    name: str
    type: str
    default: Any
    help: str


def _check_type(cls: type, name: str, value: Any, annotation: Any) -> Any:
    """Validate (and gently coerce int -> float, list -> tuple) one field value."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(cls, name, value, arg)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{cls.__name__}.{name}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{cls.__name__}.{name} must be one of {args}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_check_type(cls, name, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{cls.__name__}.{name} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(annotation, type):
        if annotation is not bool and isinstance(value, bool):
            raise ConfigError(f"{cls.__name__}.{name} must be {annotation.__name__}, got {value!r}")
        if not isinstance(value, annotation):
            raise ConfigError(
                f"{cls.__name__}.{name} must be {annotation.__name__}, got "
                f"{type(value).__name__} {value!r}"
            )
    return value


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file at ``path`` (``{}`` when empty); a missing file raises
    :class:`FileNotFoundError`, invalid YAML :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's hyperparameters. Subclasses are dataclasses."""

    family_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _check_type(type(self), f.name, value, hints[f.name]))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def describe(cls, model_type: str | None = None) -> list[FieldHelp]:
        """Every field with its type, its default (for ``model_type``'s family, if given) and its
        help line."""
        defaults = cls.for_model(model_type)
        hints = typing.get_type_hints(cls)
        return [
            FieldHelp(
                name=f.name,
                type=_type_name(hints[f.name]),
                default=getattr(defaults, f.name),
                help=f.metadata.get("help", ""),
            )
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def _check_keys(cls, data: dict[str, Any], where: str) -> None:
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} key(s) {unknown} in {where}; valid: {cls.field_names()}"
            )

    @classmethod
    def for_model(cls: type[C], model_type: str | None = None, **overrides: Any) -> C:
        """Generic defaults, then the family's defaults, then ``overrides``."""
        values: dict[str, Any] = {}
        if model_type is not None:
            values.update(cls.family_defaults.get(model_type, {}))
        cls._check_keys(overrides, "overrides")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(
        cls: type[C], data: dict[str, Any], model_type: str | None = None, where: str = "config"
    ) -> C:
        """Build from flat keys or from ``defaults`` + ``families`` sections (see module doc)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
        if "defaults" in data or "families" in data:
            extra = sorted(set(data) - {"defaults", "families", "method"})
            if extra:
                raise ConfigError(f"{where}: unexpected top-level keys {extra}")
            values = dict(data.get("defaults") or {})
            family = (data.get("families") or {}).get(model_type or "", {}) or {}
            values.update(family)
        else:
            values = {k: v for k, v in data.items() if k != "method"}
        cls._check_keys(values, where)
        return cls.for_model(model_type, **values)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, model_type: str | None = None) -> C:
        return cls.from_dict(read_yaml(path), model_type, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def replace(self: C, **changes: Any) -> C:
        type(self)._check_keys(changes, "replace()")
        return dataclasses.replace(self, **changes)
