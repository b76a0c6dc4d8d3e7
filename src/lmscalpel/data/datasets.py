"""Loaders: benchmark files in their published layouts -> :class:`EvalCase` s.

Supported layouts (detected from the records, or named with ``layout=``):

``counterfact``
    The simplified one-record-per-edit CounterFact (Meng et al. 2022) used by EasyEdit:
    ``prompt``, ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``,
    ``locality_prompt``, ``locality_ground_truth``.
``rome``
    ROME's original layout: ``requested_rewrite`` (``prompt`` with ``{}``, ``target_new.str``,
    ``target_true.str``), ``paraphrase_prompts``, ``neighborhood_prompts`` (answered by the true
    target), ``generation_prompts`` (for fluency); also the course variant with the rewrite's fields
    at top level and ``portable_prompts`` (``prompt``, ``portable_target_new``,
    ``portable_target_true``).
``zsre``
    zsRE in the MEND layout (Levy et al. 2017; De Cao et al. 2021; Mitchell et al. 2022): the edit
    ``src`` -> ``alt``, true answer ``answers[0]``, ``rephrase``, locality ``loc`` / ``loc_ans``.
``knowedit``
    KnowEdit (Zhang et al. 2024): ``portability`` kinds ``Reasoning`` -> ``reasoning``,
    ``Subject_Aliasing`` -> ``alias``, ``Logical_Generalization`` -> ``reverse``; ``locality``
    kinds (``Relation_Specificity``, ``Forgetfulness``) kept as locality kinds; ground truths may be
    strings or lists (the first is the answer, the rest aliases).
``mquake``
    MQuAKE (Zhong et al. 2023): every ``requested_rewrite`` becomes one request (a case's rewrites
    are edited together); the multi-hop ``questions`` are portability probes answered by
    ``new_answer`` (``answer`` before the edit), broken down by number of hops.
``knowns``
    The known facts of ROME's causal tracing: ``attribute`` is the true target; the new target is
    the attribute of another fact of the same relation, and a neighbouring fact of the same
    relation is the locality probe (both chosen deterministically).
``requests``
    lmscalpel's own JSON / JSONL of :class:`~lmscalpel.core.requests.EditRequest` s; requests sharing a
    ``case_id`` form one case.

A malformed record never stops a load and is never skipped silently: it is reported as a
:class:`RecordProblem` (index and reason), logged, and kept in :attr:`Dataset.problems`.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmscalpel.core.requests import EditRequest, EditRequestError, LocalityProbe, PortabilityProbe
from lmscalpel.data.cases import EvalCase, cases_from_requests, select_cases

log = logging.getLogger(__name__)

LAYOUTS = ("counterfact", "rome", "zsre", "knowedit", "mquake", "knowns", "requests")

KNOWEDIT_PORTABILITY = {
    "Reasoning": "reasoning",
    "Subject_Aliasing": "alias",
    "Logical_Generalization": "reverse",
}


class DatasetError(ValueError):
    """A data file cannot be read as any supported layout."""


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
        return select_cases(self.cases, n, start=start, seed=seed)


# ---- field helpers ---------------------------------------------------------------------------
def _answers(value: Any, what: str) -> list[str]:
    """Strings of an answer field: a string, ``{"str": ...}``, or a (nested) list of them."""
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _answers(v, what)]
    if value is None:
        return []
    raise Malformed(f"{what} must be a string or a list of strings, got {type(value).__name__}")


def _answer(value: Any, what: str) -> str:
    found = _answers(value, what)
    if not found:
        raise Malformed(f"{what} is empty or missing")
    return found[0]


def _optional_answer(value: Any, what: str) -> str | None:
    found = _answers(value, what)
    return found[0] if found else None


def _prompt(value: Any, what: str) -> str:
    if isinstance(value, dict):
        value = value.get("prompt")
    if not isinstance(value, str) or not value.strip():
        raise Malformed(f"{what} must be a non-empty string, got {value!r}")
    return value


def _prompts(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise Malformed(f"{what} must be a list, got {type(value).__name__}")
    return [_prompt(v, f"{what}[{i}]") for i, v in enumerate(value)]


def _need(record: dict, key: str) -> Any:
    if key not in record:
        raise Malformed(f"missing field {key!r}")
    return record[key]


def _case(index: int, source: str, *requests: EditRequest, **kwargs: Any) -> EvalCase:
    return EvalCase(key=str(index), requests=requests, index=index, source=source, **kwargs)


# ---- one parser per layout -------------------------------------------------------------------
def parse_counterfact(record: dict, index: int) -> EvalCase:
    locality = ()
    if record.get("locality_prompt"):
        answer = _answer(record.get("locality_ground_truth"), "locality_ground_truth")
        locality = (LocalityProbe(_prompt(record["locality_prompt"], "locality_prompt"), answer),)
    request = EditRequest(
        prompt=_prompt(_need(record, "prompt"), "prompt"),
        subject=_need(record, "subject"),
        target_new=_answer(_need(record, "target_new"), "target_new"),
        target_true=_optional_answer(record.get("ground_truth"), "ground_truth"),
        paraphrases=tuple(_prompts(record.get("rephrase_prompt"), "rephrase_prompt")),
        locality=locality,
        case_id=record.get("case_id", index),
    )
    return _case(index, "counterfact", request)


def _portable_kind(value: Any) -> str:
    kind = str(value or "other").strip().lower().replace("_", "-").replace(" ", "-")
    aliases = {"multihop": "multi-hop", "subject-aliasing": "alias", "aliasing": "alias"}
    kind = aliases.get(kind, kind)
    return kind if kind in ("multi-hop", "reverse", "alias", "reasoning") else "other"


def parse_rome(record: dict, index: int) -> EvalCase:
    rewrite = record.get("requested_rewrite", record)
    if isinstance(rewrite, list):
        if len(rewrite) != 1:
            raise Malformed("the ROME layout takes one requested_rewrite (several: use MQuAKE's)")
        rewrite = rewrite[0]
    if not isinstance(rewrite, dict):
        raise Malformed(f"requested_rewrite must be an object, got {type(rewrite).__name__}")
    target_true = _optional_answer(rewrite.get("target_true"), "target_true")
    neighborhood = []
    for i, item in enumerate(record.get("neighborhood_prompts") or []):
        answer = target_true
        if isinstance(item, dict):
            answer = _optional_answer(item.get("target", item.get("answer")), "target") or answer
        if answer is None:
            raise Malformed(
                f"neighborhood_prompts[{i}] has no answer and the rewrite no target_true"
            )
        neighborhood.append(LocalityProbe(_prompt(item, f"neighborhood_prompts[{i}]"), answer))
    portability = []
    for i, item in enumerate(record.get("portable_prompts") or []):
        if not isinstance(item, dict):
            raise Malformed(f"portable_prompts[{i}] must be an object")
        portability.append(
            PortabilityProbe(
                prompt=_prompt(item, f"portable_prompts[{i}]"),
                answer=_answer(item.get("portable_target_new"), "portable_target_new"),
                kind=_portable_kind(item.get("kind", item.get("type"))),
                answer_before=_optional_answer(item.get("portable_target_true"), "target_true"),
            )
        )
    request = EditRequest(
        prompt=_prompt(_need(rewrite, "prompt"), "prompt"),
        subject=_need(rewrite, "subject"),
        target_new=_answer(_need(rewrite, "target_new"), "target_new"),
        target_true=target_true,
        paraphrases=tuple(_prompts(record.get("paraphrase_prompts"), "paraphrase_prompts")),
        locality=tuple(neighborhood),
        portability=tuple(portability),
        case_id=record.get("case_id", index),
    )
    generation = _prompts(record.get("generation_prompts"), "generation_prompts")
    return _case(index, "rome", request, generation_prompts=tuple(generation))


def parse_zsre(record: dict, index: int) -> EvalCase:
    locality = ()
    if record.get("loc"):
        locality = (
            LocalityProbe(_prompt(record["loc"], "loc"), _answer(record.get("loc_ans"), "loc_ans")),
        )
    true = _optional_answer(record.get("answers"), "answers") or _optional_answer(
        record.get("pred"), "pred"
    )
    request = EditRequest(
        prompt=_prompt(_need(record, "src"), "src"),
        subject=_need(record, "subject"),
        target_new=_answer(_need(record, "alt"), "alt"),
        target_true=true,
        paraphrases=tuple(_prompts(record.get("rephrase"), "rephrase")),
        locality=locality,
        case_id=record.get("case_id", index),
    )
    return _case(index, "zsre", request)


def _probe_groups(record: dict, key: str) -> list[tuple[str, dict]]:
    groups = record.get(key) or {}
    if not isinstance(groups, dict):
        raise Malformed(f"{key} must map kinds to lists of probes, got {type(groups).__name__}")
    found = []
    for kind, probes in groups.items():
        if isinstance(probes, dict):
            probes = [probes]
        if not isinstance(probes, list):
            raise Malformed(f"{key}.{kind} must be a list of probes")
        for i, probe in enumerate(probes):
            if not isinstance(probe, dict):
                raise Malformed(f"{key}.{kind}[{i}] must be an object with prompt and ground_truth")
            found.append((kind, probe))
    return found


def parse_knowedit(record: dict, index: int) -> EvalCase:
    aliases: dict[str, tuple[str, ...]] = {}
    portability = []
    for kind, probe in _probe_groups(record, "portability"):
        answers = _answers(probe.get("ground_truth"), f"portability.{kind} ground_truth")
        if not answers:
            raise Malformed(f"a portability.{kind} probe has no ground_truth")
        aliases[answers[0]] = tuple(answers[1:])
        portability.append(
            PortabilityProbe(
                prompt=_prompt(probe, f"portability.{kind} prompt"),
                answer=answers[0],
                kind=KNOWEDIT_PORTABILITY.get(kind, "other"),
            )
        )
    locality = [
        LocalityProbe(
            _prompt(probe, f"locality.{kind} prompt"),
            _answer(probe.get("ground_truth"), f"locality.{kind} ground_truth"),
            kind=kind.lower(),
        )
        for kind, probe in _probe_groups(record, "locality")
    ]
    request = EditRequest(
        prompt=_prompt(_need(record, "prompt"), "prompt"),
        subject=_need(record, "subject"),
        target_new=_answer(_need(record, "target_new"), "target_new"),
        target_true=_optional_answer(record.get("ground_truth"), "ground_truth"),
        paraphrases=tuple(_prompts(record.get("rephrase_prompt"), "rephrase_prompt")),
        locality=tuple(locality),
        portability=tuple(portability),
        case_id=record.get("case_id", index),
    )
    return _case(index, "knowedit", request, answer_aliases=aliases)


def parse_mquake(record: dict, index: int) -> EvalCase:
    rewrites = _need(record, "requested_rewrite")
    if isinstance(rewrites, dict):
        rewrites = [rewrites]
    if not isinstance(rewrites, list) or not rewrites:
        raise Malformed("requested_rewrite must be a non-empty list of rewrites")
    case_id = record.get("case_id", index)
    requests = []
    for i, rewrite in enumerate(rewrites):
        if not isinstance(rewrite, dict):
            raise Malformed(f"requested_rewrite[{i}] must be an object")
        requests.append(
            EditRequest(
                prompt=_prompt(_need(rewrite, "prompt"), f"requested_rewrite[{i}].prompt"),
                subject=_need(rewrite, "subject"),
                target_new=_answer(_need(rewrite, "target_new"), "target_new"),
                target_true=_optional_answer(rewrite.get("target_true"), "target_true"),
                paraphrases=tuple(_prompts(rewrite.get("question"), "question")),
                case_id=case_id,
            )
        )
    new_answer = _answer(_need(record, "new_answer"), "new_answer")
    before = _optional_answer(record.get("answer"), "answer")
    questions = _prompts(_need(record, "questions"), "questions")
    if not questions:
        raise Malformed("no multi-hop questions")
    probes = tuple(PortabilityProbe(q, new_answer, "multi-hop", before) for q in questions)
    requests[0] = replace(requests[0], portability=requests[0].portability + probes)
    hops = len(record.get("new_single_hops") or record.get("single_hops") or []) or None
    aliases = {new_answer: tuple(_answers(record.get("new_answer_alias"), "new_answer_alias"))}
    return _case(
        index, "mquake", *requests, answer_aliases=aliases, tags={"hops": hops} if hops else {}
    )


def _stable_pick(options: Sequence[Any], salt: str) -> Any:
    return options[zlib.crc32(salt.encode()) % len(options)]


def parse_knowns(records: Sequence[Any]) -> tuple[list[EvalCase], list[RecordProblem]]:
    """Known facts become counterfactual edits within their relation (see module docstring)."""
    by_relation: dict[str, list[tuple[int, dict]]] = {}
    problems = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            problems.append(RecordProblem(i, "not a JSON object"))
            continue
        missing = [
            k for k in ("subject", "attribute", "prompt", "relation_id") if not record.get(k)
        ]
        if missing:
            problems.append(RecordProblem(i, f"missing field(s) {missing}"))
            continue
        by_relation.setdefault(str(record["relation_id"]), []).append((i, record))
    cases = []
    for relation, items in by_relation.items():
        attributes = sorted({r["attribute"] for _, r in items})
        for i, record in items:
            salt = f"{relation}:{record.get('known_id', i)}"
            others = [a for a in attributes if a.strip() != record["attribute"].strip()]
            if not others:
                problems.append(
                    RecordProblem(i, f"relation {relation} has no other attribute to edit towards")
                )
                continue
            same = [r for j, r in items if j != i and r["attribute"] == record["attribute"]]
            near = same or [r for j, r in items if j != i]
            neighbour = _stable_pick(near, salt) if near else None
            try:
                request = EditRequest(
                    prompt=record["prompt"],
                    subject=record["subject"],
                    target_new=_stable_pick(others, salt),
                    target_true=record["attribute"],
                    locality=(LocalityProbe(neighbour["prompt"], neighbour["attribute"]),)
                    if neighbour
                    else (),
                    case_id=record.get("known_id", i),
                )
            except (EditRequestError, Malformed) as error:
                problems.append(RecordProblem(i, str(error)))
                continue
            cases.append(_case(i, "knowns", request, tags={"relation_id": relation}))
    cases.sort(key=lambda c: c.index)
    problems.sort(key=lambda p: p.index)
    return cases, problems


PARSERS: dict[str, Callable[[dict, int], EvalCase]] = {
    "counterfact": parse_counterfact,
    "rome": parse_rome,
    "zsre": parse_zsre,
    "knowedit": parse_knowedit,
    "mquake": parse_mquake,
}


# ---- reading files ---------------------------------------------------------------------------
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


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) pairs; a JSONL line that is not valid JSON becomes an ``Malformed`` marker."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {line_no}", json.loads(line)))
            except json.JSONDecodeError as error:
                items.append((f"line {line_no}", Malformed(f"invalid JSON: {error}")))
        return items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None
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


def read_dataset(path: str | Path, layout: str = "auto") -> Dataset:
    """Read every record of ``path`` (JSON list or JSONL) as evaluation cases.

    Malformed records are collected in :attr:`Dataset.problems` (and logged), never raised:
    one bad record does not lose a benchmark.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    items = _read_records(path)
    if layout != "auto" and layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)} or auto")
    if layout == "auto":
        first = next((r for _, r in items if isinstance(r, dict)), None)
        if first is None:
            raise DatasetError(f"{path} holds no records")
        layout = detect_layout(first)
    problems: list[RecordProblem] = []
    if layout == "knowns":
        cases, problems = parse_knowns([r if isinstance(r, dict) else None for _, r in items])
    elif layout == "requests":
        requests = []
        for i, (where, record) in enumerate(items):
            try:
                if isinstance(record, Malformed):
                    raise record
                request = EditRequest.from_dict(record)
                if request.case_id is None:
                    request = replace(request, case_id=i)
                requests.append(request)
            except (EditRequestError, Malformed, TypeError) as error:
                problems.append(RecordProblem(i, str(error), where))
        cases = cases_from_requests(requests)
    else:
        parser = PARSERS[layout]
        cases = []
        for i, (where, record) in enumerate(items):
            try:
                if isinstance(record, Malformed):
                    raise record
                if not isinstance(record, dict):
                    raise Malformed(f"not a JSON object but {type(record).__name__}")
                cases.append(parser(record, i))
            except (EditRequestError, Malformed, TypeError) as error:
                problems.append(RecordProblem(i, str(error), where))
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
