"""From measurements to metrics: per case, then one row per method (and the unedited baseline).

:func:`case_metrics` turns one case's measurement (see :mod:`lmscalpel.evaluation.measure`) into
metric values with the definitions of :mod:`lmscalpel.evaluation.metrics`; the measurement before
the edit is needed only for locality-as-unchanged-output. :func:`aggregate` averages cases (each
case weighs the same, whatever its number of prompts, as in ROME's evaluation).

Metric keys (a key is absent when no case has the probes it needs):

========================  ========================================================================
``ES`` ``EM``             efficacy success and magnitude on the edit prompt(s)
``PS`` ``PM``             the same on paraphrases
``NS`` ``NM``             neighbourhood: the locality answer beats the new target
``score``                 harmonic mean of ES, PS and NS (ROME)
``edit_acc``              token accuracy of the new target on the edit prompt(s)
``paraphrase_acc``        the same on paraphrases
``exact_match``           greedy continuation of the edit prompt starts with the new target
``paraphrase_exact_match``  the same on paraphrases
``locality_unchanged``    locality prompts whose teacher-forced top-1 tokens did not change
``locality_unchanged/K``  the same per locality kind K, when the data has several kinds
``portability``           token accuracy of portability answers (all kinds)
``portability/K``         per kind K (multi-hop, reverse, alias, reasoning, other) and, for
                          MQuAKE, per number of hops (``portability/2-hop`` ...)
``portability_exact_match``, ``portability_exact_match/K``   the same by greedy generation
``fluency``               ROME's weighted bi-/tri-gram entropy of long generations
========================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lmscalpel.evaluation import metrics

BASELINE = "unedited"  # the label of the unedited model's row
RESOURCE_KEYS = ("seconds_per_edit", "peak_memory_mb", "memory_overhead_mb")


def _by_kind(entries: list[dict[str, Any]], value: str) -> dict[str, float | None]:
    kinds: dict[str, list] = {}
    for e in entries:
        kinds.setdefault(e["kind"], []).append(e[value])
    return {k: metrics.mean(v) for k, v in kinds.items()}


def case_metrics(
    post: Mapping[str, Any],
    pre: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Metric values of one case measured as ``post`` (``pre``: the same case before the edit)."""
    out: dict[str, float | None] = {}
    edit, para = post.get("edit", []), post.get("paraphrase", [])
    loc, port = post.get("locality", []), post.get("portability", [])
    for prefix, entries in (("E", edit), ("P", para)):
        out[f"{prefix}S"] = metrics.success_rate(
            [e["new"] for e in entries], [e["true"] for e in entries]
        )
        out[f"{prefix}M"] = metrics.mean_margin(
            [e["new"] for e in entries], [e["true"] for e in entries]
        )
    out["NS"] = metrics.success_rate([e["answer"] for e in loc], [e["new"] for e in loc])
    out["NM"] = metrics.mean_margin([e["answer"] for e in loc], [e["new"] for e in loc])
    out["edit_acc"] = metrics.mean(e["acc"] for e in edit)
    out["paraphrase_acc"] = metrics.mean(e["acc"] for e in para)
    out["exact_match"] = metrics.rate(e.get("match") for e in edit)
    out["paraphrase_exact_match"] = metrics.rate(e.get("match") for e in para)
    if pre is not None and loc:
        before = pre.get("locality", [])
        if len(before) != len(loc):
            raise ValueError("measurements before and after differ in their locality probes")
        flags = [
            {"kind": a["kind"], "same": float(metrics.unchanged(b["top1"], a["top1"]))}
            for b, a in zip(before, loc)
        ]
        out["locality_unchanged"] = metrics.mean(f["same"] for f in flags)
        kinds = _by_kind(flags, "same")
        if len(kinds) > 1:
            out.update({f"locality_unchanged/{k}": v for k, v in kinds.items()})
    if port:
        out["portability"] = metrics.mean(e["acc"] for e in port)
        out.update({f"portability/{k}": v for k, v in _by_kind(port, "acc").items()})
        out["portability_exact_match"] = metrics.rate(e.get("match") for e in port)
        out.update({f"portability_exact_match/{k}": v for k, v in _by_kind(port, "match").items()})
        hops = (tags or {}).get("hops")
        if hops:
            out[f"portability/{hops}-hop"] = out["portability"]
            out[f"portability_exact_match/{hops}-hop"] = out["portability_exact_match"]
    if "fluency" in post:
        out["fluency"] = post["fluency"]["entropy"]
    return {k: v for k, v in out.items() if v is not None}


def aggregate(per_case: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over the cases that have it, plus ``score`` (ROME's harmonic mean of
    ES, PS and NS, when all three exist)."""
    columns: dict[str, list[float]] = {}
    for values in per_case:
        for key, value in values.items():
            columns.setdefault(key, []).append(value)
    row = {k: metrics.mean(v) for k, v in columns.items()}
    if all(k in row for k in ("ES", "PS", "NS")):
        row["score"] = metrics.harmonic_mean([row["ES"], row["PS"], row["NS"]])
    return {k: v for k, v in row.items() if v is not None}


def resource_columns(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Seconds per edit (total editing time / requests edited) and peak memory while editing."""
    records = list(records)
    edits = sum(r.get("requests", 0) for r in records)
    seconds = sum(r.get("edit_seconds", 0.0) for r in records)
    out: dict[str, float] = {}
    if edits:
        out["seconds_per_edit"] = seconds / edits
    peaks = [r["peak_memory_mb"] for r in records if r.get("peak_memory_mb") is not None]
    if peaks:
        out["peak_memory_mb"] = max(peaks)
        out["memory_overhead_mb"] = max(r.get("memory_overhead_mb", 0.0) for r in records)
    return out
