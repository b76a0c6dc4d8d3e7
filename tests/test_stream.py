"""Resuming a forward pass from any layer reproduces the model, on every architecture."""

import pytest
import torch

from lmscalpel.runtime.hooks import Tap, add_at_positions, tap
from lmscalpel.runtime.kv import new_cache
from lmscalpel.runtime.stream import (
    ReplayMismatchError,
    check_replay,
    final_logits,
    record_stream,
    run_layers,
)
from lmscalpel.tokens import encode_prompt

PROMPT = "The Eiffel Tower is located in the city of"


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _ids(lm, rows=2):
    return torch.tensor([encode_prompt(lm, PROMPT)]).repeat(rows, 1)


def test_resuming_from_any_layer_matches_the_forward_pass(any_tiny):
    lm, ids = any_tiny, _ids(any_tiny)
    n = lm.adapter.num_layers
    with torch.no_grad():
        expected = lm.model(ids).logits[:, -1]
        stream = record_stream(lm, ids)
        torch.testing.assert_close(stream.logits, expected, atol=1e-5, rtol=0)
        assert len(stream.states) == n + 1 and stream.states[0].shape == (2, ids.shape[1], 32)
        for start in (0, n // 2, n):
            hidden = stream.states[start].repeat(3, 1, 1)  # any batch size
            out = run_layers(lm, stream, hidden, start)
            torch.testing.assert_close(final_logits(lm, out[:2, -1]), expected, atol=1e-5, rtol=0)
        check_replay(lm, stream)
    assert _hook_count(lm.model) == 0


def test_a_suffix_after_cached_keys_and_values_matches_the_forward_pass(any_tiny):
    lm, ids = any_tiny, _ids(any_tiny)
    with torch.no_grad():
        expected = lm.model(ids).logits[:, -1]
        full = record_stream(lm, ids, keep_kv=True)
        assert full.kv is not None and full.kv[0][0].shape[-2] == ids.shape[1]
        t = 3
        prefix = [(k[:, :, :t], v[:, :, :t]) for k, v in full.kv]
        suffix = record_stream(lm, ids[:, t:], past=prefix)
        assert suffix.prefix == t and suffix.states[0].shape[1] == ids.shape[1] - t
        torch.testing.assert_close(suffix.logits, expected, atol=1e-5, rtol=0)
        layer = lm.adapter.num_layers // 2
        out = run_layers(lm, suffix, full.states[layer][:, t:], layer, past=new_cache(lm, prefix))
        torch.testing.assert_close(final_logits(lm, out[:, -1]), expected, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="pass their cache"):
            run_layers(lm, suffix, full.states[layer][:, t:], layer)


def test_check_replay_catches_a_replay_that_differs(tiny):
    with torch.no_grad():
        stream = record_stream(tiny, _ids(tiny, 1))
        stream.logits = stream.logits + 1.0
        with pytest.raises(ReplayMismatchError, match="differs from its forward pass"):
            check_replay(tiny, stream)


def test_layer_ranges_are_checked(tiny):
    with torch.no_grad():
        stream = record_stream(tiny, _ids(tiny, 1))
        same = run_layers(tiny, stream, stream.states[2], 2, 2)
        assert same is stream.states[2]
        with pytest.raises(IndexError):
            run_layers(tiny, stream, stream.states[0], 0, 99)


def test_one_layer_at_a_time_needs_only_that_layers_cache(any_tiny):
    """Causal tracing's wavefront: each step runs one layer over the suffix, with a cache holding
    only that layer's keys and values of the prefix."""
    lm, ids = any_tiny, _ids(any_tiny)
    t = 4
    with torch.no_grad():
        full = record_stream(lm, ids, keep_kv=True)
        suffix = record_stream(
            lm, ids[:, t:], past=[(k[:, :, :t], v[:, :, :t]) for k, v in full.kv]
        )
        hidden = full.states[1][:, t:]
        for layer in range(1, lm.adapter.num_layers):
            keys, values = full.kv[layer]
            past = new_cache(lm, {layer: (keys[:, :, :t], values[:, :, :t])})
            hidden = run_layers(lm, suffix, hidden, layer, layer + 1, past=past)
            torch.testing.assert_close(hidden, full.states[layer + 1][:, t:], atol=1e-5, rtol=0)


def test_the_callers_taps_act_during_the_replay(tiny):
    ids = _ids(tiny, 1)
    name = tiny.adapter.mlp_name(2)
    edit = {name: Tap(replace=add_at_positions(torch.ones(32), [3]))}
    with torch.no_grad():
        stream = record_stream(tiny, ids)
        with tap(tiny.model, edit):
            expected = tiny.model(ids).logits[:, -1]
            out = run_layers(tiny, stream, stream.states[1], 1)
        plain = final_logits(tiny, run_layers(tiny, stream, stream.states[1], 1)[:, -1])
    torch.testing.assert_close(final_logits(tiny, out[:, -1]), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, expected, atol=1e-3)
    assert _hook_count(tiny.model) == 0
