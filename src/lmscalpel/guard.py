"""Guarded edits: apply a patch, check that it took and stayed put, roll it back when it did not.

A :class:`Guard` holds the bounds an edit must meet once applied:

* **reliability**: the edit prompts' new targets, teacher-forced, are the model's top-1 tokens
  (mean share of such tokens over the requests; :attr:`TargetScore.token_accuracy`);
* **generalization**: the same on the requests' paraphrases;
* **locality**: the teacher-forced top-1 tokens of each locality probe's answer are the same
  before and after the edit (mean share of unchanged tokens);
* **general prompts**: a fixed set of everyday prompts (:data:`DEFAULT_GENERAL_PROMPTS`, or the
  caller's) whose greedy answers (first :attr:`Guard.general_tokens` tokens) must not change;
  at most :attr:`Guard.max_general_changed` may.

These are the usual editing metrics at request level (reliability / generalization / locality as
in Yao et al. 2023, "Editing Large Language Models: Problems, Methods, and Opportunities"), all
read through :mod:`lmscalpel.scoring`, so in-context patches are judged like weight patches.

:func:`guarded_apply` measures what it needs before, applies the patch, measures again and, when
a bound is missed, reverts the patch (the model is then exactly as before) and raises
:class:`GuardRejected`, whose :attr:`~GuardRejected.report` carries the measured numbers and the
failures. On success the report is returned and recorded in ``patch.info["guard"]`` (saved with
the patch, for the audit trail). ``lmscalpel.edit(..., guard=Guard())`` is the usual way in.
A bound of ``None`` is not checked; a metric with nothing to measure (no paraphrases, no locality
probes) is ``None`` and passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmscalpel.core.config import ConfigError
from lmscalpel.core.requests import EditRequest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch
from lmscalpel.scoring import generate, score_targets

DEFAULT_GENERAL_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "The largest planet in the solar system is",
    "Romeo and Juliet was written by",
    "The chemical symbol for gold is",
    "The first president of the United States was",
    "Water freezes at a temperature of",
    "The Great Wall is located in",
    "The tallest mountain in the world is",
    "The language spoken in Brazil is",
    "Two plus two equals",
)
"""Everyday prompts whose greedy answers an edit of an unrelated fact must not change."""


class GuardRejected(RuntimeError):
    """A guarded edit missed a bound and was rolled back; the model is as it was before.

    ``report`` holds the measured numbers, the bounds and the failures; ``patch`` the rejected
    (unapplied) patch.
    """

    def __init__(self, report: GuardReport, patch: Patch | None = None) -> None:
        self.report = report
        self.patch = patch
        super().__init__("edit rolled back by the guard: " + "; ".join(report.failures))


def _bound(name: str, value: Any, *, integer: bool = False) -> None:
    if value is None:
        return
    if integer:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"Guard.{name} must be an integer >= 0 or None, got {value!r}")
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ConfigError(f"Guard.{name} must be a number in [0, 1] or None, got {value!r}")


@dataclass(frozen=True)
class Guard:
    """The bounds a guarded edit must meet (``None``: not checked). See the module docstring."""

    min_reliability: float | None = 1.0
    min_generalization: float | None = None
    min_locality: float | None = 0.9
    general_prompts: tuple[str, ...] = DEFAULT_GENERAL_PROMPTS
    max_general_changed: int | None = 0
    general_tokens: int = 3

    def __post_init__(self) -> None:
        for name in ("min_reliability", "min_generalization", "min_locality"):
            _bound(name, getattr(self, name))
        _bound("max_general_changed", self.max_general_changed, integer=True)
        if (
            not isinstance(self.general_tokens, int)
            or isinstance(self.general_tokens, bool)
            or not 1 <= self.general_tokens <= 64
        ):
            raise ConfigError(
                f"Guard.general_tokens must be an integer in [1, 64], got {self.general_tokens!r}"
            )
        prompts = self.general_prompts
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ConfigError(
                f"Guard.general_prompts must be a list of strings, got {type(prompts).__name__}"
            )
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"Guard.general_prompts[{i}] must be a non-empty string")
        object.__setattr__(self, "general_prompts", tuple(prompts))

    @classmethod
    def measure_only(cls) -> Guard:
        """A guard that checks nothing and measures the request's own probes (no general
        prompts): the numbers of an unguarded edit."""
        return cls(None, None, None, (), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Guard:
        """A guard from JSON; ``general_prompts: null`` (or absent) means the default set."""
        if not isinstance(data, dict):
            raise ConfigError(f"a guard must be a JSON object, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown guard field(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        if data.get("general_prompts") is None:
            data.pop("general_prompts", None)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["general_prompts"] = list(self.general_prompts)
        return data


@dataclass
class GuardReport:
    """What a guarded apply measured: ``measured`` (reliability, generalization, locality,
    general_changed, general_total), the ``bounds`` checked, the ``failures`` (one line each) and
    the general prompts' answers before and after."""

    measured: dict[str, float | int | None]
    bounds: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    general: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": list(self.failures),
            "bounds": dict(self.bounds),
            "measured": dict(self.measured),
            "general": [dict(g) for g in self.general],
        }


@dataclass(frozen=True)
class _Before:
    locality_tops: list[tuple[int, ...]]
    general_answers: list[str]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _locality_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    return [(p.prompt, p.answer) for r in requests for p in r.locality]


def _greedy(lm: LoadedModel, prompts: Sequence[str], tokens: int) -> list[str]:
    return generate(lm, list(prompts), max_new_tokens=tokens) if prompts else []


def measure_before(lm: LoadedModel, requests: Sequence[EditRequest], guard: Guard) -> _Before:
    """What the unedited model does on the locality probes and the general prompts."""
    pairs = _locality_pairs(requests)
    scores = score_targets(lm, [p for p, _ in pairs], [a for _, a in pairs])
    return _Before(
        [s.argmax_ids for s in scores], _greedy(lm, guard.general_prompts, guard.general_tokens)
    )


def measure_after(
    lm: LoadedModel, requests: Sequence[EditRequest], guard: Guard, before: _Before
) -> GuardReport:
    """The edited model's numbers, compared with ``before`` and checked against ``guard``."""
    edit = [(r.prompt, r.target_new) for r in requests]
    para = [(p, r.target_new) for r in requests for p in r.paraphrases]
    local = _locality_pairs(requests)
    pairs = edit + para + local
    scores = score_targets(lm, [p for p, _ in pairs], [t for _, t in pairs])
    edit_s, para_s = scores[: len(edit)], scores[len(edit) : len(edit) + len(para)]
    local_s = scores[len(edit) + len(para) :]
    unchanged = [
        sum(a == b for a, b in zip(s.argmax_ids, tops)) / len(tops)
        for s, tops in zip(local_s, before.locality_tops)
    ]
    general_after = _greedy(lm, guard.general_prompts, guard.general_tokens)
    general = [
        {"prompt": p, "before": b, "after": a}
        for p, b, a in zip(guard.general_prompts, before.general_answers, general_after)
    ]
    changed = sum(g["before"] != g["after"] for g in general)
    measured: dict[str, float | int | None] = {
        "reliability": _mean([s.token_accuracy for s in edit_s]),
        "generalization": _mean([s.token_accuracy for s in para_s]),
        "locality": _mean(unchanged),
        "general_changed": changed if general else None,
        "general_total": len(general),
    }
    bounds = {
        "min_reliability": guard.min_reliability,
        "min_generalization": guard.min_generalization,
        "min_locality": guard.min_locality,
        "max_general_changed": guard.max_general_changed,
    }
    failures = []
    for metric in ("reliability", "generalization", "locality"):
        bound, value = bounds[f"min_{metric}"], measured[metric]
        if bound is not None and value is not None and value < bound:
            failures.append(f"{metric} {value:.3f} < {bound}")
    most = guard.max_general_changed
    if most is not None and general and changed > most:
        which = ", ".join(repr(g["prompt"]) for g in general if g["before"] != g["after"])
        failures.append(
            f"{changed} of {len(general)} general prompts changed their answer (at most {most} "
            f"may): {which}"
        )
    return GuardReport(measured, bounds, failures, general)


def guarded_apply(lm: LoadedModel, patch: Patch, guard: Guard) -> GuardReport:
    """Apply ``patch`` to ``lm`` and keep it only if it meets ``guard``.

    Returns the :class:`GuardReport` (also stored in ``patch.info["guard"]``). When a bound is
    missed the patch is reverted and :class:`GuardRejected` raised; any error while measuring
    reverts it too.
    """
    before = measure_before(lm, patch.requests, guard)
    patch.apply(lm)
    try:
        report = measure_after(lm, patch.requests, guard, before)
    except BaseException:
        patch.revert()
        raise
    if not report.passed:
        patch.revert()
        raise GuardRejected(report, patch)
    patch.info["guard"] = report.to_dict()
    return report
