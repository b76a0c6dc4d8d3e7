"""Opt-in (make test-gemma): a second real architecture, Gemma 3 270M, end to end."""

import os

import pytest

from lmscalpel import EditRequest, edit, load_model, score_targets
from lmscalpel.models.fingerprint import tensor_digest

pytestmark = [
    pytest.mark.gemma,
    pytest.mark.skipif(os.environ.get("LMSCALPEL_GEMMA") != "1", reason="set LMSCALPEL_GEMMA=1"),
]


def test_gemma3_edit_end_to_end():
    lm = load_model("gemma3-270m")
    assert lm.model_type == "gemma3_text"
    request = EditRequest(
        prompt="The Eiffel Tower is located in the city of",
        subject="Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
    )

    def margin():
        new, true = score_targets(lm, [request.prompt] * 2, ["Rome", "Paris"])
        return new.mean_logprob - true.mean_logprob

    assert margin() < 0
    patch = edit(lm, request, method="ft-m")
    assert margin() > 0
    patch.revert()
    name = patch.parameter_names[0]
    assert tensor_digest(lm.model.get_parameter(name)) == patch.base_digests[name]
    assert margin() < 0
