"""Reading a data file: its records, their layout, and the cases they become.

:func:`read_dataset` reads a JSON list or JSONL file, detects the layout from the first record
(:func:`detect_layout`) unless one is named, and parses every record with that layout's parser
(:mod:`.counterfact`, :mod:`.zsre`, :mod:`.knowedit`, :mod:`.mquake`, :mod:`.knowns`, or
lmscalpel's own edit requests). A malformed record never stops a load and is never skipped
silently: it is reported as a :class:`~lmscalpel.data.fields.RecordProblem` (index and reason),
logged, and kept in :attr:`Dataset.problems`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmscalpel.core.files import read_user_text
from lmscalpel.core.requests import EditRequest, EditRequestError
from lmscalpel.data.cases import EvalCase, cases_from_requests, select_cases
from lmscalpel.data.counterfact import parse_counterfact, parse_rome
from lmscalpel.data.fields import Malformed, RecordProblem
from lmscalpel.data.knowedit import parse_knowedit
from lmscalpel.data.knowns import parse_knowns
from lmscalpel.data.mquake import parse_mquake
from lmscalpel.data.zsre import parse_zsre

log = logging.getLogger(__name__)

LAYOUTS = ("counterfact", "rome", "zsre", "knowedit", "mquake", "knowns", "requests")

PARSERS: dict[str, Callable[[dict, int], EvalCase]] = {
    "counterfact": parse_counterfact,
    "rome": parse_rome,
    "zsre": parse_zsre,
    "knowedit": parse_knowedit,
    "mquake": parse_mquake,
}


class DatasetError(ValueError):
    """A data file cannot be read as any supported layout."""


@dataclass
class Dataset:
    """Everything read from one file: the cases, the records that failed, and the layout."""

    path: Path
    layout: str
    cases: list[EvalCase]
    problems: list[RecordProblem] = field(default_factory=list)
    records: int = 0

    def select(
        self, n: int | None = None, *, start: int = 0, seed: int | None = None
    ) -> list[EvalCase]:
        """``n`` cases from ``start`` (after a shuffle seeded by ``seed``, if given); a negative
        ``n`` or ``start`` is a :class:`DatasetError`."""
        for name, value in (("n", n), ("start", start)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise DatasetError(f"{name} must be a whole number >= 0, got {value!r}")
        return select_cases(self.cases, n, start=start, seed=seed)


def detect_layout(record: Any) -> str:
    """The layout of a record, from its keys."""
    if not isinstance(record, dict):
        raise DatasetError(f"records must be JSON objects, got {type(record).__name__}")
    keys = set(record)
    if "requested_rewrite" in keys:
        return "mquake" if {"questions", "new_answer"} <= keys else "rome"
    if keys & {"paraphrase_prompts", "neighborhood_prompts", "portable_prompts"}:
        return "rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if "known_id" in keys or {"attribute", "template"} <= keys:
        return "knowns"
    if isinstance(record.get("portability"), dict) or isinstance(record.get("locality"), dict):
        return "knowedit"
    if "target_new" in keys and ({"ground_truth", "rephrase_prompt", "locality_prompt"} & keys):
        return "counterfact"
    if {"prompt", "subject", "target_new"} <= keys:
        return "requests"
    raise DatasetError(
        f"cannot tell the layout of a record with keys {sorted(keys)}; "
        f"name it with layout= (one of {', '.join(LAYOUTS)})"
    )


#: What a record parser may raise on a record of the wrong shape (reported, never raised).
RECORD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError)


def _reason(error: BaseException) -> str:
    """A problem's reason: the message of lmscalpel's own errors, the type and message else."""
    if isinstance(error, (EditRequestError, Malformed)):
        return str(error)
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return f"{type(error).__name__}: {error}"


def read_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) pairs; a JSONL line that is not valid JSON becomes a :class:`Malformed`.
    A missing file is a :class:`FileNotFoundError`; a folder, an unreadable name, bytes that are
    not UTF-8 or (JSON) text that is not valid JSON, a :class:`DatasetError`."""
    text = read_user_text(path, "data file", DatasetError)
    if path.suffix == ".jsonl":
        items = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {line_no}", json.loads(line)))
            except json.JSONDecodeError as error:
                items.append((f"line {line_no}", Malformed(f"invalid JSON: {error}")))
            except RecursionError:
                items.append((f"line {line_no}", Malformed("invalid JSON: nested too deeply")))
        return items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise DatasetError(f"{path} is not valid JSON: nested too deeply") from None
    if isinstance(data, dict):
        for key in ("data", "records", "cases"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            data = [data]
    if not isinstance(data, list):
        raise DatasetError(f"{path} must hold a JSON list of records")
    return [("", d) for d in data]


def parse_requests(items: list[tuple[str, Any]]) -> tuple[list[EvalCase], list[RecordProblem]]:
    """lmscalpel's own edit requests; requests sharing a ``case_id`` form one case."""
    requests, problems = [], []
    for i, (where, record) in enumerate(items):
        try:
            if isinstance(record, Malformed):
                raise record
            request = EditRequest.from_dict(record)
            if request.case_id is None:
                request = replace(request, case_id=i)
            requests.append(request)
        except RECORD_ERRORS as error:
            problems.append(RecordProblem(i, _reason(error), where))
    return cases_from_requests(requests), problems


def parse_records(
    items: list[tuple[str, Any]], parser: Callable[[dict, int], EvalCase]
) -> tuple[list[EvalCase], list[RecordProblem]]:
    """Each record through ``parser``; the ones it rejects become problems."""
    cases, problems = [], []
    for i, (where, record) in enumerate(items):
        try:
            if isinstance(record, Malformed):
                raise record
            if not isinstance(record, dict):
                raise Malformed(f"not a JSON object but {type(record).__name__}")
            cases.append(parser(record, i))
        except RECORD_ERRORS as error:
            problems.append(RecordProblem(i, _reason(error), where))
    return cases, problems


KNOWN_TEXT_FIELDS = ("subject", "attribute", "prompt")


def _known_problem(record: Any) -> str | None:
    """Why a known-facts record cannot be used, for the shape checks
    :func:`~lmscalpel.data.knowns.parse_knowns` leaves out (field types)."""
    if isinstance(record, Malformed):
        return str(record)
    if not isinstance(record, dict):
        return None  # parse_knowns reports it
    for key in KNOWN_TEXT_FIELDS:
        if key in record and not isinstance(record[key], str):
            return f"{key} must be a string, got {type(record[key]).__name__}"
    relation = record.get("relation_id")
    if isinstance(relation, bool) or not isinstance(relation, (str, int, type(None))):
        return f"relation_id must be a string or an int, got {type(relation).__name__}"
    return None


def parse_known_items(
    items: list[tuple[str, Any]],
) -> tuple[list[EvalCase], list[RecordProblem]]:
    """Known facts (read as a whole), with records of the wrong shape reported, not raised."""
    records: list[Any] = []
    early: dict[int, RecordProblem] = {}
    for i, (where, record) in enumerate(items):
        reason = _known_problem(record)
        if reason is None:
            records.append(record if isinstance(record, dict) else None)
        else:
            early[i] = RecordProblem(i, reason, where)
            records.append(None)
    cases, problems = parse_knowns(records)
    problems = [p for p in problems if p.index not in early] + list(early.values())
    return cases, sorted(problems, key=lambda p: p.index)


def read_dataset(path: str | Path, layout: str = "auto") -> Dataset:
    """Read every record of ``path`` (JSON list or JSONL) as evaluation cases.

    Malformed records are collected in :attr:`Dataset.problems` (and logged), never raised:
    one bad record does not lose a benchmark.
    """
    path = Path(path)
    items = read_records(path)
    if layout != "auto" and layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)} or auto")
    if layout == "auto":
        first = next((r for _, r in items if isinstance(r, dict)), None)
        if first is None:
            raise DatasetError(f"{path} holds no records")
        layout = detect_layout(first)
    if layout == "knowns":
        cases, problems = parse_known_items(items)
    elif layout == "requests":
        cases, problems = parse_requests(items)
    else:
        cases, problems = parse_records(items, PARSERS[layout])
    if problems:
        shown = "; ".join(str(p) for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        log.warning("%s: %d malformed record(s) skipped: %s%s", path, len(problems), shown, more)
    return Dataset(path=path, layout=layout, cases=cases, problems=problems, records=len(items))


def load_cases(
    path: str | Path,
    n: int | None = None,
    *,
    start: int = 0,
    seed: int | None = None,
    layout: str = "auto",
) -> list[EvalCase]:
    """The evaluation cases of a data file: all, or ``n`` from ``start`` (after a shuffle seeded by
    ``seed``, if given). Malformed records are logged with index and reason (see
    :func:`read_dataset` to get them as data)."""
    return read_dataset(path, layout).select(n, start=start, seed=seed)
