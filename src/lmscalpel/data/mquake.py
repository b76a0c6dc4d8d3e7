"""MQuAKE (Zhong et al. 2023, "MQuAKE: Assessing Knowledge Editing in Language Models via
Multi-Hop Questions"): every ``requested_rewrite`` becomes one request (a case's rewrites are
edited together); the multi-hop ``questions`` are portability probes answered by ``new_answer``
(``answer`` before the edit), broken down by number of hops."""

from __future__ import annotations

from dataclasses import replace

from lmscalpel.core.requests import EditRequest, PortabilityProbe
from lmscalpel.data import fields
from lmscalpel.data.cases import EvalCase
from lmscalpel.data.fields import Malformed


def parse_mquake(record: dict, index: int) -> EvalCase:
    rewrites = fields.need(record, "requested_rewrite")
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
                prompt=fields.prompt(
                    fields.need(rewrite, "prompt"), f"requested_rewrite[{i}].prompt"
                ),
                subject=fields.need(rewrite, "subject"),
                target_new=fields.answer(fields.need(rewrite, "target_new"), "target_new"),
                target_true=fields.optional_answer(rewrite.get("target_true"), "target_true"),
                paraphrases=tuple(fields.prompts(rewrite.get("question"), "question")),
                case_id=case_id,
            )
        )
    new_answer = fields.answer(fields.need(record, "new_answer"), "new_answer")
    before = fields.optional_answer(record.get("answer"), "answer")
    questions = fields.prompts(fields.need(record, "questions"), "questions")
    if not questions:
        raise Malformed("no multi-hop questions")
    probes = tuple(PortabilityProbe(q, new_answer, "multi-hop", before) for q in questions)
    requests[0] = replace(requests[0], portability=requests[0].portability + probes)
    hops = len(record.get("new_single_hops") or record.get("single_hops") or []) or None
    aliases = {
        new_answer: tuple(fields.answers(record.get("new_answer_alias"), "new_answer_alias"))
    }
    return fields.case(
        index, "mquake", *requests, answer_aliases=aliases, tags={"hops": hops} if hops else {}
    )
