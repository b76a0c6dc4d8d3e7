"""Where each model's causal-tracing aggregate put the MLP peak: ROME's default edit layer.

Meng et al. (2022) edit the MLP whose restoration at the last subject token brings the answer
back most (the peak of the window-averaged MLP curve of the aggregate over known facts). This
module keeps that layer per model, keyed by the weights' fingerprint:

* ``MEASURED``: peaks measured for this project and shipped with it (the embedded model's, from
  the 100-fact aggregate reported in ``docs/causal_tracing.md``);
* the user's own aggregates: ``lmscalpel trace --known ...`` records its peak under
  ``$LMSCALPEL_HOME/tracing/peaks.json`` (see :func:`record_peak`), and that wins over a shipped
  one, being a measurement on the user's own settings.

ROME asks :func:`traced_peak` when its config names no layer; a model never traced falls back to
its family's default depth.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from lmscalpel.core.files import atomic_write_json
from lmscalpel.core.paths import lmscalpel_home

log = logging.getLogger(__name__)

#: Fewer facts than this give too noisy a peak to become a default (a smoke run, a test).
MIN_FACTS = 20


@dataclass(frozen=True)
class TracedPeak:
    """The layer where the mean MLP indirect effect at the last subject token is largest."""

    layer: int
    facts: int
    window: int
    model: str
    source: str


MEASURED: dict[str, TracedPeak] = {
    # SmolLM2-135M-Instruct (embedded, Q4_1 dequantized): 100 known facts, window 10,
    # float32; 75 % of bootstrap resamples pick layer 4, the rest layer 5.
    "fe072e9ea3f8cab6": TracedPeak(
        layer=4, facts=100, window=10, model="smollm2-135m", source="docs/causal_tracing.md"
    ),
}


def _recorded_file() -> Path:
    return lmscalpel_home() / "tracing" / "peaks.json"


def _recorded() -> dict[str, TracedPeak]:
    path = _recorded_file()
    if not path.is_file():
        return {}
    try:
        return {fp: TracedPeak(**entry) for fp, entry in json.loads(path.read_text()).items()}
    except (ValueError, TypeError) as error:
        log.warning("ignoring unreadable %s (%s)", path, error)
        return {}


def traced_peak(fingerprint: str) -> TracedPeak | None:
    """The model's traced MLP peak: the user's own aggregate if recorded, else a shipped one."""
    return _recorded().get(fingerprint) or MEASURED.get(fingerprint)


def record_peak(summary: dict) -> TracedPeak | None:
    """Keep an aggregate's MLP peak as its model's default edit layer; returns what was kept.

    Aggregates of fewer than :data:`MIN_FACTS` facts, or without the MLP kind, are not kept.
    """
    if "mlp_peak_layer" not in summary or summary["facts_traced"] < MIN_FACTS:
        return None
    peak = TracedPeak(
        layer=int(summary["mlp_peak_layer"]),
        facts=int(summary["facts_traced"]),
        window=int(summary["window"]),
        model=str(summary["model"]),
        source="lmscalpel trace --known",
    )
    table = {fp: asdict(p) for fp, p in _recorded().items()}
    table[summary["fingerprint"]] = asdict(peak)
    atomic_write_json(_recorded_file(), table)
    return peak
