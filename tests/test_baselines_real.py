"""The fine-tuning baselines and in-context editing on the embedded SmolLM2-135M-Instruct, with a
real CounterFact case (from the training split, never the evaluation one)."""

import pytest

from lmscalpel import Patch, edit, generate, load_model, score_targets
from lmscalpel.methods.ike import load_pool
from lmscalpel.models.fingerprint import tensor_digest

pytestmark = pytest.mark.real


def train_case(case_id):
    (request,) = [r for r in load_pool() if r.case_id == case_id]
    return request


@pytest.fixture(scope="module")
def case():
    """CounterFact train case 'Autonomous University of Madrid, which is located in' Spain -> Sweden."""
    return train_case(3)


def digests(lm):
    return {n: tensor_digest(p) for n, p in lm.model.named_parameters()}


def margin(lm, prompt, request):
    """log P(new) - log P(true), per token."""
    new, true = score_targets(lm, [prompt, prompt], [request.target_new, request.target_true])
    return new.mean_logprob - true.mean_logprob


def test_ike_flips_the_answer_with_bit_identical_weights(smol, tmp_path):
    # 'The headquarter of Monell Chemical Senses Center is located in' Philadelphia -> Mumbai
    case = train_case(22)
    before = digests(smol)
    assert margin(smol, case.prompt, case) < 0
    patch = edit(smol, case, method="ike", config={"k": 8})
    try:
        assert margin(smol, case.prompt, case) > 0
        assert margin(smol, case.paraphrases[0], case) > 0
        answer = generate(smol, [case.prompt], max_new_tokens=3)[0]
        assert answer.strip().startswith(case.target_new)
        assert digests(smol) == before
        folder = patch.save(tmp_path / "ike.patch")
    finally:
        patch.revert()
    assert margin(smol, case.prompt, case) < 0
    fresh = load_model()
    Patch.load(folder).apply(fresh)
    assert generate(fresh, [case.prompt], max_new_tokens=3)[0] == answer


def check_flips_and_reverts(lm, case, method):
    before = digests(lm)
    patch = edit(lm, case, method=method)
    try:
        assert margin(lm, case.prompt, case) > 0, f"{method} did not flip {case.prompt!r}"
    finally:
        patch.revert()
    assert digests(lm) == before
    assert margin(lm, case.prompt, case) < 0


def test_lora_flips_a_counterfact_case_and_reverts_exactly(smol, case):
    check_flips_and_reverts(smol, case, "lora")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft", "ft-l", "ft-m"])
def test_each_fine_tuning_variant_flips_a_counterfact_case_and_reverts_exactly(smol, case, method):
    check_flips_and_reverts(smol, case, method)
