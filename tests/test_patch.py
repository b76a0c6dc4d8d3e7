import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmscalpel import EditRequest, Patch, PatchError, PatchMismatchError
from lmscalpel.models import rewriters
from lmscalpel.patch import ParameterDelta, WeightSnapshot, weight_snapshot
from lmscalpel.testing import tiny_model

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome"
)


def state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def assert_same(lm, saved):
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, saved[n]), n


def make_patch(lm, low_rank=True, layer=1):
    name = lm.adapter.mlp_out_weight_name(layer)
    shape = lm.model.get_parameter(name).shape
    torch.manual_seed(3)
    if low_rank:
        delta = ParameterDelta.from_low_rank(
            name, torch.randn(shape[0], 1), torch.randn(1, shape[1])
        )
    else:
        delta = ParameterDelta.from_dense(name, torch.randn(shape) * 0.1)
    return Patch.from_deltas(lm, "test", [REQUEST], [delta], {"alpha": 1})


@pytest.mark.parametrize("low_rank", [True, False])
def test_apply_changes_and_revert_restores_bit_exactly(tiny, low_rank):
    saved = state(tiny)
    patch = make_patch(tiny, low_rank)
    patch.apply(tiny)
    name = patch.parameter_names[0]
    expected = saved[name] + patch.deltas[0].materialize(torch.float32)
    assert torch.equal(tiny.model.get_parameter(name), expected)
    patch.revert()
    assert_same(tiny, saved)


def test_double_apply_and_revert_without_apply_are_refused(tiny):
    patch = make_patch(tiny)
    with pytest.raises(PatchError, match="not applied"):
        patch.revert()
    patch.apply(tiny)
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(tiny)


def test_patches_revert_in_reverse_order(tiny):
    saved = state(tiny)
    first = make_patch(tiny).apply(tiny)
    second = make_patch(tiny, low_rank=False).apply(tiny)  # computed on the edited model
    with pytest.raises(PatchError, match="reverse order"):
        first.revert()
    second.revert()
    first.revert()
    assert_same(tiny, saved)


def test_refuses_a_model_with_different_weights_and_leaves_it_untouched():
    patch = make_patch(tiny_model("llama", seed=0))
    other = tiny_model("llama", seed=1)
    saved = state(other)
    with pytest.raises(PatchMismatchError, match="weights differ"):
        patch.apply(other)
    assert_same(other, saved)
    with pytest.raises(PatchMismatchError, match="no such parameter"):
        patch.apply(tiny_model("gpt2"))


def test_save_load_roundtrip_gives_identical_answers(tmp_path, tiny):
    patch = make_patch(tiny)
    folder = patch.save(tmp_path / "edit.patch")
    meta = json.loads((folder / "patch.json").read_text())
    assert meta["method"] == "test" and meta["parameters"][0]["rank"] == 1
    assert meta["requests"][0]["target_new"] == "Rome"
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.bin"))  # never pickle
    loaded = Patch.load(folder)
    ids = torch.tensor([tiny.tokenizer(REQUEST.prompt)["input_ids"]])
    with patch.applied(tiny):
        expected = tiny.model(ids).logits
    fresh = tiny_model("llama")
    loaded.apply(fresh)
    assert torch.equal(fresh.model(ids).logits, expected)


def test_load_rejects_non_patches(tmp_path):
    with pytest.raises(PatchError, match="not a saved patch"):
        Patch.load(tmp_path)


def test_gpt2_transposed_patch(tiny_gpt2):
    saved = state(tiny_gpt2)
    patch = make_patch(tiny_gpt2).apply(tiny_gpt2)
    patch.revert()
    assert_same(tiny_gpt2, saved)


def test_export_loads_with_transformers_alone(tmp_path, tiny):
    patch = make_patch(tiny)
    saved = state(tiny)
    folder = patch.export(tiny, tmp_path / "edited")
    assert_same(tiny, saved)  # export leaves the model as it was
    plain = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tiny.tokenizer(REQUEST.prompt)["input_ids"]])
    with patch.applied(tiny), torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, tiny.model(ids).logits)
    assert (folder / "lmscalpel_patch.json").is_file()


def test_delta_shape_is_checked():
    with pytest.raises(PatchError, match="either dense or both"):
        ParameterDelta("w", (2, 2))
    with pytest.raises(PatchError, match="shape"):
        ParameterDelta("w", (2, 3), dense=torch.zeros(2, 2))


def test_weight_snapshot_restores_on_error(tiny):
    saved = state(tiny)
    with pytest.raises(RuntimeError), weight_snapshot(tiny):
        for p in tiny.model.parameters():
            p.data.add_(1.0)
        raise RuntimeError("crash mid-edit")
    assert_same(tiny, saved)


def test_revert_checks_that_the_restored_weights_have_their_digests(tiny):
    """A revert that does not give back the exact weights the patch was computed on is an error,
    not a silent drift (here the backup is damaged while the patch is applied)."""
    patch = make_patch(tiny).apply(tiny)
    name = patch.parameter_names[0]
    patch._backup[name][0, 0] += 1.0
    with pytest.raises(PatchError, match="bit-exactly"):
        patch.revert()


class _Echo:
    def __init__(self, patches):
        self.count = len(patches)

    def rewrite(self, prompt):
        return f"[{self.count}] {prompt}"


@pytest.fixture
def echo_method():
    rewriters.register_rewriter("test-echo", lambda patches, lm: _Echo(patches))
    yield "test-echo"
    rewriters._BUILDERS.pop("test-echo")


def test_an_in_context_patch_reverts_itself_not_an_equal_one(tiny, echo_method):
    """Two equal in-context patches: reverting the later one takes that very object off the model
    (a removal by equality would take the earlier one and leave it applied)."""
    first = Patch(echo_method, [REQUEST], kind="context", context_state={}, created="t")
    second = Patch(echo_method, [REQUEST], kind="context", context_state={}, created="t")
    assert first == second
    first.apply(tiny)
    second.apply(tiny)
    assert tiny.render_prompt("x") == "[2] x"
    second.revert()
    assert len(tiny.context_patches) == 1 and tiny.context_patches[0] is first
    assert first.is_applied and not second.is_applied
    first.revert()
    assert tiny.context_patches == [] and tiny.render_prompt("x") == "x"


def test_an_in_context_patch_taken_off_behind_its_back_cannot_revert(tiny, echo_method):
    patch = Patch(echo_method, [REQUEST], kind="context", context_state={}).apply(tiny)
    tiny.context_patches.clear()
    with pytest.raises(PatchError, match="not applied to this model once"):
        patch.revert()


def test_a_weight_snapshot_keeps_the_first_copy_and_verifies_its_restoration(tiny):
    saved = state(tiny)
    name = make_patch(tiny).parameter_names[0]
    snapshot = WeightSnapshot(tiny, [name])
    with torch.no_grad():
        tiny.model.get_parameter(name).add_(1.0)
    snapshot.take([name])  # already held: the pristine copy stays
    snapshot.restore()
    assert_same(tiny, saved)
    snapshot.saved[name][0, 0] += 1.0  # a damaged copy restores something else: refused
    with pytest.raises(PatchError, match="bit-exactly"):
        snapshot.restore()
