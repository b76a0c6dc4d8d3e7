"""What a user sees after an edit: the model's answers before and after, side by side.

:func:`probe` measures a set of prompts (greedy answer, log-probabilities of the new and the true
target); :func:`before_after_table` renders two such measurements as a rich table. The CLI, the
demo and notebooks all use these, so every place shows an edit the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from lmscalpel.core.requests import EditRequest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.scoring import generate, score_targets


@dataclass(frozen=True)
class ProbePrompt:
    """A prompt to watch, what role it plays, and which answers to score."""

    role: str  # "edit", "paraphrase", "unrelated", "portability"
    prompt: str
    target_new: str | None
    target_true: str | None


@dataclass(frozen=True)
class ProbeResult:
    prompt: ProbePrompt
    answer: str
    logprob_new: float | None
    logprob_true: float | None


def probes_for(request: EditRequest) -> list[ProbePrompt]:
    """The prompts that show an edit: the prompt, its paraphrases, locality and portability probes."""
    probes = [ProbePrompt("edit", request.prompt, request.target_new, request.target_true)]
    probes += [
        ProbePrompt("paraphrase", p, request.target_new, request.target_true)
        for p in request.paraphrases
    ]
    probes += [ProbePrompt("unrelated", p.prompt, None, p.answer) for p in request.locality]
    probes += [
        ProbePrompt(f"portability:{p.kind}", p.prompt, p.answer, p.answer_before)
        for p in request.portability
    ]
    return probes


def probe(
    lm: LoadedModel, probes: Sequence[ProbePrompt], max_new_tokens: int = 12
) -> list[ProbeResult]:
    """Greedy answers and target log-probabilities (mean per token) for each probe."""
    answers = generate(lm, [p.prompt for p in probes], max_new_tokens=max_new_tokens)
    pairs = [
        (i, p.prompt, t)
        for i, p in enumerate(probes)
        for t in (p.target_new, p.target_true)
        if t is not None
    ]
    scores = score_targets(lm, [q for _, q, _ in pairs], [t for _, _, t in pairs])
    by_key = {(i, t): s.mean_logprob for (i, _, t), s in zip(pairs, scores)}
    return [
        ProbeResult(
            p,
            a.strip().split("\n")[0],
            by_key.get((i, p.target_new)) if p.target_new else None,
            by_key.get((i, p.target_true)) if p.target_true else None,
        )
        for i, (p, a) in enumerate(zip(probes, answers))
    ]


def _lp(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def before_after_table(
    before: Sequence[ProbeResult], after: Sequence[ProbeResult], title: str = ""
) -> Table:
    """A table: role, prompt, answer before, answer after, log P(new) and log P(true) before→after."""
    table = Table(title=title, show_lines=True)
    for column in ("role", "prompt", "answer before", "answer after", "log P(new)", "log P(true)"):
        table.add_column(column, overflow="fold")
    for b, a in zip(before, after):
        table.add_row(
            b.prompt.role,
            b.prompt.prompt,
            b.answer,
            a.answer,
            f"{_lp(b.logprob_new)} → {_lp(a.logprob_new)}" if b.logprob_new is not None else "",
            f"{_lp(b.logprob_true)} → {_lp(a.logprob_true)}" if b.logprob_true is not None else "",
        )
    return table
