import pytest
import torch

from lmscalpel import EditRequest, edit, score_targets
from lmscalpel.methods import ft
from lmscalpel.testing import tiny_model

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
)


def state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def logp(lm, target="Rome"):
    return score_targets(lm, [REQUEST.prompt], [target])[0].mean_logprob


@pytest.mark.parametrize("method", ["ft", "ft-l", "ft-m"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_each_variant_raises_the_target_and_reverts_exactly(method, model_type):
    lm = tiny_model(model_type)
    saved = state(lm)
    before = logp(lm)
    config = {"lr": 0.05, "steps": 20}
    if method != "ft":
        config["norm_constraint"] = 5.0
    patch = edit(lm, REQUEST, method=method, config=config)
    assert logp(lm) > before + 1.0
    patch.revert()
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, saved[n])


def test_ft_l_touches_one_matrix_within_its_linf_bound(tiny):
    patch = edit(
        tiny, REQUEST, method="ft-l", config={"lr": 0.05, "norm_constraint": 0.1}, apply=False
    )
    assert patch.parameter_names == [tiny.adapter.mlp_out_weight_name(2)]  # round(0.5 * 3) = 2
    weight = tiny.model.get_parameter(patch.parameter_names[0])
    bound = 0.1 * float(weight.std())
    assert patch.deltas[0].dense.abs().max() <= bound * (1 + 1e-5)
    assert patch.deltas[0].dense.abs().max() > 0.5 * bound  # the bound is active


def test_ft_tunes_all_mlp_matrices_of_chosen_layers(tiny):
    patch = edit(tiny, REQUEST, method="ft", config={"layers": [0, -1], "steps": 2}, apply=False)
    a = tiny.adapter
    expected = {*a.mlp_in_weight_names(0), a.mlp_out_weight_name(0)}
    expected |= {*a.mlp_in_weight_names(3), a.mlp_out_weight_name(3)}
    assert set(patch.parameter_names) == expected


def test_compute_leaves_the_model_untouched(tiny):
    saved = state(tiny)
    patch = edit(tiny, REQUEST, method="ft-m", apply=False)
    assert not patch.is_applied
    for n, p in tiny.model.named_parameters():
        assert torch.equal(p, saved[n]) and not p.requires_grad


def test_a_crash_mid_training_restores_the_weights(tiny, power_cut):
    saved = state(tiny)
    with pytest.raises(RuntimeError, match="power cut"):
        edit(tiny, REQUEST, method="ft", config={"lr": 0.1})
    for n, p in tiny.model.named_parameters():
        assert torch.equal(p, saved[n]) and not p.requires_grad


def test_prompt_last_objective_reads_every_target_token_at_the_prompt_end(tiny):
    multi = EditRequest(prompt="Apple was founded by", subject="Apple", target_new="Steve Jobs")
    loss_last = ft.edit_loss(tiny, [multi], "prompt_last")
    loss_target = ft.edit_loss(tiny, [multi], "target")
    assert not torch.isclose(loss_last, loss_target)
