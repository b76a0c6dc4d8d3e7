"""What a user sees after an edit: the model's answers before and after, side by side.

:func:`probe` measures a set of probes (greedy answer, log-probabilities of the new and the true
target); :func:`before_after_table` renders two such measurements as a rich table. The CLI, the
demo and notebooks all use these, so every place shows an edit the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from lmscalpel.core.requests import EditRequest, Probe
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.scoring import generate, score_targets


@dataclass(frozen=True)
class ProbeResult:
    """What the model says for one probe: its greedy answer and the mean per-token
    log-probabilities of the new and the true target (``None`` where the probe has none)."""

    probe: Probe
    answer: str
    logprob_new: float | None
    logprob_true: float | None


def probes_for(request: EditRequest) -> list[Probe]:
    """The prompts that show an edit: the prompt, its paraphrases, locality and portability probes
    (:meth:`~lmscalpel.core.requests.EditRequest.probes`)."""
    return list(request.probes())


def shown_targets(probe: Probe) -> tuple[str | None, str | None]:
    """The (new, true) targets a probe's row shows: a locality probe shows only its answer, as the
    true one; the others show the target wanted after the edit and the one it competes with."""
    if probe.role == "locality":
        return None, probe.wanted
    return probe.wanted, probe.other


def role_label(probe: Probe) -> str:
    """The role column: locality probes are "unrelated", portability ones carry their kind."""
    if probe.role == "locality":
        return "unrelated"
    if probe.role == "portability":
        return f"portability:{probe.kind}"
    return probe.role


def probe(lm: LoadedModel, probes: Sequence[Probe], max_new_tokens: int = 12) -> list[ProbeResult]:
    """Greedy answers and target log-probabilities (mean per token) for each probe."""
    answers = generate(lm, [p.prompt for p in probes], max_new_tokens=max_new_tokens)
    shown = [shown_targets(p) for p in probes]
    pairs = [(i, p.prompt, t) for i, p in enumerate(probes) for t in shown[i] if t is not None]
    scores = score_targets(lm, [q for _, q, _ in pairs], [t for _, _, t in pairs])
    by_key = {(i, t): s.mean_logprob for (i, _, t), s in zip(pairs, scores)}
    return [
        ProbeResult(
            p,
            a.strip().split("\n")[0],
            by_key.get((i, new)) if new else None,
            by_key.get((i, true)) if true else None,
        )
        for i, (p, a, (new, true)) in enumerate(zip(probes, answers, shown))
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
            role_label(b.probe),
            b.probe.prompt,
            b.answer,
            a.answer,
            f"{_lp(b.logprob_new)} → {_lp(a.logprob_new)}" if b.logprob_new is not None else "",
            f"{_lp(b.logprob_true)} → {_lp(a.logprob_true)}" if b.logprob_true is not None else "",
        )
    return table
