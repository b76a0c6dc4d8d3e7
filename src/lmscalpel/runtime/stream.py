"""The residual stream, layer by layer: record it once, then resume the forward pass from any layer.

An intervention at layer ``l`` leaves layers ``0..l-1`` exactly as they were, so methods that try
many interventions (causal tracing restores one state at every (token, layer); an optimised value
vector is injected at one layer) need only run the layers above it. :func:`record_stream` runs the
model once and keeps the input of every decoder layer; :func:`run_layers` then feeds any hidden
states through layers ``start..stop-1``. It is built on the runtime's parts: the model's own
forward pass runs inside :func:`lmscalpel.runtime.layers.from_layer` (so the layers below ``start``
do not compute) and a :func:`lmscalpel.runtime.hooks.tap` ends it after layer ``stop - 1``. Hooks
installed on the model (e.g. an output-replacing tap) are active during the replay.

Nothing here names an architecture: layers come from the adapter. :func:`check_replay` verifies
the replay against the model's own forward pass, so an architecture on which resuming does not
work fails loudly, not silently.

    rec = record_stream(lm, input_ids)                  # rec.states[l]: input of layer l
    out = run_layers(lm, rec, rec.states[12], start=12) # output of the last layer
    logits = final_logits(lm, out[:, -1])

A stream can also cover only the last tokens of a sequence, given the key/value cache of the
tokens before them (``record_stream(..., past=prefix)``): an intervention at token ``t`` leaves
tokens before ``t`` untouched, so only tokens ``t..`` need recomputing, with the cached keys and
values of the others (:func:`lmscalpel.runtime.kv.new_cache` builds such a cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.runtime.kv import Cache, KeyValues, cache_kv, new_cache, run_body
from lmscalpel.runtime.layers import from_layer

__all__ = [
    "KeyValues",
    "ReplayMismatchError",
    "ResidualStream",
    "check_replay",
    "final_logits",
    "record_stream",
    "run_layers",
]


class ReplayMismatchError(RuntimeError):
    """Resuming the forward pass from a layer does not reproduce the model's own forward pass."""


@dataclass
class ResidualStream:
    """One forward pass, layer by layer.

    ``states[l]`` (batch, seq, d) is the input of layer ``l`` and ``states[num_layers]`` the output
    of the last layer (before the final norm), so ``states[l + 1]`` is "the hidden state after
    layer l". ``input_ids`` (1, seq): the tokens of the first row (a replay runs the model on
    them, broadcast over any batch size, and feeds its hidden states in above the embeddings).
    ``logits`` (batch, vocab) are the model's logits at the last position. ``kv[l]``, when asked
    for, are layer ``l``'s keys and values at every position. ``prefix`` is the number of earlier
    tokens the stream continues (their keys and values must be passed to :func:`run_layers`).
    """

    states: list[torch.Tensor]
    input_ids: torch.Tensor
    logits: torch.Tensor
    kv: list[KeyValues] | None = None
    prefix: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.states) - 1


def record_stream(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    *,
    past: Sequence[KeyValues] | None = None,
    keep_kv: bool = False,
) -> ResidualStream:
    """Run ``input_ids`` (batch, seq) without padding and record the residual stream.

    Hooks already installed on the model (e.g. noise added to the embeddings) act as usual, so the
    recorded states are those of the intervened run.

    With ``past`` (every layer's keys and values of earlier tokens) the stream covers only
    ``input_ids``, which continue those tokens. ``keep_kv`` keeps every layer's keys and values
    in ``kv`` (left ``None`` where the model's cache does not hold every position, e.g. a
    sliding window that the sequence outgrew).
    """
    a = lm.adapter
    names = [a.layer_name(layer) for layer in range(a.num_layers)]
    taps = {name: Tap(input=True) for name in names}
    taps[names[-1]] = Tap(input=True, output=True)
    cache = None if past is None else new_cache(lm, past)
    with tap(lm.model, taps) as seen:
        out = run_body(lm, input_ids, cache=cache, use_cache=keep_kv)
    states = [seen[name].input for name in names] + [seen[names[-1]].output]
    prefix = 0 if past is None else past[0][0].shape[-2]
    kv = cache_kv(out.cache, prefix + input_ids.shape[1]) if keep_kv else None
    return ResidualStream(
        states=states,
        input_ids=input_ids[:1],
        logits=a.logits(out.hidden[:, -1]),
        kv=kv,
        prefix=prefix,
    )


def run_layers(
    lm: LoadedModel,
    stream: ResidualStream,
    hidden: torch.Tensor,
    start: int,
    stop: int | None = None,
    *,
    past: Cache | None = None,
) -> torch.Tensor:
    """Feed ``hidden`` (batch, seq, d), the input of layer ``start``, through layers
    ``start..stop-1`` (default: to the top) and return the last one's output (batch, seq, d).

    ``start == stop`` returns ``hidden`` unchanged. The sequence must be the one ``stream`` was
    recorded on; the batch size is free. A stream recorded after a prefix needs ``past``, that
    prefix's key/value cache with one row per batch row (only the layers run need to hold their
    keys and values, see :func:`lmscalpel.runtime.kv.new_cache`); it is consumed (the layers
    append to it).
    """
    a = lm.adapter
    stop = a.num_layers if stop is None else stop
    if not 0 <= start <= stop <= a.num_layers:
        raise IndexError(f"layers {start}..{stop} out of range 0..{a.num_layers}")
    if stream.prefix and past is None:
        raise ValueError(f"this stream continues {stream.prefix} tokens: pass their cache as past")
    if start == stop:
        return hidden
    last = a.layer_name(stop - 1)
    input_ids = stream.input_ids.expand(hidden.shape[0], -1)
    with (
        from_layer(lm, start, hidden),
        tap(lm.model, {last: Tap(output=True, grad=True)}, stop=True) as seen,
    ):
        run_body(lm, input_ids, cache=past)
    return seen[last].output


def final_logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., vocab) from the last layer's raw output (..., d): final norm, then LM head."""
    return lm.adapter.logits(lm.adapter.final_norm(hidden))


def check_replay(
    lm: LoadedModel,
    stream: ResidualStream,
    *,
    past: Cache | None = None,
    atol: float = 1e-4,
) -> None:
    """Raise :class:`ReplayMismatchError` unless resuming from layer 0 reproduces ``stream``'s
    logits: the guard that makes the replay safe on an unfamiliar architecture. ``past`` (consumed)
    is the prefix cache of a stream that continues a prefix, with one row per row of ``stream``."""
    rows = 1 if past is None else stream.states[0].shape[0]
    out = run_layers(lm, stream, stream.states[0][:rows], 0, past=past)
    replayed = final_logits(lm, out[:, -1]).float()
    expected = stream.logits[:rows].float()
    scale = expected.abs().max().clamp_min(1.0)
    error = float((replayed - expected).abs().max() / scale)
    if error > atol:
        raise ReplayMismatchError(
            f"resuming {lm.name} ({lm.model_type}) from a layer differs from its forward pass "
            f"(relative error {error:.2e}): its decoder layers cannot be skipped as "
            "lmscalpel.runtime.layers.from_layer does"
        )
