"""Causal traces written to a folder: arrays, JSON and the paper's pictures.

What ``lmscalpel trace`` does, callable from Python (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", Figures 1 and 2)::

    result = trace(lm, prompt, subject)
    files = save_trace(result, "trace/")               # trace.json, .safetensors, PNG heatmaps
    known = trace_known_facts(lm, "known_1000.json", "trace-known/", n=100)
    known.summary["mlp_peak_layer"], known.peaks, known.files

Neither records anything outside the folder: keeping an aggregate's MLP peak as ROME's default
edit layer is a separate, explicit step (:func:`lmscalpel.mechanics.peaks.record_peak`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmscalpel.locate.aggregate import KindPeak, aggregate, kind_peaks, load_knowns
from lmscalpel.locate.plots import plot_layer_curves, plot_token_classes, plot_trace, plot_traces
from lmscalpel.locate.result import TraceResult
from lmscalpel.models.loaded import LoadedModel


def save_trace(result: TraceResult, folder: str | os.PathLike) -> list[Path]:
    """Write one trace to ``folder``: ``trace.json`` and ``trace.safetensors``
    (:meth:`TraceResult.save`), a heatmap ``trace_<kind>.png`` per kind and, for several kinds,
    all of them side by side in ``trace.png``. Returns the files written."""
    folder = Path(folder)
    files = result.save(folder)
    files += [plot_trace(result, kind, folder / f"trace_{kind}.png") for kind in result.kinds]
    if len(result.kinds) > 1:
        files.append(plot_traces(result, folder / "trace.png"))
    return files


@dataclass(frozen=True)
class Strongest:
    """A trace's strongest restoration of one kind: the ``token`` index and ``layer`` of the
    largest indirect effect, P(answer) restored there and the effect (restored − corrupted)."""

    kind: str
    token: int
    layer: int
    restored: float
    effect: float


def strongest_restorations(result: TraceResult) -> list[Strongest]:
    """Per traced kind, where restoring a clean state brings the answer back most."""
    rows = []
    for kind in result.kinds:
        token, layer = result.strongest(kind)
        rows.append(
            Strongest(
                kind,
                token,
                layer,
                float(result.restored[kind][token, layer]),
                float(result.indirect_effect(kind)[token, layer]),
            )
        )
    return rows


@dataclass
class KnownFactsTrace:
    """An aggregate over known facts written to a folder: ``summary`` (as returned by
    :func:`~lmscalpel.locate.aggregate.aggregate`, also in ``summary.json``), each kind's peak,
    the files written and the figures' title."""

    summary: dict
    peaks: list[KindPeak]
    files: list[Path]
    title: str

    @property
    def mlp_peak_layer(self) -> int | None:
        """The layer where the mean MLP effect at the last subject token peaks (``None`` when
        the MLP was not traced): the layer ROME would edit if this aggregate were recorded."""
        return self.summary.get("mlp_peak_layer")


def trace_known_facts(
    lm: LoadedModel,
    known: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    n: int = 100,
    tokens: str = "last-subject",
    progress: bool = True,
    **options,
) -> KnownFactsTrace:
    """Trace the first ``n`` facts of the known-facts JSON ``known`` that the model gets right,
    average them (:func:`~lmscalpel.locate.aggregate.aggregate`, which resumes from the folder's
    ``facts.jsonl``; ``options``: its ``kinds``, ``samples``, ``window``, ``noise``, ``seed``,
    ``precision``) and write ``summary.json``, ``last_subject_token.png`` (the mean effect per
    layer at the last subject token) and, unless only the last subject token was traced,
    ``token_classes.png`` (Figure 2's layout) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = aggregate(
        lm, load_knowns(known), n=n, tokens=tokens, out_dir=folder, progress=progress, **options
    )
    curves = summary["last_subject_token"]
    facts = summary["facts_traced"]
    title = f"{lm.name}: average indirect effect at the last subject token, {facts} known facts"
    files = [
        folder / "summary.json",
        plot_layer_curves(
            {kind: curve["mean"] for kind, curve in curves.items()},
            {kind: curve["stderr"] for kind, curve in curves.items()},
            folder / "last_subject_token.png",
            title=title,
            window=summary["window"],
            peak=summary.get("mlp_peak_layer"),
        ),
    ]
    if tokens != "last-subject":
        files.append(
            plot_token_classes(
                summary["token_classes"],
                folder / "token_classes.png",
                title=f"{lm.name}: {facts} known facts",
                window=summary["window"],
            )
        )
    return KnownFactsTrace(summary=summary, peaks=kind_peaks(summary), files=files, title=title)
