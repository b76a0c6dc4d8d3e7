import pytest
import torch

from lmscalpel.models import (
    ArchitectureSpec,
    ModelAdapter,
    UnsupportedArchitectureError,
    register_architecture,
    supported_model_types,
)
from lmscalpel.models.adapter import hidden_input, with_hidden_input
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.runtime.kv import run_body
from lmscalpel.testing import TINY_MODEL_TYPES, tiny_model

REQUIRED = {"llama", "mistral", "qwen2", "gemma3", "gemma3_text", "gpt2", "gptj", "gpt_neox"}


def test_required_families_are_supported():
    assert set(supported_model_types()) >= REQUIRED


def test_every_mapped_module_exists_and_has_the_right_shape(any_tiny):
    lm = any_tiny
    a = lm.adapter
    assert a.num_layers == 4
    assert a.hidden_size == 32
    ids = torch.tensor([lm.tokenizer("The Eiffel Tower is in Paris")["input_ids"]])
    names = [a.layer_name(1), a.attn_name(1), a.mlp_name(1), a.mlp_out_name(1)]
    with tap(lm.model, dict.fromkeys(names, Tap(input=True, output=True))) as seen:
        lm.model(ids)
    seq = ids.shape[1]
    for name in names:
        assert seen[name].output.shape == (1, seq, 32), name
    key_size = a.mlp_key_size(1)
    assert seen[a.mlp_out_name(1)].input.shape == (1, seq, key_size)
    w = a.mlp_out_weight(1)
    assert w.shape == (32, key_size)  # always (out, in)
    # the (out, in) view really computes the module's output from its input (bias aside)
    module = a.mlp_out(1)
    bias = getattr(module, "bias", None)
    expected = seen[a.mlp_out_name(1)].input @ w.T + (0 if bias is None else bias)
    torch.testing.assert_close(expected, seen[a.mlp_out_name(1)].output, atol=1e-5, rtol=1e-5)
    assert a.embeddings.weight.shape[1] == 32
    assert a.embeddings is lm.model.get_submodule(a.embeddings_name)
    logits = a.logits(torch.zeros(1, 32))
    assert logits.shape[-1] == lm.model.config.vocab_size
    for name in a.mlp_in_weight_names(1):
        lm.model.get_parameter(name)  # exists


def test_the_final_norm_of_the_last_layer_output_is_the_body_output(any_tiny):
    lm, a = any_tiny, any_tiny.adapter
    ids = torch.tensor([lm.tokenizer("Paris is the capital")["input_ids"]])
    last = a.layer_name(a.num_layers - 1)
    with torch.no_grad(), tap(lm.model, {last: Tap(output=True)}) as seen:
        body = run_body(lm, ids).hidden
        torch.testing.assert_close(a.final_norm(seen[last].output), body, atol=1e-6, rtol=0)
        assert not torch.allclose(seen[last].output, body, atol=1e-3)  # the norm does something


def test_the_embeddings_feed_the_first_block(any_tiny):
    """The embeddings module's output reaches layer 0 (the families that add position
    embeddings add them to it, so changing it changes layer 0's input)."""
    lm, a = any_tiny, any_tiny.adapter
    ids = torch.tensor([lm.tokenizer("Paris is the capital")["input_ids"]])
    first = a.layer_name(0)
    taps = {a.embeddings_name: Tap(output=True), first: Tap(input=True)}
    with torch.no_grad(), tap(lm.model, taps) as seen:
        run_body(lm, ids)
    taps = {a.embeddings_name: Tap(replace=lambda e: e + 1.0), first: Tap(input=True)}
    with torch.no_grad(), tap(lm.model, taps) as moved:
        run_body(lm, ids)
    assert seen[a.embeddings_name].output.shape == (1, ids.shape[1], 32)
    assert not torch.allclose(seen[first].input, moved[first].input)


def test_blocks_take_the_hidden_state_first(any_tiny):
    """What every block is really called with: hidden_input finds the hidden state there, and
    with_hidden_input replaces exactly it."""
    lm, a = any_tiny, any_tiny.adapter
    ids = torch.tensor([lm.tokenizer("Paris is the capital")["input_ids"]])
    calls = []
    handle = a.layer(1).register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad(), tap(lm.model, {a.layer_name(0): Tap(output=True)}) as seen:
            run_body(lm, ids)
    finally:
        handle.remove()
    args, kwargs = calls[0]
    assert torch.equal(hidden_input(args, kwargs), seen[a.layer_name(0)].output)
    new = torch.zeros(1, ids.shape[1], 32)
    args2, kwargs2 = with_hidden_input(args, kwargs, new)
    assert hidden_input(args2, kwargs2) is new
    assert len(args2) == len(args) and kwargs2.keys() == kwargs.keys()
    # by keyword, too
    args3, kwargs3 = with_hidden_input((), {"hidden_states": seen[a.layer_name(0)].output}, new)
    assert args3 == () and kwargs3["hidden_states"] is new


def test_the_sliding_window_comes_from_the_config():
    assert tiny_model("gemma3_text").adapter.sliding_window == 64
    assert tiny_model("llama").adapter.sliding_window is None


def test_final_state_matches_the_model_logits(any_tiny):
    lm = any_tiny
    ids = torch.tensor([lm.tokenizer("Paris is the capital")["input_ids"]])
    with torch.no_grad():
        hidden = lm.adapter.body(input_ids=ids).last_hidden_state
        torch.testing.assert_close(lm.adapter.logits(hidden), lm.model(ids).logits)


def test_gpt2_conv1d_weight_is_presented_transposed():
    lm = tiny_model("gpt2")
    a = lm.adapter
    name = a.mlp_out_weight_name(0)
    stored = lm.model.get_parameter(name)
    assert a.is_transposed(name)
    assert stored.shape == (a.mlp_key_size(0), 32)
    view = a.mlp_out_weight(0)
    assert view.shape == (32, a.mlp_key_size(0))
    assert view.data_ptr() == stored.data_ptr()  # a view, not a copy
    left, right = torch.randn(32, 1), torch.randn(1, a.mlp_key_size(0))
    sl, sr = a.low_rank_to_storage(name, left, right)
    torch.testing.assert_close(sl @ sr, (left @ right).T)


def test_unknown_architecture_lists_supported_types_and_how_to_register():
    model = tiny_model("llama").model
    model.config.model_type = "martian"
    with pytest.raises(UnsupportedArchitectureError) as error:
        ModelAdapter(model)
    message = str(error.value)
    assert "martian" in message and "llama" in message and "gpt2" in message
    assert "register_architecture" in message


def test_registering_a_new_family_makes_it_usable():
    model = tiny_model("llama").model
    model.config.model_type = "my_llama"
    spec = ArchitectureSpec(
        model_types=("my_llama",),
        embeddings="model.embed_tokens",
        layers="model.layers",
        attn="self_attn",
        mlp="mlp",
        mlp_out="mlp.down_proj",
        final_norm="model.norm",
        lm_head="lm_head",
    )
    register_architecture(spec)
    assert ModelAdapter(model).num_layers == 4


def test_layer_out_of_range_is_a_clear_error(tiny):
    with pytest.raises(IndexError, match="layers 0..3"):
        tiny.adapter.layer_name(4)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_fingerprint_changes_with_weights(model_type):
    a, b = tiny_model(model_type, seed=0), tiny_model(model_type, seed=1)
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == tiny_model(model_type, seed=0).fingerprint
