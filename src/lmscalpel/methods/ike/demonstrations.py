"""IKE's demonstrations: worked examples, built from pool edits, that teach the model how to use a
new fact (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?").

* **copy** — the query is the pool fact's own prompt; the answer is its new target;
* **update** — the query is a paraphrase of the pool fact's prompt; the answer is its new target;
* **retain** — the query is an unrelated (locality) prompt; the answer is its unchanged old one,
  which teaches the model to *ignore* the new fact where it does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmscalpel.core.requests import EditRequest, EditRequestError
from lmscalpel.tokens import target_text

DEMONSTRATION_KINDS = ("copy", "update", "retain")


def fact_text(prompt: str, target: str) -> str:
    """A fact as one sentence: ``"The Eiffel Tower is located in the city of Rome"``."""
    return prompt + target_text(prompt, target)


@dataclass(frozen=True)
class Demonstration:
    """One worked example: a fact, a query and the answer the model should give."""

    kind: str
    fact: str
    query: str
    answer: str

    def text(self) -> str:
        return f"New Fact: {self.fact}\nPrompt: {fact_text(self.query, self.answer)}"


def make_demonstration(item: EditRequest, kind: str) -> Demonstration:
    """The ``kind`` demonstration (copy, update or retain) built from pool edit ``item``."""
    fact = fact_text(item.prompt, item.target_new)
    if kind == "copy":
        return Demonstration(kind, fact, item.prompt, item.target_new)
    if kind == "update":
        if not item.paraphrases:
            raise EditRequestError(f"pool item {item.case_id!r} has no paraphrase for an update")
        return Demonstration(kind, fact, item.paraphrases[0], item.target_new)
    if kind == "retain":
        if not item.locality:
            raise EditRequestError(f"pool item {item.case_id!r} has no locality prompt to retain")
        probe = item.locality[0]
        return Demonstration(kind, fact, probe.prompt, probe.answer)
    raise ValueError(f"unknown demonstration kind {kind!r}; use one of {DEMONSTRATION_KINDS}")


def kind_schedule(k: int, shares: Sequence[float]) -> list[str]:
    """Kinds for ``k`` demonstrations in the given (copy, update, retain) proportions,
    interleaved so that every prefix keeps them as well as it can (ties go to copy, then update,
    then retain)."""
    total = sum(shares)
    quotas = [k * s / total for s in shares]
    counts = [int(q) for q in quotas]  # largest remainder: exact totals
    by_remainder = sorted(range(3), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: k - sum(counts)]:
        counts[i] += 1
    used = [0, 0, 0]
    kinds = []
    for position in range(k):
        lag = [
            counts[i] * (position + 1) / k - used[i] if used[i] < counts[i] else -1e9
            for i in range(3)
        ]
        pick = max(range(3), key=lambda i: (lag[i], -i))
        used[pick] += 1
        kinds.append(DEMONSTRATION_KINDS[pick])
    return kinds


def demonstrations_for(
    neighbours: Sequence[EditRequest], shares: Sequence[float]
) -> list[Demonstration]:
    """Demonstrations from pool items ordered most similar first, returned in context order
    (least similar first, so the most similar sits next to the query)."""
    kinds = kind_schedule(len(neighbours), shares)
    demos = [make_demonstration(item, kind) for item, kind in zip(neighbours, kinds)]
    return demos[::-1]
