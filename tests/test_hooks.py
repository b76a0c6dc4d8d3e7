import pytest
import torch

from lmscalpel.runtime.hooks import add_at_positions, capture, edit_output, edit_outputs


def _ids(lm, text="The Eiffel Tower is located in"):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_reads_input_and_output(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    with capture(tiny.model, [a.mlp_out_name(2), a.layer_name(2)], inputs=True) as seen:
        tiny.model(ids)
    record = seen[a.mlp_out_name(2)]
    torch.testing.assert_close(record.output, record.input @ a.mlp_out_weight(2).T)
    assert seen[a.layer_name(2)].output.shape == (1, ids.shape[1], 32)
    assert _hook_count(tiny.model) == 0


def test_edit_output_changes_the_prediction_and_is_removed(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    clean = tiny.model(ids).logits
    with edit_output(tiny.model, a.mlp_name(1), lambda h: h + 10.0):
        edited = tiny.model(ids).logits
    assert not torch.allclose(clean, edited)
    torch.testing.assert_close(tiny.model(ids).logits, clean)
    assert _hook_count(tiny.model) == 0


def test_add_at_positions_touches_only_that_position(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    vector = torch.ones(32)
    with capture(tiny.model, a.mlp_name(1)) as before:
        tiny.model(ids)
    with (
        edit_output(tiny.model, a.mlp_name(1), add_at_positions(vector, [2])),
        capture(tiny.model, a.mlp_name(1)) as after,
    ):
        tiny.model(ids)
    diff = (after[a.mlp_name(1)].output - before[a.mlp_name(1)].output).abs().sum(-1)[0]
    assert diff[2] > 0 and diff[:2].sum() == 0 and diff[3:].sum() == 0


def test_hooks_are_removed_when_the_body_raises(tiny):
    a = tiny.adapter
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture(tiny.model, a.layer_name(0)),
        edit_outputs(tiny.model, {a.mlp_name(0): lambda h: h, a.attn_name(1): lambda h: h}),
    ):
        raise RuntimeError("boom")
    assert _hook_count(tiny.model) == 0


def test_hooks_are_removed_when_the_forward_raises(tiny):
    a, ids = tiny.adapter, _ids(tiny)

    def explode(h):
        raise ValueError("bad edit")

    with (
        pytest.raises(ValueError, match="bad edit"),
        edit_output(tiny.model, a.mlp_name(0), explode),
    ):
        tiny.model(ids)
    assert _hook_count(tiny.model) == 0


def test_capture_with_stop_skips_the_upper_layers(tiny):
    a, ids = tiny.adapter, _ids(tiny)
    with (
        capture(tiny.model, a.layer_name(3)) as top,
        capture(tiny.model, a.layer_name(1), stop=True) as seen,
    ):
        tiny.model(ids)
    assert seen[a.layer_name(1)].output is not None
    assert top[a.layer_name(3)].output is None  # never reached
    assert _hook_count(tiny.model) == 0


def test_replace_at_positions_writes_one_position_per_chosen_row(tiny):
    from lmscalpel.runtime.hooks import replace_at_positions

    hidden = torch.zeros(3, 5, 4)
    out = replace_at_positions(torch.ones(4), [1, 3])(hidden)
    assert out[0, 1].sum() == 4 and out[1, 3].sum() == 4 and out.sum() == 8
    values = torch.tensor([[1.0] * 4, [2.0] * 4])
    out = replace_at_positions(values, [0, 4], rows=[2, 0])(hidden)
    assert out[2, 0].tolist() == [1.0] * 4 and out[0, 4].tolist() == [2.0] * 4
    assert out.sum() == 12 and hidden.sum() == 0  # a new tensor; the input is untouched


def test_resume_at_skips_the_lower_blocks_and_gives_the_same_result(any_tiny):
    from lmscalpel.runtime.hooks import resume_at
    from lmscalpel.scoring import hidden_states

    lm, a = any_tiny, any_tiny.adapter
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    block = a.layer_name(2)
    with torch.no_grad():
        with capture(lm.model, block, inputs=True, outputs=False) as seen:
            full = hidden_states(lm, ids, mask)
        calls = []
        handle = a.layer(0).mlp.register_forward_hook(lambda *args: calls.append(1))
        try:
            with resume_at(lm.model, [a.layer_name(0), a.layer_name(1)], block, seen[block].input):
                resumed = hidden_states(lm, ids, mask)
        finally:
            handle.remove()
        after = hidden_states(lm, ids, mask)
    assert calls == []  # block 0 did not compute
    assert torch.equal(full, resumed)
    assert torch.equal(full, after)  # restored
    assert "forward" not in a.layer(0).__dict__
