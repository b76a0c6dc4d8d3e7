"""Key/value caches: the only module that speaks transformers' cache API.

Attention at position ``t`` reads the keys and values of every position ``<= t``, and those of a
position depend only on the tokens up to it. So columns that several passes share — a prefix
common to every row, the columns before an injection point, the tokens before a restored one —
can run once, keep their keys and values, and every later pass runs only the columns after them.
That trick lives here once (:func:`run_prefix`, :func:`run_after`); its clients are scoring's
shared prefix, ROME's anchored batches and the recorded residual stream.

Transformers has changed how a cache is passed (``past_key_values=``, now ``cache=``), what the
output calls it, and how a cache stores its layers; only this module knows.

    prefix = run_prefix(lm, ids[:, :p], mask[:, :p])          # once
    out = run_after(lm, prefix, ids[:, p:], mask)             # any number of times
    out.hidden                                                 # (B, S - p, d), final norm applied
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import cache_utils
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from lmscalpel.models.loaded import LoadedModel

__all__ = [
    "BodyOutput",
    "Cache",
    "KeyValues",
    "Prefix",
    "cache_fits",
    "cache_kv",
    "new_cache",
    "run_after",
    "run_body",
    "run_prefix",
]

KeyValues = tuple[torch.Tensor, torch.Tensor]
"""One layer's attention keys and values, each (batch, kv_heads, seq, head_dim)."""


@dataclass
class BodyOutput:
    """One pass of the transformer body: ``hidden`` (B, S, d), the final normalised states (the
    LM head's input), and the key/value ``cache`` after it (``None`` without ``use_cache``)."""

    hidden: torch.Tensor
    cache: Cache | None = None


_KEYWORD: dict[type, str] = {}


def _cache_keyword(body: nn.Module) -> str:
    """The name under which this transformers version's models take a key/value cache."""
    kind = type(body)
    if kind not in _KEYWORD:
        parameters = inspect.signature(body.forward).parameters
        _KEYWORD[kind] = "cache" if "cache" in parameters else "past_key_values"
    return _KEYWORD[kind]


def run_body(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    cache: Cache | None = None,
    use_cache: bool = False,
) -> BodyOutput:
    """Run the transformer body (no LM head) on ``input_ids`` (B, S).

    ``cache`` holds the keys and values of earlier columns (it is extended by this pass); with it,
    or with ``use_cache``, the output carries the cache after the pass. ``attention_mask`` then
    covers the earlier columns too (B, P + S), and ``position_ids`` (B, S) default to the
    positions after the cached ones. Hooks and :func:`lmscalpel.runtime.layers.from_layer` act
    as usual.
    """
    kwargs: dict[str, object] = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    body = lm.adapter.body
    if cache is not None:
        kwargs[_cache_keyword(body)] = cache
    use_cache = use_cache or cache is not None
    out = body(**kwargs, use_cache=use_cache)
    kept = None
    if use_cache:
        kept = next(
            (
                v
                for v in (getattr(out, n, None) for n in ("cache", "past_key_values"))
                if v is not None
            ),
            None,
        )
    return BodyOutput(out.last_hidden_state, kept)


def _hold(layer: object, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
    """Put the keys/values of ``length`` earlier positions into an empty cache layer as one
    ``update`` would, without copying them (the layer concatenates new columns into fresh
    tensors, so they are never changed). A sliding-window layer may be given only its last
    ``window - 1`` positions, as it keeps them."""
    if type(layer) is DynamicLayer:  # what lazy_initialization sets, without its empty tensors
        layer.device, layer.is_initialized = keys.device, True
        layer.keys, layer.values = keys, values
    elif type(layer) is DynamicSlidingWindowLayer and not layer.record_past:
        layer.lazy_initialization(keys, values)
        layer.cumulative_length = length
        keep = layer.sliding_window - 1
        layer.keys, layer.values = keys[:, :, -keep:, :], values[:, :, -keep:, :]
    else:
        layer.update(keys, values)


_LAYER_MAKERS: weakref.WeakKeyDictionary[nn.Module, list[Callable[[], object]] | None] = (
    weakref.WeakKeyDictionary()
)


def _empty_cache(lm: LoadedModel) -> Cache:
    """``DynamicCache(config=...)``, with the per-layer cache types worked out once per model
    (reading them from the config costs more than a small model's layer)."""
    model = lm.model
    if model not in _LAYER_MAKERS:
        makers = None
        mapping = getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", None)
        layer_types = getattr(cache_utils, "get_layer_types_and_kwargs", None)
        if mapping is not None and layer_types is not None:
            config = model.config.get_text_config(decoder=True)
            kinds, kwargs = layer_types(config)
            makers = [lambda k=k, kw=kw: mapping[k](**kw) for k, kw in zip(kinds, kwargs)]
        _LAYER_MAKERS[model] = makers
    makers = _LAYER_MAKERS[model]
    if not makers:
        return DynamicCache(config=model.config)
    cache = DynamicCache.__new__(DynamicCache)
    Cache.__init__(cache, layers=[make() for make in makers])
    return cache


def new_cache(
    lm: LoadedModel,
    kv: Mapping[int, KeyValues] | Sequence[KeyValues] | None = None,
    *,
    length: int | None = None,
) -> Cache:
    """A key/value cache for ``lm``, empty or holding ``kv[l]`` for layer ``l``, the keys and
    values of ``length`` earlier positions (default: as many as the longest ``kv`` entry holds).

    A mapping may leave out layers that will not run (those below
    :func:`~lmscalpel.runtime.layers.from_layer`'s layer, or above a stopped pass): they hold
    placeholders of the same length, all NaN and free of memory, so that the model sizes its
    masks and positions right, and a layer that did read one would give NaN, never a silently
    wrong number.
    """
    cache = _empty_cache(lm)
    if not kv:
        return cache
    items = dict(kv.items() if isinstance(kv, Mapping) else enumerate(kv))
    keys, values = max(items.values(), key=lambda pair: pair[0].shape[-2])
    length = keys.shape[-2] if length is None else length
    shape_k, shape_v = (
        (*keys.shape[:2], length, keys.shape[3]),
        (*values.shape[:2], length, values.shape[3]),
    )
    blank_k = torch.full((), float("nan"), dtype=keys.dtype, device=keys.device).expand(shape_k)
    blank_v = torch.full((), float("nan"), dtype=values.dtype, device=values.device).expand(shape_v)
    for index, layer in enumerate(cache.layers):
        given = items.get(index, (blank_k, blank_v))
        _hold(layer, *given, length)
    return cache


def _held(cache: Cache) -> list[KeyValues]:
    """The keys and values each layer of ``cache`` holds (a sliding layer: its last positions)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_kv(cache: Cache | None, length: int) -> list[KeyValues] | None:
    """Every layer's keys and values in ``cache``, if each layer holds all ``length`` positions
    (``None`` otherwise, e.g. when a sliding window dropped early ones)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, Cache) or not layers:
        return None
    kv = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    if any(not isinstance(k, torch.Tensor) or k.shape[-2] != length for k, _ in kv):
        return None
    return kv


def cache_fits(lm: LoadedModel, width: int) -> bool:
    """Whether a cache of ``lm`` holds all of ``width`` columns: a sliding window keeps only its
    last ``window - 1`` (the window comes from the adapter)."""
    window = lm.adapter.sliding_window
    return not window or width < window


@dataclass
class Prefix:
    """Columns run once for many later passes: the keys and values every layer keeps of them
    (``kv``; a sliding-window layer keeps only the last ones) and their final normalised hidden
    states ``hidden`` (B, P, d)."""

    kv: list[KeyValues]
    hidden: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.hidden.shape[1])


def run_prefix(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> Prefix:
    """Run the first columns ``input_ids`` (B, P) and keep what later columns read of them."""
    out = run_body(lm, input_ids, attention_mask, position_ids, use_cache=True)
    return Prefix(_held(out.cache), out.hidden)


def run_after(
    lm: LoadedModel,
    prefix: Prefix,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    rows: int | None = None,
) -> BodyOutput:
    """Run the columns ``input_ids`` (B, S) that follow ``prefix``, reading its keys and values.

    ``attention_mask`` covers the prefix and these columns (B, P + S); ``position_ids`` (B, S)
    default to ``P..P+S-1``. With ``rows``, the prefix is one row shared by all ``rows`` rows of
    ``input_ids``. Equal to one pass over all columns, to float precision; differentiable in
    whatever the caller's hooks inject into these columns. ``prefix`` is not changed.
    """
    cache = new_cache(lm, prefix.kv, length=prefix.length)
    if rows is not None and rows != prefix.hidden.shape[0]:
        if prefix.hidden.shape[0] != 1:
            raise ValueError(f"a prefix of {prefix.hidden.shape[0]} rows cannot serve {rows} rows")
        cache.batch_repeat_interleave(rows)  # row r becomes rows r*n .. r*n+n-1
    return run_body(lm, input_ids, attention_mask, position_ids, cache=cache)
