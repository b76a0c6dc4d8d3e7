"""MEND on the embedded SmolLM2-135M-Instruct: a short meta-training run on CounterFact's training
split, then an edit with the editor it produced (slow: a few minutes on 2 cores)."""

import pytest

from lmscalpel import Patch, edit, score_targets
from lmscalpel.methods.ike import load_pool
from lmscalpel.methods.mend import MENDTrainConfig, save_editor, split_records, train_mend
from lmscalpel.models.fingerprint import tensor_digest

pytestmark = [pytest.mark.real, pytest.mark.slow]


def digests(lm):
    return {n: tensor_digest(p) for n, p in lm.model.named_parameters()}


def test_a_briefly_trained_editor_edits_the_embedded_model_and_reverts_exactly(smol, tmp_path):
    records = load_pool(size=80)
    config = MENDTrainConfig(
        steps=12,
        batch_size=4,
        val_size=8,
        val_every=6,
        rank=32,
        calibration_edits=8,
        max_train=72,
        stats_samples=4000,
    )
    before = digests(smol)
    result = train_mend(smol, records, config, progress=False)
    assert digests(smol) == before  # meta-training never touches the base model
    assert result.steps == 12 and result.history[0]["step"] == 0
    folder = save_editor(result.network, smol, tmp_path / "editor")

    _, held_out = split_records(records, config)
    request = held_out[0]  # never trained on
    prompt = request.prompt
    (old,) = score_targets(smol, [prompt], [request.target_new])
    patch = edit(smol, request, method="mend", config={"editor": str(folder)})
    (new,) = score_targets(smol, [prompt], [request.target_new])
    assert new.mean_logprob > old.mean_logprob + 0.5  # the edit moved the model to the new target
    edited = {n for n, d in digests(smol).items() if d != before[n]}
    assert edited == set(patch.parameter_names)
    assert all(".mlp." in name for name in edited)
    assert {int(n.split(".")[2]) for n in edited} <= {27, 28, 29}  # the last three layers
    patch.save(tmp_path / "patch")
    patch.revert()
    assert digests(smol) == before  # bit-exact
    Patch.load(tmp_path / "patch").apply(smol).revert()
    assert digests(smol) == before
