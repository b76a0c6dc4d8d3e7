"""The known facts of ROME's causal tracing (Meng et al. 2022) as counterfactual edits.

``attribute`` is the true target; the new target is the attribute of another fact of the same
relation, and a neighbouring fact of the same relation is the locality probe (both chosen
deterministically from the fact's id). The layout is read as a whole file, since a fact's edit
depends on the other facts of its relation.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from lmscalpel.core.requests import EditRequest, EditRequestError, LocalityProbe
from lmscalpel.data import fields
from lmscalpel.data.cases import EvalCase
from lmscalpel.data.fields import Malformed, RecordProblem


def stable_pick(options: Sequence[Any], salt: str) -> Any:
    """One of ``options``, the same for the same ``salt`` on every run and machine."""
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
            neighbour = stable_pick(near, salt) if near else None
            try:
                request = EditRequest(
                    prompt=record["prompt"],
                    subject=record["subject"],
                    target_new=stable_pick(others, salt),
                    target_true=record["attribute"],
                    locality=(LocalityProbe(neighbour["prompt"], neighbour["attribute"]),)
                    if neighbour
                    else (),
                    case_id=record.get("known_id", i),
                )
            except (EditRequestError, Malformed) as error:
                problems.append(RecordProblem(i, str(error)))
                continue
            cases.append(fields.case(i, "knowns", request, tags={"relation_id": relation}))
    cases.sort(key=lambda c: c.index)
    problems.sort(key=lambda p: p.index)
    return cases, problems
