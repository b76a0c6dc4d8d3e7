"""Devices, dtypes and accelerate dispatch: every combination edits, evaluates and traces.

The combinations are those this CPU-only machine can run: float32, bfloat16 and float16 on the
CPU, and a model dispatched by accelerate with layers offloaded to the CPU and to disk (its hooks
really present) and the edited layer resident.
"""

import pytest
import torch

from lmscalpel import EditRequest, edit, score_targets
from lmscalpel.evaluation import EvalOptions, evaluate
from lmscalpel.locate.tracing import trace
from lmscalpel.models import load_model, model_fingerprint
from lmscalpel.models.placement import (
    OffloadedWeightError,
    PlacementError,
    offloaded_parameters,
    resolve_device,
    resolve_dtype,
)
from lmscalpel.testing import weight_copy as weights
from test_evaluation_protocols import make_cases

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome"
)
ROME = {"layer": 1, "lr": 1.0, "max_steps": 8, "clamp_norm": 10.0, "kl_factor": 0.0}
ROME.update(weight_decay=0.0, stats_samples=300, prefixes=0)
METHODS = {
    "rome": ROME,
    "memit": {**{k: v for k, v in ROME.items() if k != "layer"}, "layers": [1]},
    "ft-l": {"layers": [1], "steps": 3, "lr": 0.05},
}
#: layers 0 and 2 on disk, 3 on the CPU's offload (kept by accelerate's hooks), 1 resident
OFFLOAD = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    torch.set_num_threads(1)


def placed(model_dir, placement, tmp_path):
    if placement == "dispatched":
        lm = load_model(model_dir, device_map=OFFLOAD, offload_folder=tmp_path / "offload")
        assert offloaded_parameters(lm.model)  # accelerate's hooks really hold some weights
        return lm
    return load_model(model_dir, dtype=placement)


def test_devices_and_dtypes_by_name():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype(None) is torch.float32
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(PlacementError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(PlacementError, match="no CUDA GPU"):
            resolve_device("cuda:1")
    with pytest.raises(PlacementError, match="unknown dtype"):
        resolve_dtype("int8")


def test_a_dispatched_model_has_the_fingerprint_of_the_same_model_loaded_whole(model_dir, tmp_path):
    whole = load_model(model_dir)
    dispatched = placed(model_dir, "dispatched", tmp_path)
    assert dispatched.fingerprint == whole.fingerprint == model_fingerprint(dispatched.model)
    assert dispatched.device == torch.device("cpu")
    with pytest.raises(PlacementError, match="only apply with a device_map"):
        load_model(model_dir, max_memory={"cpu": "1GiB"})


@pytest.mark.parametrize("placement", ["float32", "bfloat16", "float16", "dispatched"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_placement_edits_and_reverts_bit_exactly(model_dir, tmp_path, placement, method):
    lm = placed(model_dir, placement, tmp_path)
    before, logp = weights(lm), score_targets(lm, [REQUEST.prompt], ["Rome"])[0].mean_logprob
    patch = edit(lm, REQUEST, method=method, config=METHODS[method])
    for delta in patch.deltas:  # in float32 or better, or in the parameter's own dtype
        stored = delta.dense if delta.dense is not None else delta.left
        dtypes = (torch.float32, torch.float64, lm.model.get_parameter(delta.name).dtype)
        assert stored.dtype in dtypes
        assert torch.isfinite(delta.materialize(torch.float64)).all()
    after = score_targets(lm, [REQUEST.prompt], ["Rome"])[0].mean_logprob
    assert after > logp + 0.05  # the edit took, in every dtype
    patch.revert()
    assert all(torch.equal(before[n], p) for n, p in weights(lm).items())


@pytest.mark.parametrize("method", ["rome", "ft-l"])
def test_an_edit_of_an_offloaded_weight_is_refused_and_changes_nothing(model_dir, tmp_path, method):
    lm = placed(model_dir, "dispatched", tmp_path)
    before = weights(lm)
    config = {**METHODS[method], **({"layer": 2} if method == "rome" else {"layers": [2]})}
    with pytest.raises(OffloadedWeightError, match=r"model\.layers\.2\..* offloaded"):
        edit(lm, REQUEST, method=method, config=config)
    assert all(torch.equal(before[n], p) for n, p in weights(lm).items())


@pytest.mark.parametrize("placement", ["bfloat16", "dispatched"])
def test_every_placement_evaluates_and_traces(model_dir, tmp_path, placement):
    lm = placed(model_dir, placement, tmp_path)
    options = EvalOptions(fluency_cases=1, fluency_prompts=1, fluency_tokens=4, exact_match=False)
    summary = evaluate(lm, make_cases(2), "rome", ROME, options=options, out=tmp_path / "run",
                       progress=False)  # fmt: skip
    assert summary.rows["rome"]["ES"] >= 0.5
    result = trace(lm, REQUEST.prompt, REQUEST.subject, kinds="hidden", samples=2)
    restored = result.restored["hidden"]
    assert torch.isfinite(restored[~restored.isnan()]).all() and (~restored.isnan()).any()
