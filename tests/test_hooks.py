"""The one hook primitive: tap reads, replaces, keeps gradients, stops early, and always cleans up."""

import gc
import weakref

import pytest
import torch

from lmscalpel.runtime.hooks import Tap, add_at_positions, replace_at_positions, tap
from lmscalpel.runtime.kv import run_body


def _ids(lm, text="The Eiffel Tower is located in"):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_tap_reads_input_and_output(any_tiny):
    lm = any_tiny
    a, ids = lm.adapter, _ids(lm)
    taps = {a.mlp_out_name(2): Tap(input=True, output=True), a.layer_name(2): Tap(output=True)}
    with torch.no_grad(), tap(lm.model, taps) as seen:
        lm.model(ids)
    record = seen[a.mlp_out_name(2)]
    bias = getattr(a.mlp_out(2), "bias", None)
    expected = record.input @ a.mlp_out_weight(2).T + (0 if bias is None else bias)
    torch.testing.assert_close(record.output, expected, atol=1e-5, rtol=1e-5)
    assert seen[a.layer_name(2)].output.shape == (1, ids.shape[1], 32)
    assert seen[a.layer_name(2)].input is None  # not asked for
    assert _hook_count(lm.model) == 0


def test_replace_changes_the_prediction_and_is_removed(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    clean = tiny.model(ids).logits
    with tap(tiny.model, {a.mlp_name(1): Tap(replace=lambda h: h + 10.0)}):
        edited = tiny.model(ids).logits
    assert not torch.allclose(clean, edited)
    torch.testing.assert_close(tiny.model(ids).logits, clean)
    assert _hook_count(tiny.model) == 0


def test_a_kept_output_is_the_replaced_one_and_add_at_positions_touches_one_position(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    name, vector = a.mlp_name(1), torch.ones(32)
    with tap(tiny.model, {name: Tap(output=True)}) as before:
        tiny.model(ids)
    with tap(tiny.model, {name: Tap(output=True, replace=add_at_positions(vector, [2]))}) as after:
        tiny.model(ids)
    diff = (after[name].output - before[name].output).abs().sum(-1)[0]
    assert diff[2] > 0 and diff[:2].sum() == 0 and diff[3:].sum() == 0


def test_replace_with_input_realises_a_weight_change(tiny_gpt2):
    """output + ΔW·input at the MLP output module equals editing its (transposed Conv1D) weight."""
    lm = tiny_gpt2
    a, ids = lm.adapter, _ids(lm)
    name, weight = a.mlp_out_name(1), a.mlp_out_weight_name(1)
    torch.manual_seed(0)
    change = 0.1 * torch.randn(a.matrix_shape(weight))  # (out, in)
    with torch.no_grad():
        with tap(lm.model, {name: Tap(replace=lambda y, x: y + x @ change.T, with_input=True)}):
            hooked = lm.model(ids).logits
        stored = lm.model.get_parameter(weight)
        stored += a.to_storage(weight, change)
        try:
            edited = lm.model(ids).logits
        finally:
            stored -= a.to_storage(weight, change)
    torch.testing.assert_close(hooked, edited, atol=1e-5, rtol=1e-5)


def test_grad_makes_outputs_differentiable_nodes(tiny):
    """With grad=True, autograd.grad w.r.t. the kept outputs returns ∂loss/∂output: the same
    gradient as that of a zero vector added to that output."""
    a = tiny.adapter
    ids = _ids(tiny)
    low, high = a.mlp_out_name(1), a.mlp_out_name(3)
    probes = {n: torch.zeros(1, ids.shape[1], 32, requires_grad=True) for n in (low, high)}
    taps = {n: Tap(input=True, output=True, grad=True) for n in (low, high)}
    with torch.enable_grad(), tap(tiny.model, taps) as seen:
        loss = run_body(tiny, ids).hidden.square().sum()
        delta = torch.autograd.grad(loss, [seen[low].output, seen[high].output])
    adders = {n: Tap(replace=lambda h, z=z: h + z) for n, z in probes.items()}
    with torch.enable_grad(), tap(tiny.model, adders):
        loss = run_body(tiny, ids).hidden.square().sum()
        expected = torch.autograd.grad(loss, [probes[low], probes[high]])
    for got, want in zip(delta, expected):
        torch.testing.assert_close(got, want)
    assert seen[low].output.is_leaf and not seen[high].output.is_leaf  # the graph starts at low
    assert not seen[high].input.requires_grad  # inputs are kept detached
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_clone_keeps_copies(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    name = a.mlp_name(0)
    with (
        torch.no_grad(),
        tap(tiny.model, {name: Tap(output=True, clone=True)}) as copied,
        tap(tiny.model, {name: Tap(output=True)}) as plain,
    ):
        tiny.model(ids)
    assert torch.equal(copied[name].output, plain[name].output)
    assert copied[name].output.data_ptr() != plain[name].output.data_ptr()


def test_hooks_are_removed_when_the_body_raises(tiny):
    a = tiny.adapter
    with (
        pytest.raises(RuntimeError, match="boom"),
        tap(tiny.model, {a.layer_name(0): Tap(output=True)}),
        tap(tiny.model, {a.mlp_name(0): Tap(replace=lambda h: h), a.attn_name(1): Tap(input=True)}),
    ):
        raise RuntimeError("boom")
    assert _hook_count(tiny.model) == 0


def test_hooks_are_removed_when_the_forward_raises(tiny):
    a, ids = tiny.adapter, _ids(tiny)

    def explode(h):
        raise ValueError("bad edit")

    with (
        pytest.raises(ValueError, match="bad edit"),
        tap(tiny.model, {a.mlp_name(0): Tap(replace=explode)}),
    ):
        tiny.model(ids)
    assert _hook_count(tiny.model) == 0


def test_stop_skips_the_upper_layers_and_only_its_own_tap_swallows_it(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    after = []
    with tap(
        tiny.model, {a.layer_name(3): Tap(output=True), a.layer_name(0): Tap(input=True)}
    ) as top:
        with tap(tiny.model, {a.layer_name(1): Tap(output=True)}, stop=True) as seen:
            tiny.model(ids)
            after.append("not reached")  # the rest of the stopped block is skipped
        after.append("outer body goes on")
    assert seen[a.layer_name(1)].output is not None
    assert top[a.layer_name(0)].input is not None
    assert top[a.layer_name(3)].output is None  # never reached
    assert after == ["outer body goes on"]
    assert _hook_count(tiny.model) == 0


def test_stop_waits_for_every_tapped_module(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    names = [a.layer_name(2), a.mlp_name(0)]
    with tap(tiny.model, dict.fromkeys(names, Tap(output=True)), stop=True) as seen:
        tiny.model(ids)
    assert all(seen[n].output is not None for n in names)


def test_a_stopped_pass_frees_its_activations_without_the_garbage_collector(any_tiny):
    """The stop signal's traceback holds the forward pass's frames; a cycle through it would keep
    every activation alive until the collector ran (MEMIT's key passes grew ~0.4 GB a layer)."""
    lm = any_tiny
    a, ids = lm.adapter, _ids(lm)
    alive = []

    def remember(module, args, output):  # layer 0's output: the input that layer 1's frames hold
        alive.append(weakref.ref(output[0] if isinstance(output, tuple) else output))

    handle = lm.model.get_submodule(a.layer_name(0)).register_forward_hook(remember)
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad(), tap(lm.model, {a.layer_name(1): Tap(output=True)}, stop=True):
            lm.model(ids)
        assert alive and alive[0]() is None
    finally:
        gc.enable()
        handle.remove()


def test_replace_at_positions_writes_one_position_per_chosen_row():
    hidden = torch.zeros(3, 5, 4)
    out = replace_at_positions(torch.ones(4), [1, 3])(hidden)
    assert out[0, 1].sum() == 4 and out[1, 3].sum() == 4 and out.sum() == 8
    values = torch.tensor([[1.0] * 4, [2.0] * 4])
    out = replace_at_positions(values, [0, 4], rows=[2, 0])(hidden)
    assert out[2, 0].tolist() == [1.0] * 4 and out[0, 4].tolist() == [2.0] * 4
    assert out.sum() == 12 and hidden.sum() == 0  # a new tensor; the input is untouched
