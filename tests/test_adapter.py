import pytest
import torch

from lmscalpel.models import (
    ArchitectureSpec,
    ModelAdapter,
    UnsupportedArchitectureError,
    register_architecture,
    supported_model_types,
)
from lmscalpel.runtime.hooks import capture
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
    with capture(lm.model, names, inputs=True) as seen:
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
    assert a.final_norm is not None
    logits = a.logits(torch.zeros(1, 32))
    assert logits.shape[-1] == lm.model.config.vocab_size
    for name in a.mlp_in_weight_names(1):
        lm.model.get_parameter(name)  # exists


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
