"""CounterFact (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") in its two
published layouts.

``counterfact``
    The simplified one-record-per-edit CounterFact used by EasyEdit: ``prompt``, ``subject``,
    ``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
    ``locality_ground_truth``.
``rome``
    ROME's original layout: ``requested_rewrite`` (``prompt`` with ``{}``, ``target_new.str``,
    ``target_true.str``), ``paraphrase_prompts``, ``neighborhood_prompts`` (answered by the true
    target), ``generation_prompts`` (for fluency); also the course variant with the rewrite's fields
    at top level and ``portable_prompts`` (``prompt``, ``portable_target_new``,
    ``portable_target_true``).
"""

from __future__ import annotations

from typing import Any

from lmscalpel.core.requests import EditRequest, LocalityProbe, PortabilityProbe
from lmscalpel.data import fields
from lmscalpel.data.cases import EvalCase
from lmscalpel.data.fields import Malformed


def parse_counterfact(record: dict, index: int) -> EvalCase:
    locality = ()
    if record.get("locality_prompt"):
        answer = fields.answer(record.get("locality_ground_truth"), "locality_ground_truth")
        prompt = fields.prompt(record["locality_prompt"], "locality_prompt")
        locality = (LocalityProbe(prompt, answer),)
    request = fields.easyedit_request(record, index, locality=locality)
    return fields.case(index, "counterfact", request)


def portable_kind(value: Any) -> str:
    """A portability kind named in a record, as one of lmscalpel's kinds (``other`` if unknown)."""
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
    target_true = fields.optional_answer(rewrite.get("target_true"), "target_true")
    neighborhood = []
    for i, item in enumerate(record.get("neighborhood_prompts") or []):
        answer = target_true
        if isinstance(item, dict):
            given = item.get("target", item.get("answer"))
            answer = fields.optional_answer(given, "target") or answer
        if answer is None:
            raise Malformed(
                f"neighborhood_prompts[{i}] has no answer and the rewrite no target_true"
            )
        prompt = fields.prompt(item, f"neighborhood_prompts[{i}]")
        neighborhood.append(LocalityProbe(prompt, answer))
    portability = []
    for i, item in enumerate(record.get("portable_prompts") or []):
        if not isinstance(item, dict):
            raise Malformed(f"portable_prompts[{i}] must be an object")
        portability.append(
            PortabilityProbe(
                prompt=fields.prompt(item, f"portable_prompts[{i}]"),
                answer=fields.answer(item.get("portable_target_new"), "portable_target_new"),
                kind=portable_kind(item.get("kind", item.get("type"))),
                answer_before=fields.optional_answer(
                    item.get("portable_target_true"), "target_true"
                ),
            )
        )
    request = EditRequest(
        prompt=fields.prompt(fields.need(rewrite, "prompt"), "prompt"),
        subject=fields.need(rewrite, "subject"),
        target_new=fields.answer(fields.need(rewrite, "target_new"), "target_new"),
        target_true=target_true,
        paraphrases=tuple(fields.prompts(record.get("paraphrase_prompts"), "paraphrase_prompts")),
        locality=tuple(neighborhood),
        portability=tuple(portability),
        case_id=record.get("case_id", index),
    )
    generation = fields.prompts(record.get("generation_prompts"), "generation_prompts")
    return fields.case(index, "rome", request, generation_prompts=tuple(generation))
