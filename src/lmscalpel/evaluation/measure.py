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
prompt and reads several targets off one row). Exact match is decided by generating, except where
the greedy continuation's first token (the teacher-forced argmax after the prompt) already rules
a match out (see :func:`cannot_match`). Teacher forcing cannot confirm a match: an answer whose
tokens are all the argmax may still be glued to the next token (" Sega" then "MX"), which the
word-boundary rule of :func:`~lmscalpel.evaluation.metrics.starts_with_answer` rejects.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

from lmscalpel.core.requests import Probe
from lmscalpel.data.cases import EvalCase
from lmscalpel.evaluation import metrics
from lmscalpel.evaluation.options import EvalOptions
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.scoring import TargetScore, generate, score_targets
from lmscalpel.tokens import encode_target

MAX_MATCH_TOKENS = 32


def probes_of(case: EvalCase) -> list[Probe]:
    """Every probe of a case, request by request (:meth:`EditRequest.probes` order), exact-match
    answers extended by the case's aliases."""
    return [
        p if p.answers is None else replace(p, answers=case.aliases(p.wanted))
        for r in case.requests
        for p in r.probes()
    ]


def _entry(probe: Probe, wanted: TargetScore, other: TargetScore | None) -> dict[str, Any]:
    lp_other = None if other is None else other.mean_logprob
    if probe.role in ("edit", "paraphrase"):
        entry = {"prompt": probe.prompt, "new": wanted.mean_logprob, "true": lp_other}
    elif probe.role == "locality":
        entry = {"prompt": probe.prompt, "kind": probe.kind, "answer": wanted.mean_logprob,
                 "new": lp_other, "top1": list(wanted.argmax_ids)}  # fmt: skip
    else:
        entry = {"prompt": probe.prompt, "kind": probe.kind, "answer": wanted.mean_logprob,
                 "before": lp_other}  # fmt: skip
    entry["acc"] = wanted.token_accuracy
    return entry


def match_tokens(lm: LoadedModel, prompt: str, answers: Sequence[str]) -> int:
    """Tokens to generate to judge whether a continuation starts with one of ``answers``."""
    longest = max(len(encode_target(lm, prompt, a)) for a in answers)
    return min(MAX_MATCH_TOKENS, longest + 2)


def cannot_match(first_token: str, answers: Sequence[str]) -> bool:
    """Whether no continuation that starts with the text ``first_token`` (a decoded token) can
    start with one of ``answers`` in the sense of :func:`metrics.starts_with_answer`.

    That is so when the normalised token is non-empty and, for every normalised answer, neither
    begins it nor extends it. Only what later text cannot change is relied on: the token must be
    ASCII (a non-ASCII piece may be half of a character split across tokens) with no inner white
    space (a tokenizer's clean-up may join words around it), and a final letter stands for every
    letter it composes into with a following combining accent ("e" for "é"). ``True`` only when
    that is certain; ``False`` means generation decides.
    """
    if not first_token.isascii() or any(c.isspace() for c in first_token.strip()):
        return False
    start = metrics.normalize_answer(first_token)
    if not start:
        return False
    composable = first_token[-1].isalpha()  # then it is the last character of ``start``
    for answer in answers:
        norm = metrics.normalize_answer(answer)
        if not norm:
            continue
        if norm.startswith(start) or start.startswith(norm):
            return False
        if composable and len(norm) >= len(start) and norm.startswith(start[:-1]):
            accented = unicodedata.normalize("NFD", norm[len(start) - 1])
            if accented[0] == start[-1]:
                return False
    return True


def exact_matches(
    lm: LoadedModel,
    items: Sequence[tuple[str, Sequence[str]]],
    *,
    known: Sequence[bool | None] | None = None,
    batch_size: int = 16,
) -> list[bool]:
    """For each (prompt, answers): does the greedy continuation start with one of the answers?

    ``known[i]``, when not ``None``, is item i's answer already (see :func:`cannot_match`); only
    the others are generated, each prompt once, in batches of similar required length.
    """
    results: list[bool | None] = list(known) if known is not None else [None] * len(items)
    needed: dict[str, int] = {}
    for (prompt, answers), done in zip(items, results):
        if done is None:
            needed[prompt] = max(needed.get(prompt, 0), match_tokens(lm, prompt, answers))
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
    probes = [(case, p) for case in cases for p in probes_of(case)]
    pairs: dict[tuple[str, str], int] = {}
    for _, p in probes:
        for target in (p.wanted, p.other):
            if target is not None:
                pairs.setdefault((p.prompt, target), len(pairs))
    keys = list(pairs)
    scores = score_targets(
        lm, [k[0] for k in keys], [k[1] for k in keys], batch_size=options.score_batch_size
    )
    results: dict[str, dict[str, Any]] = {
        c.key: {"edit": [], "paraphrase": [], "locality": [], "portability": []} for c in cases
    }
    matchable = []
    for case, p in probes:
        wanted = scores[pairs[(p.prompt, p.wanted)]]
        other = None if p.other is None else scores[pairs[(p.prompt, p.other)]]
        entry = _entry(p, wanted, other)
        results[case.key][p.role].append(entry)
        if p.answers is not None:
            entry["match"] = None
            first = lm.tokenizer.decode(list(wanted.argmax_ids[:1]), skip_special_tokens=True)
            decided = False if cannot_match(first, p.answers) else None
            matchable.append((entry, p.prompt, p.answers, decided))
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
