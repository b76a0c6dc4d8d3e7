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
import math
import operator
import string
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from lmscalpel.core.files import read_user_text

C = TypeVar("C", bound="MethodConfig")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that an error about a huge or deeply
    nested value stays one readable line."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deeply; an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_BOUND_KEYS = ("at_least", "above", "at_most", "below")
_BOUND_TESTS = {
    "at_least": operator.ge,
    "above": operator.gt,
    "at_most": operator.le,
    "below": operator.lt,
}


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    finite: bool = True,
    nonempty: bool = False,
    placeholders: tuple[str, ...] | None = None,
    path: bool = False,
) -> Any:
    """A config field with a one-line ``help`` (shown by ``lmscalpel methods``) and the values it
    allows, checked whenever a config is made (construction, ``from_dict``, ``from_yaml``,
    ``replace``)::

        lr: float = option(0.5, "Adam's step size", above=0, at_most=1e3)

    ``at_least`` / ``above`` / ``at_most`` / ``below``: bounds on a number (on each number of a
    list); ``finite``: a float must not be NaN or infinite (the default; ``finite=False`` lets
    ``inf`` through, e.g. "no limit"); ``nonempty``: a string or list must not be empty;
    ``placeholders``: a format string must hold exactly these fields, e.g. ``("{}",)`` for one
    positional field; ``path``: a name or a file path (no NUL character, no part longer than the
    file system's 255 bytes). Every string must be encodable as UTF-8. A violation is a
    :class:`ConfigError` naming the field, the value and what is allowed.
    """
    if not help:
        raise TypeError("every config field needs a help line")
    metadata: dict[str, Any] = {
        "help": help,
        "finite": finite,
        "nonempty": nonempty,
        "path": path,
    }
    for key, bound in zip(_BOUND_KEYS, (at_least, above, at_most, below), strict=True):
        if bound is not None:
            metadata[key] = bound
    if placeholders is not None:
        metadata["placeholders"] = tuple(placeholders)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _number(bound: float) -> str:
    if isinstance(bound, int) and not isinstance(bound, bool) and abs(bound) < 10**7:
        return str(bound)
    return f"{bound:g}"


def _words(parts: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return " and ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _bound_parts(metadata: Any, is_float: bool) -> list[str]:
    words = {"at_least": "at least", "above": "above", "at_most": "at most", "below": "below"}
    parts = [f"{words[key]} {_number(metadata[key])}" for key in _BOUND_KEYS if key in metadata]
    if is_float and metadata.get("finite", True):
        parts.append("finite")
    return parts


def allowed_range(metadata: Any, is_float: bool = False) -> str:
    """What a field's bounds allow, in words (``"above 0, at most 1000 and finite"``,
    ``"at least 1"``); ``""`` when it has none. ``is_float``: say ``finite`` when it must be."""
    return _words(_bound_parts(metadata, is_float))


def _describe_allowed(metadata: Any, annotation: Any) -> str:
    is_float = "float" in _type_name(annotation)
    parts = [allowed_range(metadata, is_float)]
    if metadata.get("nonempty"):
        parts.append("not empty")
    if metadata.get("placeholders") is not None:
        parts.append("with " + " and ".join(metadata["placeholders"]))
    if metadata.get("path"):
        parts.append("a name or path")
    return ", ".join(p for p in parts if p)


def _format_fields(text: str) -> list[str] | None:
    """The replacement fields of format string ``text`` as written (``"{}"``, ``"{subject}"``),
    or ``None`` when ``text`` is not a valid format string."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        return None
    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            return None
        fields.append("{" + name + "}")
    return fields


MAX_NAME_BYTES = 255  # the longest file or folder name of common file systems


def _check_path(where: str, value: str) -> None:
    """Refuse a path no file system can hold (it would be a raw ``OSError`` or ``ValueError``
    where it is opened)."""
    if "\0" in value:
        raise ConfigError(f"{where} must be a name or a path, got one with a NUL character")
    too_long = [
        part for part in value.replace("\\", "/").split("/") if len(part.encode()) > MAX_NAME_BYTES
    ]
    if too_long:
        raise ConfigError(
            f"{where} must be a name or a path, got a part of {len(too_long[0].encode())} bytes "
            f"(at most {MAX_NAME_BYTES}): {short_repr(value)}"
        )


def _check_value(cls: type, name: str, value: Any, metadata: Any) -> None:
    """Check one (type-checked) field value against the bounds in its ``option`` metadata."""
    where = f"{cls.__name__}.{name}"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"{where} must be text that encodes as UTF-8, got {short_repr(value)}"
            ) from None
    if metadata.get("path") and isinstance(value, str):
        _check_path(where, value)
    if metadata.get("nonempty") and isinstance(value, (str, list, tuple)) and len(value) == 0:
        raise ConfigError(f"{where} must not be empty, got {short_repr(value)}")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_value(cls, name, item, {**metadata, "nonempty": False, "placeholders": None})
        return
    if isinstance(value, str) and metadata.get("placeholders") is not None:
        wanted = sorted(metadata["placeholders"])
        found = _format_fields(value)
        if found is None or sorted(found) != wanted:
            need = " and ".join(repr(p) for p in metadata["placeholders"]) or "none"
            raise ConfigError(
                f"{where} must be a format string with exactly the placeholder(s) {need} "
                f"(write {{{{ and }}}} for literal braces), got {short_repr(value)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    is_float = isinstance(value, float)
    refused = is_float and (
        math.isnan(value) or (metadata.get("finite", True) and math.isinf(value))
    )
    ok = not refused and all(
        _BOUND_TESTS[key](value, metadata[key]) for key in _BOUND_KEYS if key in metadata
    )
    if not ok:
        allowed = allowed_range(metadata, is_float) or "a number (not NaN)"
        raise ConfigError(f"{where} must be {allowed}, got {short_repr(value)}")


@dataclasses.dataclass(frozen=True)
class FieldHelp:
    """One config field as ``lmscalpel methods`` shows it."""

    name: str
    type: str
    default: Any
    help: str
    allowed: str = ""  # the values allowed besides the type, in words ("at least 1"); "" if any


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
        raise ConfigError(
            errors[0] if errors else f"{cls.__name__}.{name}: bad value {short_repr(value)}"
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{cls.__name__}.{name} must be one of {args}, got {short_repr(value)}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{name} must be a list, got {short_repr(value)}")
        inner = args[0] if args else Any
        items = [_check_type(cls, name, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{cls.__name__}.{name} must be a mapping, got {short_repr(value)}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(
                f"{cls.__name__}.{name} is too large for a float, got {short_repr(value)}"
            ) from None
    if isinstance(annotation, type):
        if annotation is not bool and isinstance(value, bool):
            raise ConfigError(
                f"{cls.__name__}.{name} must be {annotation.__name__}, got {short_repr(value)}"
            )
        if not isinstance(value, annotation):
            raise ConfigError(
                f"{cls.__name__}.{name} must be {annotation.__name__}, got "
                f"{type(value).__name__} {short_repr(value)}"
            )
    return value


def yaml_reason(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (``found unexpected end of stream at
    line 1, column 2``)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None:
        return " ".join(str(error).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file at ``path`` (``{}`` when empty); a missing file raises
    :class:`FileNotFoundError`; a folder, an unreadable name, non-UTF-8 bytes or invalid YAML
    :class:`ConfigError`."""
    path = Path(path)
    text = read_user_text(path, "config file", ConfigError)
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {yaml_reason(error)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None


def _section(value: Any, where: str) -> dict[str, Any]:
    """A config file section: a mapping with string keys (``None``: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {short_repr(value)}")
    bad = [key for key in value if not isinstance(key, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be names, got {bad[0]!r}")
    return value


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
            value = _check_type(type(self), f.name, getattr(self, f.name), hints[f.name])
            _check_value(type(self), f.name, value, f.metadata)
            setattr(self, f.name, value)

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
                allowed=_describe_allowed(f.metadata, hints[f.name]),
            )
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def _check_keys(cls, data: dict[str, Any], where: str) -> None:
        unknown = sorted(set(data) - set(cls.field_names()), key=repr)
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
            extra = sorted(set(data) - {"defaults", "families", "method"}, key=repr)
            if extra:
                raise ConfigError(f"{where}: unexpected top-level keys {extra}")
            values = dict(_section(data.get("defaults"), f"{where}: defaults"))
            families = _section(data.get("families"), f"{where}: families")
            for family_name, section in families.items():
                cls._check_keys(
                    _section(section, f"{where}: families.{family_name}"),
                    f"{where}: families.{family_name}",
                )
            values.update(
                _section(families.get(model_type or ""), f"{where}: families.{model_type}")
            )
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
