"""Reality checks on the embedded SmolLM2-135M-Instruct (converted once and cached)."""

import pytest
import torch

from lmscalpel import EditRequest, LocalityProbe, Patch, edit, generate, load_model, score_targets
from lmscalpel.models.fingerprint import tensor_digest

pytestmark = pytest.mark.real

EIFFEL = EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    locality=(LocalityProbe("The Louvre is located in the city of", "Paris"),),
)


def logp(lm, prompt, target):
    return score_targets(lm, [prompt], [target])[0].mean_logprob


def test_the_model_knows_paris(smol):
    assert smol.model_type == "llama" and smol.adapter.num_layers == 30
    assert logp(smol, EIFFEL.prompt, "Paris") > logp(smol, EIFFEL.prompt, "Rome") + 2
    assert generate(smol, [EIFFEL.prompt], max_new_tokens=3)[0].strip().startswith("Paris")


def test_batched_and_single_scores_agree(smol):
    prompts = [EIFFEL.prompt, EIFFEL.prompt, "The mother tongue of Danielle Darrieux is"]
    targets = ["Paris", "Rome", "French"]
    batched = score_targets(smol, prompts, targets)
    for p, t, b in zip(prompts, targets, batched):
        single = score_targets(smol, [p], [t])[0]
        assert max(abs(x - y) for x, y in zip(b.token_logprobs, single.token_logprobs)) < 1e-4


def test_ft_l_flips_the_answer_keeps_the_louvre_and_reverts_exactly(smol, tmp_path):
    name = None
    patch = edit(smol, EIFFEL, method="ft-l")
    try:
        name = patch.parameter_names[0]
        assert logp(smol, EIFFEL.prompt, "Rome") > logp(smol, EIFFEL.prompt, "Paris")
        assert generate(smol, [EIFFEL.prompt], max_new_tokens=3)[0].strip().startswith("Rome")
        louvre = EIFFEL.locality[0].prompt
        assert logp(smol, louvre, "Paris") > logp(smol, louvre, "Rome")
        edited_answer = generate(smol, [EIFFEL.prompt], max_new_tokens=5)
        folder = patch.save(tmp_path / "eiffel.patch")
    finally:
        patch.revert()
    assert tensor_digest(smol.model.get_parameter(name)) == patch.base_digests[name]
    assert logp(smol, EIFFEL.prompt, "Paris") > logp(smol, EIFFEL.prompt, "Rome")

    fresh = load_model()  # a saved patch re-applied to a fresh load gives the same answers
    Patch.load(folder).apply(fresh)
    assert generate(fresh, [EIFFEL.prompt], max_new_tokens=5) == edited_answer


def test_bad_request_leaves_the_real_model_untouched(smol):
    before = tensor_digest(smol.adapter.mlp_out_weight(14))
    bad = EditRequest(
        prompt=EIFFEL.prompt + " " + "very " * 9000, subject="Eiffel Tower", target_new="Rome"
    )
    with pytest.raises(ValueError, match="context"):
        edit(smol, bad, method="ft-l")
    assert tensor_digest(smol.adapter.mlp_out_weight(14)) == before


@pytest.mark.slow
def test_export_of_the_real_model_loads_with_transformers_alone(smol, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patch = edit(smol, EIFFEL, method="ft-l", apply=False)
    folder = patch.export(smol, tmp_path / "edited")
    plain = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(EIFFEL.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        top = plain(ids).logits[0, -1].argmax()
    assert tok.decode([int(top)]).strip() == "Rome"
