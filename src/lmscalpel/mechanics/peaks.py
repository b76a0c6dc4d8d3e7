"""Which layer ROME edits on a model, and why: the causal-tracing MLP peak or a default depth.

Meng et al. (2022) edit the MLP whose restoration at the last subject token brings the answer
back most (the peak of the window-averaged MLP curve of the aggregate over known facts). This
module keeps that layer per model, keyed by the weights' fingerprint:

* ``MEASURED``: peaks measured for this project and shipped with it (the embedded model's, from
  the 100-fact aggregate reported in ``docs/causal_tracing.md``);
* the user's own aggregates, recorded only on request (``lmscalpel trace --known ...
  --record-peak``, or :func:`record_peak` from Python) in ``$LMSCALPEL_HOME/tracing/peaks.json``
  (:func:`peaks_file`); a recorded peak wins over a shipped one, being a measurement on the
  user's own settings.

:func:`choose_edit_layer` is the one place that decides: an explicit config layer, else the
recorded peak, else the shipped one, else the family's default depth. It returns a
:class:`LayerChoice` that says which of the four applied, so ``lmscalpel info`` can show it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from lmscalpel.core.clock import utc_now
from lmscalpel.core.files import atomic_write_json
from lmscalpel.core.paths import lmscalpel_home

log = logging.getLogger(__name__)

#: Fewer facts than this give too noisy a peak to become a default (a smoke run, a test).
MIN_FACTS = 20


@dataclass(frozen=True)
class TracedPeak:
    """The layer where the mean MLP indirect effect at the last subject token is largest, over
    ``facts`` known facts traced with a restoration ``window``; ``source`` says where it was
    measured and ``recorded`` when (ISO 8601, UTC; empty for the peaks shipped with lmscalpel)."""

    layer: int
    facts: int
    window: int
    model: str
    source: str
    recorded: str = ""


MEASURED: dict[str, TracedPeak] = {
    # SmolLM2-135M-Instruct (embedded, Q4_1 dequantized): 100 known facts, window 10,
    # float32; 75 % of bootstrap resamples pick layer 4, the rest layer 5.
    "fe072e9ea3f8cab6": TracedPeak(
        layer=4, facts=100, window=10, model="smollm2-135m", source="docs/causal_tracing.md"
    ),
}

LayerReason = Literal["config", "recorded", "shipped", "depth"]


@dataclass(frozen=True)
class LayerChoice:
    """The layer ROME edits and why.

    ``reason``: ``"config"`` (the config names the layer), ``"recorded"`` (the MLP peak of the
    user's own aggregate, :func:`record_peak`), ``"shipped"`` (a peak in :data:`MEASURED`) or
    ``"depth"`` (never traced: ``default_depth`` of the depth). ``peak`` is the traced peak used,
    if any.
    """

    layer: int
    reason: LayerReason
    peak: TracedPeak | None = None
    default_depth: float | None = None

    def explain(self) -> str:
        """One line saying why this layer, e.g. for ``lmscalpel info``."""
        if self.reason == "config":
            return "set explicitly in the config (layer)"
        if self.reason == "depth":
            return (
                f"the family's default depth ({self.default_depth:g} of the layers); "
                "this model's causal-tracing peak was never recorded"
            )
        peak = self.peak
        assert peak is not None
        facts = f"{peak.facts} known facts, window {peak.window}"
        if self.reason == "recorded":
            return (
                f"MLP peak of your causal-tracing aggregate ({facts}), recorded {peak.recorded} "
                f"by {peak.source}, in {peaks_file()}"
            )
        return f"MLP peak of the causal-tracing aggregate shipped with lmscalpel ({facts}; {peak.source})"


def peaks_file() -> Path:
    """Where the user's recorded peaks live: ``$LMSCALPEL_HOME/tracing/peaks.json``."""
    return lmscalpel_home() / "tracing" / "peaks.json"


def recorded_peaks() -> dict[str, TracedPeak]:
    """The peaks recorded with :func:`record_peak`, by weight fingerprint (an unreadable file
    counts as none, with a warning)."""
    path = peaks_file()
    if not path.is_file():
        return {}
    try:
        return {fp: TracedPeak(**entry) for fp, entry in json.loads(path.read_text()).items()}
    except (ValueError, TypeError) as error:
        log.warning("ignoring unreadable %s (%s)", path, error)
        return {}


def _traced(fingerprint: str) -> tuple[TracedPeak | None, LayerReason]:
    """The model's traced MLP peak and where it comes from: the user's own aggregate if
    recorded, else a shipped one (``None`` if neither)."""
    recorded = recorded_peaks().get(fingerprint)
    return (recorded, "recorded") if recorded else (MEASURED.get(fingerprint), "shipped")


def traced_peak(fingerprint: str) -> TracedPeak | None:
    """The model's traced MLP peak: the user's own aggregate if recorded, else a shipped one."""
    return _traced(fingerprint)[0]


def choose_edit_layer(
    num_layers: int,
    fingerprint: str | None,
    *,
    configured: int | None,
    depth_layer: int,
    default_depth: float | None = None,
) -> LayerChoice:
    """Decide ROME's edit layer on a model of ``num_layers`` layers with weight ``fingerprint``.

    ``configured``: the config's layer, already resolved to an index (``None``: unset);
    ``depth_layer``: the index that the family's ``default_depth`` (kept for the explanation)
    gives. Order: the configured layer; the traced peak (recorded, else shipped) when it exists
    and fits the model; the depth layer.
    """
    if configured is not None:
        return LayerChoice(configured, "config")
    if fingerprint is not None:
        peak, reason = _traced(fingerprint)
        if peak is not None and peak.layer < num_layers:
            return LayerChoice(peak.layer, reason, peak=peak)
    return LayerChoice(depth_layer, "depth", default_depth=default_depth)


def record_peak(summary: dict, *, source: str = "lmscalpel trace --known") -> TracedPeak | None:
    """Keep an aggregate's MLP peak as its model's default ROME edit layer; returns what was
    kept. Nothing calls this implicitly: tracing records a peak only when asked to.

    ``summary`` is :func:`lmscalpel.locate.aggregate.aggregate`'s return value. Aggregates of
    fewer than :data:`MIN_FACTS` facts, or without the MLP kind, are not kept (``None``).
    """
    if "mlp_peak_layer" not in summary or summary["facts_traced"] < MIN_FACTS:
        return None
    peak = TracedPeak(
        layer=int(summary["mlp_peak_layer"]),
        facts=int(summary["facts_traced"]),
        window=int(summary["window"]),
        model=str(summary["model"]),
        source=source,
        recorded=utc_now(),
    )
    table = {fp: asdict(p) for fp, p in recorded_peaks().items()}
    table[summary["fingerprint"]] = asdict(peak)
    atomic_write_json(peaks_file(), table)
    log.info("recorded layer %d as ROME's default edit layer for %s", peak.layer, peak.model)
    return peak


def edit_range(
    num_layers: int,
    fingerprint: str | None,
    *,
    span: int,
    depth_layer: int,
    default_depth: float | None = None,
) -> tuple[list[int], LayerChoice]:
    """MEMIT's (and AlphaEdit's) layers on a model of ``num_layers`` layers: ``span`` consecutive
    MLPs starting at the layer :func:`choose_edit_layer` picks (the traced MLP peak, recorded or
    shipped, else ``depth_layer``), shifted down where the model has too few layers above it
    (the last layer is never in the range: the target hidden state at its output, at the
    subject's last token, would reach no later token).

    On the embedded SmolLM2-135M the peak is layer 4 (75 % of bootstrap resamples; the rest
    pick 5), and docs/rome.md's sweep edits layers 4-8 equally well, so the default span of 5
    edits layers 4-8: the peak and the layers just above it, where the subject's last token
    still carries the fact (Meng et al. 2023 edit GPT-J's layers 3-8 around its peak).
    """
    if span < 1:
        raise ValueError(f"a layer range needs span >= 1, got {span}")
    choice = choose_edit_layer(
        num_layers,
        fingerprint,
        configured=None,
        depth_layer=depth_layer,
        default_depth=default_depth,
    )
    usable = max(1, num_layers - 1)  # the top layer's output at the subject reaches no later token
    span = min(span, usable)
    first = max(0, min(choice.layer, usable - span))
    return list(range(first, first + span)), choice
