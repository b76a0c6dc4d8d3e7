"""Locating knowledge: causal tracing (Meng et al. 2022) and its plots and aggregates."""

from lmscalpel.locate.noise import default_knowns_path, embedding_std, noise_level
from lmscalpel.locate.tracing import (
    KINDS,
    TraceResult,
    TracingError,
    default_window,
    trace,
    window_layers,
)

__all__ = [
    "KINDS",
    "TraceResult",
    "TracingError",
    "default_knowns_path",
    "default_window",
    "embedding_std",
    "noise_level",
    "trace",
    "window_layers",
]
