"""The residual stream, layer by layer: record it once, then resume the forward pass from any layer.

An intervention at layer ``l`` leaves layers ``0..l-1`` exactly as they were, so methods that try
many interventions (causal tracing restores one state at every (token, layer); an optimised value
vector is injected at one layer) need only run the layers above it. :func:`record_stream` runs the
model once and keeps the input of every decoder layer plus the arguments the model passed to each
layer (rotary position embeddings, masks, position ids); :func:`run_layers` then feeds any hidden
states through layers ``start..stop-1`` by calling those same layer modules with those same
arguments. Hooks installed on the model (e.g. :func:`lmscalpel.runtime.hooks.edit_outputs`) are active
during the replay, since the layer modules are called as usual.

Nothing here names an architecture: layers come from the adapter, and their extra arguments are
whatever the model itself passed. :func:`check_replay` verifies the replay against the model's own
forward pass, so an architecture whose layers need something else fails loudly, not silently.

    rec = record_stream(lm, input_ids)                  # rec.states[l]: input of layer l
    out = run_layers(lm, rec, rec.states[12], start=12) # output of the last layer
    logits = final_logits(lm, out[:, -1])

A stream can also cover only the last tokens of a sequence, given the key/value cache of the
tokens before them (``record_stream(..., past=prefix)``): an intervention at token ``t`` leaves
tokens before ``t`` untouched, so only tokens ``t..`` need recomputing, with the cached keys and
values of the others (:func:`kv_cache` builds such a cache).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache

from lmscalpel.models.adapter import first_tensor
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import capture


class ReplayMismatchError(RuntimeError):
    """Resuming the forward pass from a layer does not reproduce the model's own forward pass."""


KeyValues = tuple[torch.Tensor, torch.Tensor]
"""One layer's attention keys and values, each (batch, kv_heads, seq, head_dim)."""


@dataclass
class ResidualStream:
    """One forward pass, layer by layer.

    ``states[l]`` (batch, seq, d) is the input of layer ``l`` and ``states[num_layers]`` the output
    of the last layer (before the final norm), so ``states[l + 1]`` is "the hidden state after
    layer l". ``calls[l]`` holds the positional arguments after the hidden states and the keyword
    arguments layer ``l`` was called with; they are recorded from a one-row batch and broadcast
    over any batch size; the key/value cache argument is left out and supplied at replay time.
    ``logits`` (batch, vocab) are the model's logits at the last position. ``kv[l]``, when asked
    for, are layer ``l``'s keys and values at every position. ``prefix`` is the number of earlier
    tokens the stream continues (their keys and values must be passed to :func:`run_layers`).
    """

    states: list[torch.Tensor]
    calls: list[tuple[tuple, dict]]
    logits: torch.Tensor
    kv: list[KeyValues] | None = None
    prefix: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.calls)


class _Past:
    """Stands in a recorded layer call for the key/value cache, which is supplied at replay."""


_PAST = _Past()


def _replayable(value: object) -> object:
    return _PAST if isinstance(value, Cache) else value


def _with_past(value: object, past: Cache | None) -> object:
    return past if value is _PAST else value


def kv_cache(lm: LoadedModel, kv: dict[int, KeyValues] | Sequence[KeyValues]) -> Cache:
    """A key/value cache of ``lm`` holding ``kv[l]`` for layer ``l`` (a mapping may leave layers
    out: those no replayed layer reads)."""
    cache = DynamicCache(config=lm.model.config)
    items = kv.items() if isinstance(kv, dict) else enumerate(kv)
    for layer, (keys, values) in items:
        cache.update(keys, values, layer)
    return cache


def record_stream(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    *,
    past: Sequence[KeyValues] | None = None,
    keep_kv: bool = False,
) -> ResidualStream:
    """Run ``input_ids`` (batch, seq) without padding and record the residual stream.

    Hooks already installed on the model (e.g. noise added to the embeddings) act as usual, so the
    recorded states are those of the intervened run. The layer arguments are recorded from a
    separate pass over the first row alone when ``batch > 1`` would make them batch-shaped.

    With ``past`` (every layer's keys and values of earlier tokens) the stream covers only
    ``input_ids``, which continue those tokens. ``keep_kv`` keeps every layer's keys and values
    in ``kv`` (left ``None`` where the model's cache does not hold every position, e.g. a
    sliding window that the sequence outgrew).
    """
    a = lm.adapter
    names = [a.layer_name(layer) for layer in range(a.num_layers)]
    calls: list[tuple[tuple, dict]] = [((), {})] * a.num_layers
    handles = []

    def make_pre_hook(index: int):
        def hook(module, args, kwargs):
            rest = tuple(_replayable(v) for v in args[1:])
            kw = {k: _replayable(v) for k, v in kwargs.items()}
            calls[index] = (rest, kw)

        return hook

    kwargs = {_cache_argument(a.body): kv_cache(lm, past)} if past is not None else {}
    try:
        for index, name in enumerate(names):
            module = lm.model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(make_pre_hook(index), with_kwargs=True))
        with capture(lm.model, names, inputs=True) as seen:
            out = a.body(input_ids=input_ids, use_cache=keep_kv or past is not None, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    states = [seen[name].input for name in names] + [seen[names[-1]].output]
    logits = a.logits(out.last_hidden_state[:, -1])
    if input_ids.shape[0] > 1 and _batch_shaped(calls, input_ids.shape[0]):
        first_past = None if past is None else [(k[:1], v[:1]) for k, v in past]
        calls = record_stream(lm, input_ids[:1], past=first_past).calls
    prefix = 0 if past is None else past[0][0].shape[-2]
    kv = _all_positions(out, a.num_layers, prefix + input_ids.shape[1]) if keep_kv else None
    return ResidualStream(states=states, calls=calls, logits=logits, kv=kv, prefix=prefix)


def _cache_argument(body: torch.nn.Module) -> str:
    """The name under which this transformers version's models take a key/value cache."""
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _all_positions(out: object, num_layers: int, length: int) -> list[KeyValues] | None:
    """Every layer's keys and values from a forward pass's cache, if it holds all ``length``
    positions."""
    cache = next(
        (v for v in (getattr(out, n, None) for n in ("cache", "past_key_values")) if v is not None),
        None,
    )
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, Cache) or layers is None or len(layers) != num_layers:
        return None
    kv = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    if any(not isinstance(k, torch.Tensor) or k.shape[-2] != length for k, _ in kv):
        return None
    return kv


def _batch_shaped(calls: list[tuple[tuple, dict]], batch: int) -> bool:
    def shaped(value: object) -> bool:
        if isinstance(value, torch.Tensor):
            return value.dim() > 0 and value.shape[0] == batch
        if isinstance(value, (tuple, list)):
            return any(shaped(v) for v in value)
        return False

    return any(shaped(v) for rest, kw in calls for v in (*rest, *kw.values()))


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
    recorded on (positions and masks come from it); the batch size is free. A stream recorded
    after a prefix needs ``past``, that prefix's key/value cache with one row per batch row; it
    is consumed (the layers append to it).
    """
    a = lm.adapter
    stop = a.num_layers if stop is None else stop
    if not 0 <= start <= stop <= a.num_layers:
        raise IndexError(f"layers {start}..{stop} out of range 0..{a.num_layers}")
    if stream.prefix and past is None:
        raise ValueError(f"this stream continues {stream.prefix} tokens: pass their cache as past")
    for layer in range(start, stop):
        rest, kwargs = stream.calls[layer]
        rest = tuple(_with_past(v, past) for v in rest)
        kwargs = {k: _with_past(v, past) for k, v in kwargs.items()}
        hidden = first_tensor(a.layer(layer)(hidden, *rest, **kwargs))
    return hidden


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
            f"resuming {lm.name} ({lm.model_type}) layer by layer differs from its forward pass "
            f"(relative error {error:.2e}); its decoder layers need arguments that were not "
            "recorded"
        )
