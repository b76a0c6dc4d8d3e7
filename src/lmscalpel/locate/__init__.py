"""Locating knowledge: causal tracing (Meng et al. 2022) and its plots and aggregates.

:func:`trace` traces one prompt; :func:`aggregate` averages the traces of the known facts a
model gets right (:func:`load_knowns`), :func:`kind_peaks` names where each kind peaks. Writing
either to a folder with its pictures is :mod:`lmscalpel.locate.outputs` (``save_trace``,
``trace_known_facts``; not imported here, as it loads matplotlib). Nothing here changes ROME's
default layer: that is :func:`lmscalpel.mechanics.peaks.record_peak`, called only on request.
"""

from lmscalpel.locate.aggregate import KindPeak, KnownFact, aggregate, kind_peaks, load_knowns
from lmscalpel.locate.noise import default_knowns_path, embedding_std, noise_level
from lmscalpel.locate.restoration import window_layers
from lmscalpel.locate.result import TraceResult
from lmscalpel.locate.tracing import KINDS, TracingError, default_window, trace

__all__ = [
    "KINDS",
    "KindPeak",
    "KnownFact",
    "TraceResult",
    "TracingError",
    "aggregate",
    "default_knowns_path",
    "default_window",
    "embedding_std",
    "kind_peaks",
    "load_knowns",
    "noise_level",
    "trace",
    "window_layers",
]
