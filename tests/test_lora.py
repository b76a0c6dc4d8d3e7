import pytest
import torch
from peft.tuners.lora import LoraLayer

from lmscalpel import EditRequest, edit, score_targets
from lmscalpel.methods import lora
from lmscalpel.testing import tiny_model

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
)
FAST = {"lr": 0.05, "steps": 15, "layers": [1, 2]}


def snapshot(lm):
    """Everything that must survive LoRA: modules, parameter objects, values, grad flags."""
    return (
        [(n, type(m)) for n, m in lm.model.named_modules()],
        {n: (p, p.detach().clone(), p.requires_grad) for n, p in lm.model.named_parameters()},
        sorted(vars(lm.model)),
    )


def assert_unchanged(lm, saved):
    modules, params, attrs = saved
    assert [(n, type(m)) for n, m in lm.model.named_modules()] == modules
    now = dict(lm.model.named_parameters())
    assert now.keys() == params.keys()
    for name, (obj, value, grad) in params.items():
        assert now[name] is obj and torch.equal(obj, value) and obj.requires_grad == grad
    assert sorted(vars(lm.model)) == attrs
    assert not any(isinstance(m, LoraLayer) for m in lm.model.modules())


def logp(lm, target="Rome"):
    return score_targets(lm, [REQUEST.prompt], [target])[0].mean_logprob


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_lora_raises_the_target_leaves_no_adapter_and_reverts_exactly(model_type):
    lm = tiny_model(model_type)
    saved = snapshot(lm)
    before = logp(lm)
    patch = edit(lm, REQUEST, method="lora", config=FAST, apply=False)
    assert_unchanged(lm, saved)  # compute changed nothing, peft left nothing behind
    names = {lm.adapter.mlp_out_weight_name(1), lm.adapter.mlp_out_weight_name(2)}
    assert names <= set(patch.parameter_names)
    assert all(d.rank == 8 and d.dense is None for d in patch.deltas)  # low-rank factors
    patch.apply(lm)
    after = logp(lm)
    assert after > before + 1.0
    # the merged delta is exactly what the adapters computed: the final training loss
    assert -after == pytest.approx(patch.info["losses"][-1], rel=1e-3, abs=1e-4)
    patch.revert()
    assert_unchanged(lm, saved)


def test_lora_on_the_output_matrices_only_with_a_given_rank(tiny):
    patch = edit(
        tiny, REQUEST, method="lora", config={**FAST, "matrices": "mlp_out", "rank": 2}, apply=False
    )
    assert patch.parameter_names == [tiny.adapter.mlp_out_weight_name(i) for i in (1, 2)]
    assert [d.rank for d in patch.deltas] == [2, 2]


def test_lora_is_reproducible_with_its_seed(tiny):
    a = edit(tiny, REQUEST, method="lora", config=FAST, apply=False)
    b = edit(tiny, REQUEST, method="lora", config=FAST, apply=False)
    assert all(torch.equal(x.left, y.left) for x, y in zip(a.deltas, b.deltas))


def test_a_crash_mid_training_removes_the_adapters(tiny, power_cut):
    saved = snapshot(tiny)
    with pytest.raises(RuntimeError, match="power cut"):
        edit(tiny, REQUEST, method="lora", config=FAST)
    assert_unchanged(tiny, saved)


def test_lora_rank_must_be_positive():
    from lmscalpel import ConfigError

    with pytest.raises(ConfigError, match="rank"):
        lora.LoRAConfig(rank=0)
