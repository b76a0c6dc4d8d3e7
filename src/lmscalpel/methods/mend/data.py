"""Edit records for meta-training a learned editor, read from the usual dataset layouts.

Accepted (detected from the first record): CounterFact in the simplified one-record-per-edit
layout (``prompt``, ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``,
``locality_prompt``, ``locality_ground_truth``), the original ROME layout (``requested_rewrite``,
``paraphrase_prompts``, ``neighborhood_prompts``), zsRE in the MEND layout (``src`` -> ``alt``,
``rephrase``, ``loc`` / ``loc_ans``), and lmscalpel's own request files (JSON / JSONL). Records
that do not make a valid request (a subject missing from its prompt, a new target equal to the
old one) are skipped and counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ...requests import EditRequest, EditRequestError, LocalityProbe, load_requests

log = logging.getLogger(__name__)


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _text(value: Any) -> str | None:
    value = _first(value)
    if isinstance(value, dict):
        value = value.get("str")
    return value if isinstance(value, str) and value.strip() else None


def _counterfact(record: dict) -> EditRequest:
    locality = []
    if _text(record.get("locality_prompt")) and _text(record.get("locality_ground_truth")):
        locality.append(
            LocalityProbe(_text(record["locality_prompt"]), _text(record["locality_ground_truth"]))
        )
    rephrase = _text(record.get("rephrase_prompt"))
    return EditRequest(
        prompt=record["prompt"],
        subject=record["subject"],
        target_new=_text(record["target_new"]),
        target_true=_text(record.get("ground_truth")),
        paraphrases=(rephrase,) if rephrase else (),
        locality=tuple(locality),
        case_id=record.get("case_id"),
    )


def _rome(record: dict) -> EditRequest:
    rewrite = record["requested_rewrite"]
    true = _text(rewrite.get("target_true"))
    locality = tuple(LocalityProbe(p, true) for p in record.get("neighborhood_prompts", [])[:1])
    return EditRequest(
        prompt=rewrite["prompt"],
        subject=rewrite["subject"],
        target_new=_text(rewrite["target_new"]),
        target_true=true,
        paraphrases=tuple(record.get("paraphrase_prompts", [])[:1]),
        locality=locality if true else (),
        case_id=record.get("case_id"),
    )


def _zsre(record: dict) -> EditRequest:
    locality = ()
    if _text(record.get("loc")) and _text(record.get("loc_ans")):
        locality = (LocalityProbe(_text(record["loc"]), _text(record["loc_ans"]), "unrelated"),)
    rephrase = _text(record.get("rephrase"))
    return EditRequest(
        prompt=record["src"],
        subject=record["subject"],
        target_new=_text(record["alt"]),
        target_true=_text(record.get("answers")) or _text(record.get("pred")),
        paraphrases=(rephrase,) if rephrase else (),
        locality=locality,
    )


def _converter(record: dict):
    if "requested_rewrite" in record:
        return _rome
    if "src" in record and "alt" in record:
        return _zsre
    if {"ground_truth", "rephrase_prompt", "locality_prompt"} & set(record):
        return _counterfact
    if {"prompt", "subject", "target_new"} <= set(record):
        return EditRequest.from_dict
    raise EditRequestError(
        f"unrecognised record layout (keys {sorted(record)}); expected CounterFact, zsRE (MEND "
        "layout) or lmscalpel edit requests"
    )


def load_edit_records(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Edit requests from a dataset file (see the module docstring for the layouts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix == ".jsonl":
        return load_requests(path)[:limit]
    data = json.loads(path.read_text())
    records = data if isinstance(data, list) else [data]
    if not records:
        raise EditRequestError(f"{path} holds no records")
    convert = _converter(records[0])
    requests, skipped = [], 0
    for record in records:
        if limit is not None and len(requests) >= limit:
            break
        try:
            requests.append(convert(record))
        except (EditRequestError, KeyError, TypeError):
            skipped += 1
    if skipped:
        log.info("%s: skipped %d record(s) that are not valid edit requests", path, skipped)
    if not requests:
        raise EditRequestError(f"{path}: no valid edit requests")
    return requests
