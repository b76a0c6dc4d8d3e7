"""Method configurations from a YAML file plus ``key=value`` overrides, for one method or several.

What ``lmscalpel edit``, ``eval`` and ``compare`` do with ``--config FILE --set key=value
--editor DIR``, callable from Python::

    configs = method_configs(["ft-l", "ft-m"], "llama", "methods.yaml",
                             parse_overrides(["lr=0.02", "ft-m.steps=3"]))

For several methods the YAML file holds one section per method name (each section is what
:meth:`~lmscalpel.core.config.MethodConfig.from_dict` reads: flat keys or ``defaults`` +
``families``)::

    ft-l: {steps: 4, lr: 0.05}
    ft-m: {steps: 5}

For one method it may be that method's section or the method's keys directly. An override
``key=value`` goes to every method that has ``key``; ``method.key=value`` to that method only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmscalpel.core.config import ConfigError, MethodConfig, read_yaml, short_repr, yaml_reason
from lmscalpel.methods.base import UnknownMethodError, available_methods, editor_class

C = TypeVar("C", bound=MethodConfig)


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """``["lr=0.02", "layers=[4]"]`` -> ``{"lr": 0.02, "layers": [4]}``: each value is read as
    YAML (numbers, booleans, lists, ``.nan``); anything else, including text YAML cannot read or
    would read as a mapping (``kl_prompt={} is a``), stays the string given, but a broken list
    (``layers=[4``) is a :class:`~lmscalpel.core.config.ConfigError`. A later item wins. The
    config then checks each value (a ``ConfigError`` naming the field)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        if not isinstance(item, str):
            raise ConfigError(f"an override takes 'key=value' text, got {item!r}")
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"an override takes key=value, got {item!r}")
        overrides[key.strip()] = _override_value(item, raw)
    return overrides


def _override_value(item: str, raw: str) -> Any:
    """The value of one ``key=value`` override (see :func:`parse_overrides`)."""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError, ValueError) as error:
        if raw.lstrip().startswith("["):
            reason = (
                yaml_reason(error) if isinstance(error, yaml.YAMLError) else "nested too deeply"
            )
            raise ConfigError(f"--set {item!r}: invalid list ({reason})") from None
        return raw.strip()  # not YAML: the text itself
    if isinstance(value, dict):  # no config field is a mapping: text with braces was meant
        return raw.strip()
    return value


def build_config(
    cls: type[C],
    model_type: str | None,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """One config of class ``cls``: ``model_type``'s family defaults, or the YAML file ``path``
    (read for that family), then ``overrides`` (an unknown key is a
    :class:`~lmscalpel.core.config.ConfigError`)."""
    if path is None:
        base = cls.for_model(model_type)
    else:
        base = cls.from_yaml(path, model_type)
    return base.replace(**overrides) if overrides else base


def check_methods(methods: Sequence[str]) -> None:
    """A :class:`~lmscalpel.core.config.ConfigError` naming the available methods when
    ``methods`` is empty or holds an unknown one."""
    known = available_methods()
    if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
        raise ConfigError(f"methods must be a list of method names, got {methods!r}")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UnknownMethodError(unknown[0], known)
    if not methods:
        raise ConfigError(f"no editing method given; available: {', '.join(known)}")


def takes_editor(method: str) -> bool:
    """Whether ``method`` is a learned editor whose config names a trained editor folder."""
    return "editor" in editor_class(method).config_class.field_names()


def yaml_sections(path: str | Path, methods: Sequence[str]) -> dict[str, Any]:
    """The YAML file's part for each method: its section (several methods, or a file whose top
    level names the one method), or the whole file (one method, flat keys)."""
    data = read_yaml(path)
    if len(methods) > 1 or (isinstance(data, dict) and methods[0] in data):
        if not isinstance(data, dict) or not set(data) <= set(methods):
            found = short_repr(sorted(data, key=repr) if isinstance(data, dict) else data)
            raise ConfigError(
                f"{path}: for several methods, give one section per method "
                f"({', '.join(methods)}); found {found}"
            )
        return dict(data)
    return {methods[0]: data}


def route_overrides(
    methods: Sequence[str], overrides: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Split overrides per method: a plain ``key`` goes to every method whose config has it
    (none having it is a :class:`~lmscalpel.core.config.ConfigError`), ``method.key`` to that
    method only, and wins over a plain ``key`` whatever their order."""
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    specific = []
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"a hyperparameter name must be text, got {key!r}")
        prefix, dot, field = key.partition(".")
        if dot and prefix in per_method:
            specific.append((prefix, field, value))
            continue
        takers = [m for m in methods if key in editor_class(m).config_class.field_names()]
        if not takers:
            raise ConfigError(f"no method among {list(methods)} has a hyperparameter {key!r}")
        for m in takers:
            per_method[m][key] = value
    for method, field, value in specific:
        per_method[method][field] = value
    return per_method


def method_configs(
    methods: Sequence[str],
    model_type: str | None,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    editor: str | Path | None = None,
) -> list[tuple[str, MethodConfig]]:
    """One ``(method, config)`` per method, in order: the family defaults of ``model_type`` or
    the method's part of the YAML file ``path`` (:func:`yaml_sections`), then ``overrides``
    (:func:`route_overrides`), then ``editor`` (a trained editor folder) for the learned editors
    among them; an ``editor`` that no method takes is a :class:`~lmscalpel.core.config.ConfigError`.
    """
    methods = list(methods)
    check_methods(methods)
    sections = yaml_sections(path, methods) if path is not None else {}
    per_method = route_overrides(methods, overrides or {})
    if editor is not None:
        takers = [m for m in methods if takes_editor(m)]
        if not takers:
            raise ConfigError(
                f"the trained editor {editor} is for learned editors (mend); "
                f"{', '.join(methods)} takes none"
            )
        for m in takers:
            per_method[m]["editor"] = str(editor)
    result = []
    for m in methods:
        cls = editor_class(m).config_class
        if m in sections:
            base = cls.from_dict(sections[m], model_type, where=f"{path}:{m}")
        else:
            base = cls.for_model(model_type)
        result.append((m, base.replace(**per_method[m]) if per_method[m] else base))
    return result
