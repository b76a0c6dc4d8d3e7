"""Metric definitions: pure functions of scores and texts, no model anywhere.

Everything evaluation reports is defined here, once, so that it can be checked on hand-built
numbers (tests/test_evaluation_metrics.py):

* CounterFact scores (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): the
  probability of a target is read teacher-forced as the mean per-token log-probability ``lp``
  (so targets of different lengths compare fairly, as in ROME's evaluation). Efficacy
  ``ES`` = share of edit prompts where lp(new) > lp(true); magnitude ``EM`` = mean of
  exp(lp(new)) − exp(lp(true)); ``PS`` / ``PM`` the same on paraphrases; neighbourhood ``NS`` =
  share of locality prompts where lp(true answer) > lp(new target), ``NM`` likewise. ``score`` is
  ROME's harmonic mean of ES, PS and NS.
* Token accuracy (zsRE, De Cao et al. 2021; EasyEdit, Wang et al. 2023): share of target tokens that
  are the argmax under teacher forcing.
* Exact match by generation: the greedy continuation starts with the answer, compared after
  :func:`normalize_answer` (case, punctuation, white space) and at a word boundary.
* Locality as unchanged output: a locality prompt is unchanged when the top-1 token at every
  position of its teacher-forced answer is the same before and after the edit.
* Fluency: ROME's weighted bi-/tri-gram entropy of a generated text (weights 2/3 and 4/3, entropy
  in bits, averaged over n), averaged over texts; a model that starts repeating itself scores low.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")
_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)


# ---- aggregation helpers --------------------------------------------------------------------
def mean(values: Iterable[float | None]) -> float | None:
    """Arithmetic mean of the values that are not ``None``; ``None`` when there are none."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def rate(flags: Iterable[bool | None]) -> float | None:
    """Share of true flags among those that are not ``None``; ``None`` when there are none."""
    return mean(None if f is None else float(bool(f)) for f in flags)


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean (ROME's overall score of ES, PS, NS); ``None`` if any value is missing,
    0 if any is 0."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# ---- CounterFact probability comparisons ------------------------------------------------------
def success(lp_wanted: float | None, lp_other: float | None) -> bool | None:
    """Whether the wanted target is more likely than the other (mean per-token log-probs);
    ``None`` when either is unknown (e.g. no true target)."""
    if lp_wanted is None or lp_other is None:
        return None
    return lp_wanted > lp_other


def margin(lp_wanted: float | None, lp_other: float | None) -> float | None:
    """exp(lp_wanted) − exp(lp_other): ROME's magnitude, a difference of per-token probabilities."""
    if lp_wanted is None or lp_other is None:
        return None
    return math.exp(lp_wanted) - math.exp(lp_other)


def success_rate(wanted: Sequence[float | None], other: Sequence[float | None]) -> float | None:
    """ES / PS / NS over a set of prompts: share where the wanted target wins."""
    return rate(success(a, b) for a, b in zip(wanted, other, strict=True))


def mean_margin(wanted: Sequence[float | None], other: Sequence[float | None]) -> float | None:
    """EM / PM / NM over a set of prompts: mean probability margin of the wanted target."""
    return mean(margin(a, b) for a, b in zip(wanted, other, strict=True))


# ---- token level -----------------------------------------------------------------------------
def token_accuracy(hits: Sequence[bool]) -> float:
    """Share of target tokens that were the model's argmax under teacher forcing."""
    if not hits:
        raise ValueError("token accuracy of an empty target")
    return sum(bool(h) for h in hits) / len(hits)


def unchanged(before: Sequence[int], after: Sequence[int]) -> bool:
    """Whether the teacher-forced top-1 tokens of an answer are identical before and after."""
    if len(before) != len(after):
        raise ValueError(f"top-1 sequences of different lengths: {len(before)} vs {len(after)}")
    return tuple(before) == tuple(after)


# ---- exact match by generation ---------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, Unicode NFKC, punctuation removed, white space collapsed and stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _PUNCT.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def starts_with_answer(generated: str, answers: str | Iterable[str]) -> bool:
    """Whether ``generated`` begins with one of ``answers`` after normalisation, ending at a word
    boundary (" Parisian" does not match "Paris"; " Paris, France" does)."""
    if isinstance(answers, str):
        answers = [answers]
    text = normalize_answer(generated)
    for answer in answers:
        norm = normalize_answer(answer)
        if norm and (text == norm or text.startswith(norm + " ")):
            return True
    return False


# ---- fluency ---------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Word and punctuation tokens (a dependency-free stand-in for NLTK's word tokenizer)."""
    return _WORDS.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency of one text: mean over n of weight_n × entropy (bits) of its n-gram
    frequencies. A text shorter than n words contributes 0 for that n."""
    tokens = words(text)
    terms = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(weight * entropy)
    return sum(terms) / len(terms)


def fluency(texts: Sequence[str]) -> float | None:
    """Mean :func:`ngram_entropy` over generated texts (``None`` for no texts)."""
    return mean(ngram_entropy(t) for t in texts)
