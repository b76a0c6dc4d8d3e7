"""Evaluation cases: what is edited together, and the probes that judge it.

An :class:`EvalCase` is one benchmark record turned into one or several
:class:`~lmscalpel.core.requests.EditRequest` s that are edited *together* (a CounterFact record is one
request; a MQuAKE record may rewrite two facts at once). The requests carry every probe: edit
prompt, paraphrases, locality and portability probes. Evaluation never looks at the raw record
again, so every layout is measured the same way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmscalpel.core.config import ConfigError
from lmscalpel.core.requests import EditRequest


@dataclass(frozen=True)
class EvalCase:
    """One case of a benchmark.

    ``key`` identifies the case within its data file (its record index, as a string) and is what a
    resumed run matches on. ``generation_prompts`` are prompts for the fluency measurement when
    the data has them (ROME's layout); otherwise the edit prompt and paraphrases are used.
    ``answer_aliases`` maps an answer to other strings accepted by exact match (MQuAKE's aliases).
    ``tags`` hold facts used to break results down, e.g. ``{"hops": 3}`` for MQuAKE.
    """

    key: str
    requests: tuple[EditRequest, ...]
    index: int
    source: str = ""
    generation_prompts: tuple[str, ...] = ()
    answer_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    tags: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"case {self.key} has no edit request")
        object.__setattr__(self, "requests", tuple(self.requests))
        object.__setattr__(self, "generation_prompts", tuple(self.generation_prompts))

    @property
    def case_id(self) -> int | str | None:
        return self.requests[0].case_id

    def fluency_prompts(self, k: int) -> list[str]:
        """Up to ``k`` prompts whose long generations measure fluency."""
        if self.generation_prompts:
            return list(self.generation_prompts[:k])
        prompts = [p for r in self.requests for p in (r.prompt, *r.paraphrases)]
        return list(dict.fromkeys(prompts))[:k]

    def aliases(self, answer: str) -> tuple[str, ...]:
        """``answer`` and its accepted aliases."""
        return (answer, *self.answer_aliases.get(answer, ()))


def cases_from_requests(
    requests: Sequence[EditRequest], source: str = "requests"
) -> list[EvalCase]:
    """One case per request, except that requests sharing a ``case_id`` form one case (edited
    together), in order of first appearance."""
    groups: dict[Any, list[tuple[int, EditRequest]]] = {}
    for i, request in enumerate(requests):
        group = ("id", request.case_id) if request.case_id is not None else ("index", i)
        groups.setdefault(group, []).append((i, request))
    return [
        EvalCase(
            key=str(items[0][0]),
            requests=tuple(r for _, r in items),
            index=items[0][0],
            source=source,
        )
        for items in groups.values()
    ]


def select_cases(
    cases: Sequence[EvalCase], n: int | None = None, *, start: int = 0, seed: int | None = None
) -> list[EvalCase]:
    """A deterministic subset: ``cases[start:start + n]``, after a shuffle seeded by ``seed``
    when one is given (the same seed always picks the same cases). A negative ``n`` or
    ``start`` raises :class:`~lmscalpel.core.config.ConfigError` (a ``ValueError``)."""
    if n is not None and n < 0:
        raise ConfigError(f"the number of cases must be >= 0, got {n}")
    if start < 0:
        raise ConfigError(f"the first case's index (start) must be >= 0, got {start}")
    chosen = list(cases)
    if seed is not None:
        random.Random(seed).shuffle(chosen)
    end = None if n is None else start + n
    return chosen[start:end]
