"""Measuring cases on a model as it is now: every probe of every case, batched.

:func:`measure` reads the model only through :mod:`lmscalpel.scoring` (``score_targets`` and
``generate``), so in-context patches (rendered into every prompt by ``lm.render_prompt``) are
measured exactly like weight patches: evaluation never knows which method made the edit.

The result per case is a plain JSON-ready dict (stored per case, and turned into metrics by
:mod:`lmscalpel.evaluation.aggregate`)::

    {"edit":        [{"prompt", "new", "true", "acc", "match"}],      # lp = mean log-prob / token
     "paraphrase":  [{"prompt", "new", "true", "acc", "match"}],
     "locality":    [{"prompt", "kind", "answer", "new", "acc", "top1"}],
     "portability": [{"prompt", "kind", "answer", "before", "acc", "match"}],
     "fluency":     {"texts": [...], "entropy": float}}               # only for fluency cases

Work is shared: all pairs of all cases go to one ``score_targets`` call (which groups pairs by
prompt and reads several targets off one row); an answer whose teacher-forced tokens are all the
argmax *is* the greedy continuation, and one whose first token cannot begin it is no match (see
:func:`decide_match`), so only the remaining answers are generated for exact match.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from ..models.loaded import LoadedModel
from ..scoring import generate, score_targets
from ..tokens import encode_target
from . import metrics
from .cases import EvalCase
from .options import EvalOptions

MAX_MATCH_TOKENS = 32


def _probes(case: EvalCase) -> list[dict[str, Any]]:
    """Every probe of a case as (role, prompt, wanted target, other target, answers for match)."""
    probes = []
    for r in case.requests:
        for role, prompts in (("edit", (r.prompt,)), ("paraphrase", r.paraphrases)):
            for prompt in prompts:
                probes.append(
                    dict(
                        role=role,
                        prompt=prompt,
                        wanted=r.target_new,
                        other=r.target_true,
                        answers=case.aliases(r.target_new),
                        kind=None,
                    )
                )
        for p in r.locality:
            probes.append(
                dict(
                    role="locality",
                    prompt=p.prompt,
                    wanted=p.answer,
                    other=r.target_new,
                    answers=None,
                    kind=p.kind,
                )
            )
        for p in r.portability:
            probes.append(
                dict(
                    role="portability",
                    prompt=p.prompt,
                    wanted=p.answer,
                    other=p.answer_before,
                    answers=case.aliases(p.answer),
                    kind=p.kind,
                )
            )
    return probes


def _entry(probe: dict[str, Any], wanted, other) -> dict[str, Any]:
    role = probe["role"]
    lp_other = None if other is None else other.mean_logprob
    if role in ("edit", "paraphrase"):
        entry = {"prompt": probe["prompt"], "new": wanted.mean_logprob, "true": lp_other}
    elif role == "locality":
        entry = {
            "prompt": probe["prompt"],
            "kind": probe["kind"],
            "answer": wanted.mean_logprob,
            "new": lp_other,
            "top1": list(wanted.argmax_ids),
        }
    else:
        entry = {
            "prompt": probe["prompt"],
            "kind": probe["kind"],
            "answer": wanted.mean_logprob,
            "before": lp_other,
        }
    entry["acc"] = wanted.token_accuracy
    return entry


def _match_tokens(lm: LoadedModel, prompt: str, answers: Sequence[str]) -> int:
    """Tokens to generate to judge whether a continuation starts with one of ``answers``."""
    longest = max(len(encode_target(lm, prompt, a)) for a in answers)
    return min(MAX_MATCH_TOKENS, longest + 2)


def decide_match(hits: Sequence[bool], first_token: str, answers: Sequence[str]) -> bool | None:
    """Exact match decided from teacher forcing alone, or ``None`` when generation must decide.

    All answer tokens argmax: greedy decoding reproduces the answer, a match. Otherwise the greedy
    continuation starts with ``first_token`` (the argmax after the prompt): when its normalised
    text and no normalised answer is a prefix of the other, no continuation starting with it can
    match. Anything else (a token that could begin an answer, punctuation) is left to generation.
    """
    if hits and all(hits):
        return True
    start = metrics.normalize_answer(first_token)
    if not start:
        return None
    for answer in answers:
        norm = metrics.normalize_answer(answer)
        if norm and (norm.startswith(start) or start.startswith(norm)):
            return None
    return False


def exact_matches(
    lm: LoadedModel,
    items: Sequence[tuple[str, Sequence[str]]],
    *,
    known: Sequence[bool | None] | None = None,
    batch_size: int = 16,
) -> list[bool]:
    """For each (prompt, answers): does the greedy continuation start with one of the answers?

    ``known[i]``, when not ``None``, is item i's answer already (see :func:`decide_match`); only
    the others are generated, each prompt once, in batches of similar required length.
    """
    results: list[bool | None] = list(known) if known is not None else [None] * len(items)
    needed: dict[str, int] = {}
    for (prompt, answers), done in zip(items, results):
        if done is None:
            needed[prompt] = max(needed.get(prompt, 0), _match_tokens(lm, prompt, answers))
    ordered = sorted(needed, key=lambda p: needed[p])
    texts: dict[str, str] = {}
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        tokens = max(needed[p] for p in chunk)
        for prompt, text in zip(
            chunk, generate(lm, chunk, max_new_tokens=tokens, batch_size=len(chunk))
        ):
            texts[prompt] = text
    return [
        done if done is not None else metrics.starts_with_answer(texts[prompt], answers)
        for (prompt, answers), done in zip(items, results)
    ]


def measure(
    lm: LoadedModel,
    cases: Sequence[EvalCase],
    options: EvalOptions,
    *,
    fluency_keys: Collection[str] = (),
) -> dict[str, dict[str, Any]]:
    """Measure every probe of ``cases`` on ``lm`` as it is now; fluency for ``fluency_keys``.

    Returns ``{case.key: measurement}`` (see the module docstring).
    """
    probes = [(case, p) for case in cases for p in _probes(case)]
    pairs: dict[tuple[str, str], int] = {}
    for _, p in probes:
        for target in (p["wanted"], p["other"]):
            if target is not None:
                pairs.setdefault((p["prompt"], target), len(pairs))
    keys = list(pairs)
    scores = score_targets(
        lm, [k[0] for k in keys], [k[1] for k in keys], batch_size=options.score_batch_size
    )
    results: dict[str, dict[str, Any]] = {
        c.key: {"edit": [], "paraphrase": [], "locality": [], "portability": []} for c in cases
    }
    matchable = []
    for case, p in probes:
        wanted = scores[pairs[(p["prompt"], p["wanted"])]]
        other = None if p["other"] is None else scores[pairs[(p["prompt"], p["other"])]]
        entry = _entry(p, wanted, other)
        results[case.key][p["role"]].append(entry)
        if p["answers"] is not None:
            entry["match"] = None
            first = lm.tokenizer.decode([wanted.argmax_ids[0]]) if wanted.argmax_ids else ""
            decided = decide_match(wanted.argmax_hits, first, p["answers"])
            matchable.append((entry, p["prompt"], p["answers"], decided))
    if options.exact_match and matchable:
        found = exact_matches(
            lm,
            [(prompt, answers) for _, prompt, answers, _ in matchable],
            known=[decided for _, _, _, decided in matchable],
            batch_size=options.generate_batch_size,
        )
        for (entry, _, _, _), match in zip(matchable, found):
            entry["match"] = match
    wanted = set(fluency_keys)
    for key, value in measure_fluency(lm, [c for c in cases if c.key in wanted], options).items():
        results[key]["fluency"] = value
    return results


def measure_fluency(
    lm: LoadedModel, cases: Sequence[EvalCase], options: EvalOptions
) -> dict[str, dict[str, Any]]:
    """``{case.key: {"texts": [...], "entropy": float}}``: long greedy generations from each
    case's fluency prompts and their n-gram entropy (empty when fluency is switched off)."""
    if not cases or not options.measures_fluency:
        return {}
    prompts = [(c.key, p) for c in cases for p in c.fluency_prompts(options.fluency_prompts)]
    texts = generate(
        lm,
        [p for _, p in prompts],
        max_new_tokens=options.fluency_tokens,
        batch_size=options.generate_batch_size,
    )
    out = {}
    for c in cases:
        mine = [t for (key, _), t in zip(prompts, texts) if key == c.key]
        out[c.key] = {"texts": mine, "entropy": metrics.fluency(mine)}
    return out
