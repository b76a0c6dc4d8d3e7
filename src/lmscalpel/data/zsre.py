"""zsRE in the MEND layout (Levy et al. 2017; De Cao et al. 2021; Mitchell et al. 2022): the edit
``src`` -> ``alt``, true answer ``answers[0]`` (or ``pred``), ``rephrase``, locality ``loc`` /
``loc_ans``."""

from __future__ import annotations

from lmscalpel.core.requests import EditRequest, LocalityProbe
from lmscalpel.data import fields
from lmscalpel.data.cases import EvalCase


def parse_zsre(record: dict, index: int) -> EvalCase:
    locality = ()
    if record.get("loc"):
        prompt = fields.prompt(record["loc"], "loc")
        locality = (LocalityProbe(prompt, fields.answer(record.get("loc_ans"), "loc_ans")),)
    true = fields.optional_answer(record.get("answers"), "answers") or fields.optional_answer(
        record.get("pred"), "pred"
    )
    request = EditRequest(
        prompt=fields.prompt(fields.need(record, "src"), "src"),
        subject=fields.need(record, "subject"),
        target_new=fields.answer(fields.need(record, "alt"), "alt"),
        target_true=true,
        paraphrases=tuple(fields.prompts(record.get("rephrase"), "rephrase")),
        locality=locality,
        case_id=record.get("case_id", index),
    )
    return fields.case(index, "zsre", request)
