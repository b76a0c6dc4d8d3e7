"""KnowEdit (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing for Large Language
Models"): ``portability`` kinds ``Reasoning`` -> ``reasoning``, ``Subject_Aliasing`` -> ``alias``,
``Logical_Generalization`` -> ``reverse``; ``locality`` kinds (``Relation_Specificity``,
``Forgetfulness``) kept as locality kinds; ground truths may be strings or lists (the first is the
answer, the rest aliases)."""

from __future__ import annotations

from lmscalpel.core.requests import LocalityProbe, PortabilityProbe
from lmscalpel.data import fields
from lmscalpel.data.cases import EvalCase
from lmscalpel.data.fields import Malformed

KNOWEDIT_PORTABILITY = {
    "Reasoning": "reasoning",
    "Subject_Aliasing": "alias",
    "Logical_Generalization": "reverse",
}


def probe_groups(record: dict, key: str) -> list[tuple[str, dict]]:
    """(kind, probe) pairs of a ``{kind: [probe, ...]}`` field."""
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
    for kind, probe in probe_groups(record, "portability"):
        answers = fields.answers(probe.get("ground_truth"), f"portability.{kind} ground_truth")
        if not answers:
            raise Malformed(f"a portability.{kind} probe has no ground_truth")
        aliases[answers[0]] = tuple(answers[1:])
        portability.append(
            PortabilityProbe(
                prompt=fields.prompt(probe, f"portability.{kind} prompt"),
                answer=answers[0],
                kind=KNOWEDIT_PORTABILITY.get(kind, "other"),
            )
        )
    locality = [
        LocalityProbe(
            fields.prompt(probe, f"locality.{kind} prompt"),
            fields.answer(probe.get("ground_truth"), f"locality.{kind} ground_truth"),
            kind=kind.lower(),
        )
        for kind, probe in probe_groups(record, "locality")
    ]
    request = fields.easyedit_request(
        record, index, locality=tuple(locality), portability=tuple(portability)
    )
    return fields.case(index, "knowedit", request, answer_aliases=aliases)
