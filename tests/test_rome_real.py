"""ROME on the embedded SmolLM2-135M-Instruct: real edits flip real answers and revert exactly."""

import json
from pathlib import Path

import pytest
import torch

from lmscalpel import EditRequest, edit, score_targets
from lmscalpel.demo import DEMO_REQUEST as EIFFEL
from lmscalpel.models.fingerprint import tensor_digest

EDIT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact"


def prob(lm, prompt, target):
    return score_targets(lm, [prompt], [target])[0].prob


def flips(lm, prompt, new, true):
    return prob(lm, prompt, new) > prob(lm, prompt, true)


@pytest.mark.real
def test_rome_moves_the_eiffel_tower_and_reverts_bit_exactly(smol):
    assert not flips(smol, EIFFEL.prompt, "Rome", "Paris")
    patch = edit(smol, EIFFEL, method="rome", config={"statistics": False})
    assert smol.fingerprint == "fe072e9ea3f8cab6" and patch.info["layer"] == 4  # traced peak
    name = patch.parameter_names[0]
    assert patch.deltas[0].rank == 1 and "mlp" in name
    assert flips(smol, EIFFEL.prompt, "Rome", "Paris")
    assert flips(smol, EIFFEL.paraphrases[0], "Rome", "Paris")
    assert not flips(smol, "The Louvre is located in the city of", "Rome", "Paris")
    edited = tensor_digest(smol.model.get_parameter(name))
    patch.revert()
    assert tensor_digest(smol.model.get_parameter(name)) == patch.base_digests[name] != edited
    assert not flips(smol, EIFFEL.prompt, "Rome", "Paris")


def counterfact_cases(n: int) -> list[EditRequest]:
    path = EDIT_DATA / "edit.json"
    if not path.is_file():
        pytest.skip(f"CounterFact data not found at {path}")
    records = json.loads(path.read_text())[:n]
    return [
        EditRequest(
            prompt=r["prompt"],
            subject=r["subject"],
            target_new=r["target_new"],
            target_true=r["ground_truth"],
            case_id=r["case_id"],
        )
        for r in records
    ]


@pytest.mark.real
@pytest.mark.slow
def test_rome_flips_nine_of_ten_counterfact_cases_with_default_settings(smol):
    """The default configuration (statistics from model-sampled text, computed once if missing)."""
    snapshot = {n: p.detach().clone() for n, p in smol.model.named_parameters()}
    flipped = 0
    for request in counterfact_cases(10):
        patch = edit(smol, request, method="rome")
        flipped += flips(smol, request.prompt, request.target_new, request.target_true)
        patch.revert()
    assert flipped >= 9
    assert all(torch.equal(p, snapshot[n]) for n, p in smol.model.named_parameters())
