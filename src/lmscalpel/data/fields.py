"""Reading the fields of a benchmark record, and reporting a record that cannot be read.

Every layout's parser reads its records through these, so a missing or mistyped field is reported
the same way everywhere: as :class:`Malformed`, which the reader turns into a
:class:`RecordProblem` (index and reason) instead of stopping the load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmscalpel.core.requests import EditRequest
from lmscalpel.data.cases import EvalCase


class Malformed(ValueError):
    """A record cannot become an edit case; the message says why."""


@dataclass(frozen=True)
class RecordProblem:
    """A record that was not loaded: where it is in the file and why."""

    index: int
    reason: str
    where: str = ""

    def __str__(self) -> str:
        return f"record {self.index}{f' ({self.where})' if self.where else ''}: {self.reason}"


def answers(value: Any, what: str) -> list[str]:
    """Strings of an answer field: a string, ``{"str": ...}``, or a (nested) list of them."""
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in answers(v, what)]
    if value is None:
        return []
    raise Malformed(f"{what} must be a string or a list of strings, got {type(value).__name__}")


def answer(value: Any, what: str) -> str:
    """The first answer of a field that must have one."""
    found = answers(value, what)
    if not found:
        raise Malformed(f"{what} is empty or missing")
    return found[0]


def optional_answer(value: Any, what: str) -> str | None:
    """The first answer of a field, or ``None`` when it has none."""
    found = answers(value, what)
    return found[0] if found else None


def prompt(value: Any, what: str) -> str:
    """A non-empty prompt string, or the ``prompt`` of an object."""
    if isinstance(value, dict):
        value = value.get("prompt")
    if not isinstance(value, str) or not value.strip():
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise Malformed(f"{what} must be a non-empty string, got {shown}")
    return value


def prompts(value: Any, what: str) -> list[str]:
    """A list of prompts (one prompt alone, or none at all, is accepted too)."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise Malformed(f"{what} must be a list, got {type(value).__name__}")
    return [prompt(v, f"{what}[{i}]") for i, v in enumerate(value)]


def need(record: dict, key: str) -> Any:
    """``record[key]``, which must be present."""
    if key not in record:
        raise Malformed(f"missing field {key!r}")
    return record[key]


def case(index: int, source: str, *requests: EditRequest, **kwargs: Any) -> EvalCase:
    """The case of record ``index``: its key is the index, its requests are edited together."""
    return EvalCase(key=str(index), requests=requests, index=index, source=source, **kwargs)


def easyedit_request(record: dict, index: int, **rest: Any) -> EditRequest:
    """The request of a record in EasyEdit's flat layout (CounterFact simplified, KnowEdit): the
    fields ``prompt``, ``subject``, ``target_new``, ``ground_truth`` and ``rephrase_prompt``, with
    ``rest`` (locality, portability) as the layout reads them."""
    return EditRequest(
        prompt=prompt(need(record, "prompt"), "prompt"),
        subject=need(record, "subject"),
        target_new=answer(need(record, "target_new"), "target_new"),
        target_true=optional_answer(record.get("ground_truth"), "ground_truth"),
        paraphrases=tuple(prompts(record.get("rephrase_prompt"), "rephrase_prompt")),
        case_id=record.get("case_id", index),
        **rest,
    )
