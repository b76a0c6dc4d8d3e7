"""Weight patches exported as PEFT LoRA adapters reproduce the patched model through peft."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from lmscalpel import EditRequest, edit
from lmscalpel.lora_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_lora_adapter
from lmscalpel.patch import ParameterDelta, Patch, PatchError
from lmscalpel.testing import tiny_model

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome"
)
OTHER = EditRequest(
    prompt="The mother tongue of Danielle Darrieux is",
    subject="Danielle Darrieux",
    target_new="Dutch",
)
ROME = {"layer": 1, "lr": 1.0, "max_steps": 8, "clamp_norm": 10.0, "kl_factor": 0.0}
ROME.update(weight_decay=0.0, stats_samples=300, prefixes=0)
FT = {"layers": [1], "steps": 3, "lr": 0.05, "norm_constraint": None}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def through_peft(base, folder, ids):
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    peft_model.eval()
    return logits(peft_model, ids)


def check_reproduces(lm, patches, folder, **kwargs):
    base = copy.deepcopy(lm.model)
    export_lora_adapter(lm, patches, folder, **kwargs)
    ids = lm.tokenizer([REQUEST.prompt], return_tensors="pt").input_ids
    before = logits(lm.model, ids)
    for patch in patches:
        patch.apply(lm)
    try:
        patched = logits(lm.model, ids)
    finally:
        for patch in reversed(patches):
            patch.revert()
    served = through_peft(base, folder, ids)
    assert (patched - before).abs().max() > 1e-3  # the patches really change the logits
    assert (served - patched).abs().max() < 1e-5
    return json.loads((folder / ADAPTER_CONFIG).read_text())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_rome_patch_as_an_adapter_reproduces_the_patched_logits(model_type, tmp_path):
    lm = tiny_model(model_type)
    patch = edit(lm, REQUEST, method="rome", config=ROME, apply=False)
    config = check_reproduces(lm, [patch], tmp_path / "adapter")
    assert config["r"] == 1 and config["lora_alpha"] == 1
    assert config["fan_in_fan_out"] == (model_type == "gpt2")
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()


MASS = {"lr": 1.0, "max_steps": 8, "clamp_norm": 10.0, "kl_factor": 0.0, "weight_decay": 0.0}
MASS |= {"stats_samples": 300, "prefixes": 0, "layers": [1, 2]}
OTHER_METHODS = {
    "memit": MASS,
    "alphaedit": {**MASS, "null_energy": 0.1, "ridge": 0.01},
    "lora": {"lr": 0.05, "steps": 10, "layers": [1, 2]},
}


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_every_low_rank_method_s_patch_serves_as_an_adapter(method, tmp_path):
    """MEMIT's and AlphaEdit's per-layer factors (rank = requests) and LoRA's trained factors
    export exactly (MEND's: tests/test_mend.py, which has a trained editor)."""
    lm = tiny_model("llama")
    patch = edit(lm, [REQUEST, OTHER], method=method, config=OTHER_METHODS[method], apply=False)
    assert all(d.rank is not None for d in patch.deltas)  # low-rank: no SVD needed
    config = check_reproduces(lm, [patch], tmp_path / "adapter")
    assert config["r"] == max(d.rank for d in patch.deltas)


def test_stacked_patches_of_different_ranks_make_one_adapter(tmp_path):
    lm = tiny_model("llama")
    first = edit(lm, REQUEST, method="rome", config=ROME, apply=True)
    second = edit(lm, OTHER, method="rome", config={**ROME, "layer": 2}, apply=False)
    torch.manual_seed(1)
    name = lm.adapter.mlp_out_weight_name(1)
    rows, cols = lm.model.get_parameter(name).shape
    third = Patch.from_deltas(
        lm, "hand", [REQUEST], [ParameterDelta.from_low_rank(name, torch.randn(rows, 3) * 0.1,
                                                            torch.randn(3, cols) * 0.1)])  # fmt: skip
    first.revert()  # the three apply in order: the hand-made one was made over the first
    config = check_reproduces(lm, [first, second, third], tmp_path / "adapter")
    assert config["r"] == 4  # layer 1: rank 1 + 3 stacked; layer 2 padded to the same rank
    audit = json.loads((tmp_path / "adapter" / "lmscalpel_adapter.json").read_text())
    assert [p["method"] for p in audit["patches"]] == ["rome", "rome", "hand"]


def test_dense_deltas_need_a_rank_and_a_full_rank_svd_is_exact(tmp_path):
    lm = tiny_model("llama")
    patch = edit(lm, REQUEST, method="ft-l", config=FT, apply=False)
    with pytest.raises(PatchError, match="dense delta .*pass a rank"):
        export_lora_adapter(lm, patch, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    full = max(lm.model.get_parameter(n).shape[0] for n in patch.parameter_names)
    check_reproduces(lm, [patch], tmp_path / "adapter", rank=full)
    audit = json.loads((tmp_path / "adapter" / "lmscalpel_adapter.json").read_text())
    assert all(m["svd_relative_error"] < 1e-6 for m in audit["modules"].values())
    export_lora_adapter(lm, patch, tmp_path / "low", rank=1)
    audit = json.loads((tmp_path / "low" / "lmscalpel_adapter.json").read_text())
    assert all(m["svd_relative_error"] > 1e-3 for m in audit["modules"].values())


def test_what_has_no_lora_form_is_refused(tmp_path):
    lm = tiny_model("llama")
    norm = "model.layers.0.input_layernorm.weight"
    patch = Patch.from_deltas(
        lm, "hand", [REQUEST], [ParameterDelta.from_dense(norm, torch.ones(lm.adapter.hidden_size))]
    )
    with pytest.raises(PatchError, match="not a linear module"):
        export_lora_adapter(lm, patch, tmp_path / "a", rank=1)
    other = tiny_model("llama", seed=1)
    foreign = edit(other, REQUEST, method="rome", config=ROME, apply=False)
    with pytest.raises(PatchError, match="made for model"):
        export_lora_adapter(lm, foreign, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    patch = edit(lm, REQUEST, method="rome", config=ROME, apply=False)
    with pytest.raises(PatchError, match="not an exported adapter"):
        export_lora_adapter(lm, patch, tmp_path / "c")
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"


def test_apply_exports_stacked_patches_as_one_adapter_from_the_command_line(model_dir, tmp_path):
    from typer.testing import CliRunner

    from lmscalpel.cli import app
    from lmscalpel.models import load_model

    lm = load_model(model_dir)
    edit(lm, REQUEST, method="rome", config=ROME).save(tmp_path / "p1")  # applied: p2 goes over it
    edit(lm, OTHER, method="rome", config={**ROME, "layer": 2}, apply=False).save(tmp_path / "p2")
    runner = CliRunner()
    out = tmp_path / "adapter"
    args = ["apply", str(tmp_path / "p1"), str(tmp_path / "p2"), "--model", model_dir]
    result = runner.invoke(app, [*args, "--export-lora", str(out)])
    assert result.exit_code == 0, result.output
    assert "LoRA adapter written" in result.output
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 1 and len(config["target_modules"]) == 2
    result = runner.invoke(app, [*args, "--export-lora", str(tmp_path / "x"), "--lora-rank", "0"])
    assert result.exit_code == 2 and "--lora-rank must be at least 1" in result.stderr
