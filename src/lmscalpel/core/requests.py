"""Edit requests: what to change, and the probes that show whether the change took and stayed put.

An :class:`EditRequest` holds the prompt (with the subject verbatim, or a ``{}`` placeholder that
the subject fills), the subject, the new target and optionally the true one, paraphrases
(generalization), locality probes (unrelated prompts with their expected answers) and portability
probes (consequences of the edit: multi-hop, reverse, alias). Requests validate themselves on
construction and are stored as JSON or JSONL.

:meth:`EditRequest.probes` is the one enumeration of a request's probes, each as a :class:`Probe`
(role, prompt, the target wanted after the edit and the one it competes with): evaluation,
the before/after report and MEND's training batches all read them from there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lmscalpel.core.config import short_repr
from lmscalpel.core.files import read_user_text

PORTABILITY_KINDS = ("multi-hop", "reverse", "alias", "reasoning", "other")
PROBE_ROLES = ("edit", "paraphrase", "locality", "portability")


class EditRequestError(ValueError):
    """A malformed edit request; the message says which field and why."""


def check_text(value: Any, what: str, *, allow_empty: bool = False) -> str:
    """``value`` if it is a (non-empty) string that encodes as UTF-8, else an
    :class:`EditRequestError` naming ``what``: the check every text a user gives passes before
    it reaches a tokenizer (a lone surrogate would be the tokenizer's ``TypeError``)."""
    if not isinstance(value, str):
        raise EditRequestError(
            f"{what} must be a string, got {type(value).__name__}: {short_repr(value)}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise EditRequestError(
            f"{what} is not valid text: {error.reason} at position {error.start} "
            f"({short_repr(value)})"
        ) from None
    if not allow_empty and not value.strip():
        raise EditRequestError(f"{what} is empty")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise EditRequestError(
            f"{what} must be a list of strings, got {type(value).__name__}: {short_repr(value)}"
        )
    return tuple(check_text(v, f"{what}[{i}]") for i, v in enumerate(value))


def _json_value(value: Any, what: str) -> None:
    """Raise unless ``value`` can be written to a requests file (JSON, UTF-8)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:
        raise EditRequestError(
            f"{what} must be JSON data (text, numbers, lists, objects): {error}"
        ) from None


def fill_subject(prompt: str, subject: str, what: str = "prompt") -> str:
    """``prompt`` with a ``{}`` placeholder replaced by ``subject``; the subject must then occur
    verbatim."""
    if "{}" in prompt:
        prompt = prompt.replace("{}", subject, 1)
    if subject not in prompt:
        raise EditRequestError(
            f"subject {short_repr(subject)} not found in the {what} {short_repr(prompt, 160)}: "
            f"the {what} must contain the subject verbatim (same case and spacing) or a "
            "{} placeholder for it"
        )
    return prompt


@dataclass(frozen=True)
class LocalityProbe:
    """An unrelated prompt whose answer must not change; ``answer`` is what the model should say."""

    prompt: str
    answer: str
    kind: str = "neighborhood"

    def __post_init__(self) -> None:
        check_text(self.prompt, "locality prompt")
        check_text(self.answer, "locality answer")
        check_text(self.kind, "locality kind")


@dataclass(frozen=True)
class PortabilityProbe:
    """A prompt whose answer should follow from the edit (multi-hop, reverse, alias...)."""

    prompt: str
    answer: str
    kind: str = "multi-hop"
    answer_before: str | None = None  # the answer the unedited model should give, when known

    def __post_init__(self) -> None:
        check_text(self.prompt, "portability prompt")
        check_text(self.answer, "portability answer")
        if not isinstance(self.kind, str) or self.kind not in PORTABILITY_KINDS:
            raise EditRequestError(
                f"portability kind {short_repr(self.kind)} unknown; use one of "
                f"{', '.join(PORTABILITY_KINDS)}"
            )
        if self.answer_before is not None:
            check_text(self.answer_before, "portability answer_before")


@dataclass(frozen=True)
class Probe:
    """One prompt that judges an edit, in the terms every consumer shares.

    ``role``: one of :data:`PROBE_ROLES`. ``wanted``: the target the *edited* model should give
    (``target_new`` for the edit prompt and paraphrases, the probe's answer for locality and
    portability). ``other``: the target ``wanted`` is compared against, CounterFact-style
    (``target_true`` for edit and paraphrases, ``target_new`` for locality, so that a leaking edit
    is seen, ``answer_before`` for portability); ``None`` when unknown. ``kind``: the locality or
    portability kind (``None`` for edit and paraphrases). ``answers``: what a greedy continuation
    must start with to count as an exact match (``(wanted,)``; a consumer may add aliases), or
    ``None`` for locality probes, which are judged by unchanged top-1 tokens instead.
    """

    role: str
    prompt: str
    wanted: str
    other: str | None = None
    kind: str | None = None
    answers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: after the edit, ``prompt`` should continue with ``target_new``.

    ``prompt`` may contain ``{}`` for the subject; it is stored with the subject filled in, and
    :attr:`template` gives the ``{}`` form back. Paraphrases may use either form too.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[LocalityProbe, ...] = ()
    portability: tuple[PortabilityProbe, ...] = ()
    case_id: int | str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("locality", "portability"):
            # a single probe is a list of one; anything else that is not a list is an error
            value = getattr(self, name)
            if isinstance(value, (dict, LocalityProbe, PortabilityProbe)):
                value = (value,)
            if not isinstance(value, (list, tuple)):
                raise EditRequestError(
                    f"{name} must be a list of probes (objects with prompt and answer), got "
                    f"{type(value).__name__}: {short_repr(value)}"
                )
            object.__setattr__(self, name, value)
        subject = check_text(self.subject, "subject")
        if subject != subject.strip():
            raise EditRequestError(f"subject {subject!r} has leading or trailing white space")
        prompt = fill_subject(check_text(self.prompt, "prompt"), subject)
        object.__setattr__(self, "prompt", prompt)
        new = check_text(self.target_new, "target_new")
        if self.target_true is not None:
            true = check_text(self.target_true, "target_true")
            if new.strip() == true.strip():
                raise EditRequestError(
                    f"target_new equals target_true ({new.strip()!r}): nothing to edit"
                )
        paraphrases = tuple(
            p.replace("{}", subject, 1) for p in _strings(self.paraphrases, "paraphrases")
        )
        object.__setattr__(self, "paraphrases", paraphrases)
        for name, kind in (("locality", LocalityProbe), ("portability", PortabilityProbe)):
            probes = tuple(
                _probe(kind, p, f"{name}[{i}]") for i, p in enumerate(getattr(self, name))
            )
            object.__setattr__(self, name, probes)
        case_id = self.case_id
        if case_id is not None and (
            isinstance(case_id, bool) or not isinstance(case_id, (int, str))
        ):
            raise EditRequestError(f"case_id must be an int or a string, got {short_repr(case_id)}")
        if isinstance(case_id, int) and not -(2**63) <= case_id < 2**63:
            raise EditRequestError(f"case_id must fit in 64 bits, got {short_repr(case_id)}")
        if isinstance(case_id, str):
            check_text(case_id, "case_id", allow_empty=True)
        if not isinstance(self.extra, dict):
            raise EditRequestError(
                f"extra must be a dict, got {type(self.extra).__name__}: {short_repr(self.extra)}"
            )
        _json_value(self.extra, "extra")

    @property
    def template(self) -> str:
        """The prompt with the subject's first occurrence replaced by ``{}``."""
        return self.prompt.replace(self.subject, "{}", 1)

    def probes(self) -> tuple[Probe, ...]:
        """Every probe of this request, in a fixed order: the edit prompt, the paraphrases, the
        locality probes, the portability probes (see :class:`Probe`)."""
        new, true = self.target_new, self.target_true
        return (
            Probe("edit", self.prompt, new, true, answers=(new,)),
            *(Probe("paraphrase", p, new, true, answers=(new,)) for p in self.paraphrases),
            *(Probe("locality", p.prompt, p.answer, new, p.kind) for p in self.locality),
            *(
                Probe("portability", p.prompt, p.answer, p.answer_before, p.kind, (p.answer,))
                for p in self.portability
            ),
        )

    def check_fits(self, tokenizer, max_context: int) -> None:
        """Raise if any probe's prompt (with its longest target) exceeds the model's context;
        only the tokenizer runs, never the model."""
        for probe in self.probes():
            targets = [t for t in (probe.wanted, probe.other, self.target_new) if t is not None]
            target = max(targets, key=len)
            n = len(tokenizer(f"{probe.prompt} {target}")["input_ids"])
            if n > max_context:
                raise EditRequestError(
                    f"{probe.role} prompt {probe.prompt[:60]!r}... is {n} tokens with its "
                    f"target, longer than the model's context of {max_context} tokens"
                )

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["paraphrases"] = list(self.paraphrases)
        data["locality"] = [asdict(p) for p in self.locality]
        data["portability"] = [asdict(p) for p in self.portability]
        return {k: v for k, v in data.items() if v not in (None, [], {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        if not isinstance(data, dict):
            raise EditRequestError(
                f"an edit request must be a JSON object, got {type(data).__name__}: "
                f"{short_repr(data)}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=repr)
        if unknown:
            raise EditRequestError(
                f"unknown field(s) {unknown} in edit request; known: {sorted(known)}"
            )
        missing = [k for k in ("prompt", "subject", "target_new") if k not in data]
        if missing:
            raise EditRequestError(f"edit request lacks required field(s) {missing}")
        return cls(**data)


def _probe(kind: type, value: Any, what: str):
    """A probe of class ``kind`` from itself or a dict; errors name ``what`` (``locality[2]``)."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise EditRequestError(
            f"{what} must be a probe (an object with prompt and answer), got "
            f"{type(value).__name__}: {short_repr(value)}"
        )
    names = [f.name for f in fields(kind)]
    unknown = sorted(set(value) - set(names), key=repr)
    if unknown:
        raise EditRequestError(f"{what}: unknown field(s) {unknown}; known: {names}")
    missing = [k for k in ("prompt", "answer") if k not in value]
    if missing:
        raise EditRequestError(f"{what} lacks required field(s) {missing}")
    try:
        return kind(**value)
    except EditRequestError as error:
        raise EditRequestError(f"{what}: {error}") from None


def save_requests(requests: Iterable[EditRequest], path: str | Path) -> None:
    """Write requests as JSONL (``.jsonl``) or a JSON list (anything else)."""
    path = Path(path)
    records = [r.to_dict() for r in requests]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1))


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read requests written by :func:`save_requests` (JSONL, a JSON list or one JSON object).

    A malformed record raises an :class:`EditRequestError` naming its index (line, for JSONL).
    """
    path = Path(path)
    text = read_user_text(path, "requests file", EditRequestError)
    if path.suffix == ".jsonl":
        items = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                items.append((f"line {line_no}", _parse_json(line, f"{path}: line {line_no}")))
    else:
        data = _parse_json(text, str(path))
        data = data if isinstance(data, list) else [data]
        items = [(f"record {i}", d) for i, d in enumerate(data)]
    requests = []
    for where, item in items:
        try:
            requests.append(EditRequest.from_dict(item))
        except EditRequestError as error:
            raise EditRequestError(f"{path}: {where}: {error}") from None
    return requests


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EditRequestError(f"{where}: invalid JSON: {error}") from None
    except RecursionError:
        raise EditRequestError(f"{where}: invalid JSON: nested too deeply") from None


def as_requests(requests: EditRequest | Sequence[EditRequest]) -> list[EditRequest]:
    """Accept one request or several; reject anything else with a clear message."""
    if isinstance(requests, EditRequest):
        return [requests]
    if isinstance(requests, (str, bytes, dict)) or not isinstance(requests, Iterable):
        hint = " (EditRequest.from_dict reads a dict)" if isinstance(requests, dict) else ""
        raise EditRequestError(
            f"requests must be an EditRequest or a list of them, got "
            f"{type(requests).__name__}{hint}"
        )
    items = list(requests)
    if not items:
        raise EditRequestError("no edit requests given")
    for i, r in enumerate(items):
        if not isinstance(r, EditRequest):
            raise EditRequestError(f"request {i} is a {type(r).__name__}, not an EditRequest")
    return items
