"""from_layer: the one way to run the model from a layer upward, on every architecture."""

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import ModelHook, add_hook_to_module

from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.runtime.layers import from_layer
from lmscalpel.scoring import hidden_states

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 3]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _input_of(lm, layer):
    name = lm.adapter.layer_name(layer)
    with torch.no_grad(), tap(lm.model, {name: Tap(input=True)}, stop=True) as seen:
        hidden_states(lm, IDS, MASK)
    return seen[name].input


@pytest.mark.parametrize("layer", [0, 2])
def test_from_layer_skips_the_lower_blocks_and_gives_the_same_result(any_tiny, layer):
    lm, a = any_tiny, any_tiny.adapter
    blocks = list(a.layer_list)
    with torch.no_grad():
        full = hidden_states(lm, IDS, MASK)
        hidden = _input_of(lm, layer)
        calls = []
        handle = a.mlp(0).register_forward_hook(lambda *args: calls.append(1))
        try:
            with from_layer(lm, layer, hidden):
                resumed = hidden_states(lm, IDS, MASK)
        finally:
            handle.remove()
    assert calls == ([1] if layer == 0 else [])  # block 0 computes only when it is run
    assert torch.equal(full, resumed)
    assert list(a.layer_list) == blocks  # put back
    assert _hook_count(lm.model) == 0
    assert all("forward" not in block.__dict__ for block in blocks)


def test_the_given_hidden_state_is_what_the_first_run_block_receives(tiny):
    """Not the embeddings: a different hidden state gives a different result, also from layer 0."""
    for layer in (0, 2):
        hidden = _input_of(tiny, layer)
        with torch.no_grad():
            with from_layer(tiny, layer, hidden):
                same = hidden_states(tiny, IDS, MASK)
            with from_layer(tiny, layer, hidden + 1.0):
                moved = hidden_states(tiny, IDS, MASK)
        assert not torch.allclose(same, moved)


def test_from_the_top_only_the_final_norm_runs(tiny):
    a = tiny.adapter
    hidden = torch.randn(2, 4, 32)
    with torch.no_grad(), from_layer(tiny, a.num_layers, hidden):
        out = hidden_states(tiny, IDS, MASK)
        torch.testing.assert_close(out, a.final_norm(hidden))
    with pytest.raises(IndexError), from_layer(tiny, a.num_layers + 1, hidden):
        pass


def test_gradients_flow_into_the_given_hidden_state(tiny):
    hidden = _input_of(tiny, 1).clone().requires_grad_(True)
    with from_layer(tiny, 1, hidden):
        hidden_states(tiny, IDS, MASK).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_the_blocks_are_put_back_when_the_pass_raises(tiny):
    a = tiny.adapter
    blocks = list(a.layer_list)

    def explode(h):
        raise ValueError("bad")

    with (
        pytest.raises(ValueError, match="bad"),
        from_layer(tiny, 2, _input_of(tiny, 2)),
        tap(tiny.model, {a.mlp_name(3): Tap(replace=explode)}),
    ):
        hidden_states(tiny, IDS, MASK)
    assert list(a.layer_list) == blocks
    assert _hook_count(tiny.model) == 0


class _Count(ModelHook):
    def __init__(self, calls, index):
        self.calls, self.index = calls, index

    def pre_forward(self, module, *args, **kwargs):
        self.calls.append(self.index)
        return args, kwargs


def test_accelerate_hooks_stay_and_act(any_tiny):
    """A model offloaded by accelerate (weights loaded by hooks around every module's forward),
    with another accelerate hook on each block: the result is the same, the skipped blocks'
    hooks do not fire, and every hook is still there afterwards."""
    lm, a = any_tiny, any_tiny.adapter
    with torch.no_grad():
        full = hidden_states(lm, IDS, MASK)
        hidden = _input_of(lm, 2)
    cpu_offload(lm.model, execution_device=torch.device("cpu"))
    calls = []
    for index, block in enumerate(a.layer_list):
        add_hook_to_module(block, _Count(calls, index), append=True)
    assert a.mlp_out_weight(1).device.type == "meta"  # really offloaded
    with torch.no_grad(), from_layer(lm, 2, hidden):
        resumed = hidden_states(lm, IDS, MASK)
    assert calls == [2, 3]
    torch.testing.assert_close(resumed, full, atol=1e-6, rtol=0)
    for block in a.layer_list:
        assert hasattr(block, "_hf_hook") and "forward" in block.__dict__  # accelerate's wrapper
    calls.clear()
    with torch.no_grad():
        again = hidden_states(lm, IDS, MASK)
    assert calls == [0, 1, 2, 3]
    torch.testing.assert_close(again, full, atol=1e-6, rtol=0)
