"""ROME on tiny random models: the rank-one math, the storage layouts, the editor's contract."""

import re
from pathlib import Path

import pytest
import torch

from lmscalpel import EditRequest, edit, score_targets
from lmscalpel.core.config import ConfigError
from lmscalpel.mechanics import peaks
from lmscalpel.mechanics import prefixes as prefixes_module
from lmscalpel.mechanics.anchored import AnchoredBatch, AnchoredRun
from lmscalpel.mechanics.keys_values import (
    ValueOptions,
    compute_keys,
    context_rows,
    injection_scales,
    optimise_value,
)
from lmscalpel.mechanics.prefixes import context_prefixes
from lmscalpel.mechanics.stats import key_statistics
from lmscalpel.methods import get_editor, rome
from lmscalpel.methods.rome import ROMEConfig, rank_one_edit, rank_one_update
from lmscalpel.testing import tiny_model

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
)
OTHER = EditRequest(
    prompt="The mother tongue of Danielle Darrieux is",
    subject="Danielle Darrieux",
    target_new="Rome",
)
# A configuration under which a tiny random model really learns the edit.
STRONG = {"layer": 1, "lr": 1.0, "max_steps": 20, "clamp_norm": 10.0, "kl_factor": 0.0}
STRONG.update(weight_decay=0.0, stats_samples=1500, prefixes=0)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))


def state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def logp(lm, request, target):
    return score_targets(lm, [request.prompt], [target])[0].mean_logprob


def test_rank_one_update_maps_the_key_and_spares_c_orthogonal_keys():
    torch.manual_seed(0)
    weight, key, value = torch.randn(5, 7), torch.randn(7), torch.randn(5)
    samples = torch.randn(50, 7)
    moment = (samples.T @ samples / 50).double()
    c_inv_key = torch.linalg.solve(moment, key.double())
    left, right = rank_one_update(weight, key, value, c_inv_key)
    new = weight.double() + left @ right
    assert torch.allclose(new @ key.double(), value.double(), atol=1e-10)
    other = torch.randn(7).double()
    orthogonal = other - (other @ c_inv_key) / (c_inv_key @ c_inv_key) * c_inv_key
    assert abs(orthogonal @ c_inv_key) < 1e-10
    assert torch.allclose(new @ orthogonal, weight.double() @ orthogonal, atol=1e-10)
    # without statistics the update is along k* itself
    _, right_identity = rank_one_update(weight, key, value)
    assert torch.allclose(right_identity[0] * (key @ key), key.double(), atol=1e-6)
    with pytest.raises(ValueError, match="degenerate"):
        rank_one_update(weight, torch.zeros(7), value)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_patched_matrix_maps_k_star_to_v_star(model_type):
    """After applying the patch, the MLP output module itself (GPT-2: a transposed Conv1D) maps
    k* to v* (plus its bias) and a C⁻¹-orthogonal key exactly as before."""
    lm = tiny_model(model_type)
    config = ROMEConfig.for_model(lm.model_type, **STRONG)
    layer = config.edit_layer(lm.adapter.num_layers)
    prefixes = context_prefixes(lm, config.prefixes, config.prefix_length)
    stats = key_statistics(lm, layer, samples=config.stats_samples, progress=False)
    change = rank_one_edit(lm, layer, REQUEST, prefixes, stats, config)
    module = lm.adapter.mlp_out(layer)
    c_inv_key = stats.solve(change.key)
    torch.manual_seed(1)
    other = torch.randn_like(c_inv_key)
    orthogonal = (other - (other @ c_inv_key) / (c_inv_key @ c_inv_key) * c_inv_key).float()
    with torch.no_grad():
        before_orthogonal = module(orthogonal[None])[0]
        bias = module(torch.zeros_like(orthogonal)[None])[0]

    patch = edit(lm, REQUEST, method="rome", config=config)
    name = lm.adapter.mlp_out_weight_name(layer)
    assert patch.parameter_names == [name] and patch.deltas[0].rank == 1
    stored = lm.model.get_parameter(name)
    if model_type == "gpt2":  # Conv1D stores (in, out)
        assert lm.adapter.is_transposed(name) and stored.shape[0] == change.key.shape[0]
    with torch.no_grad():
        mapped = module(change.key.float()[None])[0] - bias
        after_orthogonal = module(orthogonal[None])[0]
    value = change.value.float()
    assert (mapped - value).norm() / value.norm() < 1e-4
    assert torch.allclose(after_orthogonal, before_orthogonal, atol=1e-4)
    assert change.solution.steps > 0 and change.solution.delta.norm() > 0


def test_an_edit_flips_a_tiny_model_and_reverts_bit_exactly(tiny):
    saved = state(tiny)
    before = logp(tiny, REQUEST, "Rome")
    patch = edit(tiny, REQUEST, method="rome", config=STRONG)
    assert logp(tiny, REQUEST, "Rome") > before + 2.0
    assert logp(tiny, REQUEST, "Rome") > logp(tiny, REQUEST, "Paris")
    assert patch.info["requests"][0]["steps"] >= 1
    patch.revert()
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())


def test_several_requests_make_one_rank_r_delta(tiny):
    before = [logp(tiny, REQUEST, "Rome"), logp(tiny, OTHER, "Rome")]
    patch = edit(tiny, [REQUEST, OTHER], method="rome", config=STRONG)
    assert len(patch.deltas) == 1 and patch.deltas[0].rank == 2
    assert logp(tiny, REQUEST, "Rome") > before[0] + 1.0
    assert logp(tiny, OTHER, "Rome") > before[1] + 1.0
    assert len(patch.info["requests"]) == 2


THIRD = EditRequest(prompt="Miles Davis plays the", subject="Miles Davis", target_new="violin")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_group_of_requests_is_the_same_edits_as_one_call_each(model_type):
    """ROME's call with several requests edits them one at a time, each on the model carrying the
    earlier ones, so a sequence in groups (benchmarks/mass_lifelong.py's sequential-100) passes
    through the same models as the same sequence one request per call (sequential-1), up to the
    float rounding of applying one summed patch instead of several."""
    requests = [REQUEST, OTHER, THIRD]
    grouped, single = tiny_model(model_type), tiny_model(model_type)
    name = grouped.adapter.mlp_out_weight_name(STRONG["layer"])
    before = grouped.model.get_parameter(name).detach().clone()
    patch = edit(grouped, requests, method="rome", config=STRONG)
    patches = [edit(single, request, method="rome", config=STRONG) for request in requests]
    one, many = grouped.model.get_parameter(name), single.model.get_parameter(name)
    change = (one - before).norm()
    assert change > 0.1 * before.norm()  # three real edits, not a no-op
    assert (one - many).norm() < 1e-5 * change
    for kept, alone in zip(patch.info["requests"], (p.info["requests"][0] for p in patches)):
        assert kept["steps"] == alone["steps"]
        assert kept["nll"] == pytest.approx(alone["nll"], rel=1e-4, abs=1e-5)


def test_compute_leaves_the_model_untouched_also_on_error(tiny, monkeypatch):
    saved = state(tiny)
    patch = edit(tiny, [REQUEST, OTHER], method="rome", config=STRONG, apply=False)
    assert not patch.is_applied
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())

    calls = {"n": 0}
    real = rome.optimise_value

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first request was written into the weights
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(rome, "optimise_value", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        edit(tiny, [REQUEST, OTHER], method="rome", config=STRONG)
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_statistics_off_updates_along_the_key(tiny):
    config = ROMEConfig(**{**STRONG, "statistics": False})
    patch = edit(tiny, REQUEST, method="rome", config=config, apply=False)
    prefixes = context_prefixes(tiny, config.prefixes, config.prefix_length)
    key = compute_keys(tiny, 1, [REQUEST], prefixes)[0]
    right = patch.deltas[0].right[0]
    assert torch.allclose(right * (key @ key), key, rtol=1e-4, atol=1e-5)


def test_keys_of_the_value_pass_are_the_shared_keys(any_tiny):
    prefixes = ["", "Once upon a time. ", "I think. "]
    solution = optimise_value(any_tiny, 1, REQUEST, prefixes, ValueOptions(max_steps=1))
    keys = compute_keys(any_tiny, 1, [REQUEST, OTHER], prefixes)
    assert torch.allclose(solution.key, keys[0], atol=1e-5)
    assert not torch.allclose(keys[0], keys[1])


def test_early_stop_when_the_target_is_already_likely(tiny):
    solution = optimise_value(tiny, 1, REQUEST, [""], ValueOptions(stop_nll=100.0))
    assert solution.steps == 0 and solution.delta.abs().sum() == 0
    solution = optimise_value(tiny, 1, REQUEST, [""], ValueOptions(stop_nll=0.0, max_steps=3))
    assert solution.steps == 3 and solution.nll[-1] < solution.nll[0]


def test_the_norm_bound_holds(tiny):
    options = ValueOptions(lr=5.0, max_steps=5, stop_nll=0.0, clamp_norm=0.5, weight_decay=0.0)
    solution = optimise_value(tiny, 1, REQUEST, [""], options)
    assert solution.delta.norm() <= 0.5 * solution.value_norm * (1 + 1e-5)


def test_configuration(tiny):
    assert ROMEConfig.for_model("gpt2").default_depth == pytest.approx(0.36)
    assert ROMEConfig(default_depth=0.5).edit_layer(4) == 2
    assert ROMEConfig(layer=-1).edit_layer(30) == 29
    with pytest.raises(ConfigError, match="placeholder"):
        ROMEConfig(kl_prompt="is a")
    with pytest.raises(ConfigError, match="out of range"):
        edit(tiny, REQUEST, method="rome", config={"layer": 9})
    with pytest.raises(ConfigError, match="unknown"):
        edit(tiny, REQUEST, method="rome", config={"layers": [1]})


def test_context_prefixes_are_generated_once_and_cached(tiny, monkeypatch):
    first = context_prefixes(tiny, 3, 4)
    assert first[0] == "" and len(first) == 4
    assert all(p.endswith(". ") and "\n" not in p for p in first[1:])
    computed, loaded = prefixes_module.PREFIXES.computed, prefixes_module.PREFIXES.loaded
    prefixes_module.PREFIXES.forget()  # as a fresh process: nothing in memory
    monkeypatch.setattr(prefixes_module, "generate", lambda *a, **k: pytest.fail("regenerated"))
    assert context_prefixes(tiny, 3, 4) == first  # read from disk
    assert prefixes_module.PREFIXES.computed == computed
    assert prefixes_module.PREFIXES.loaded == loaded + 1


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_exact_injection_is_what_the_update_adds(model_type):
    """The per-position scales used while optimising δ reproduce, at every recomputed position,
    the change that the rank-one update makes to the MLP output."""
    lm = tiny_model(model_type)
    layer, name = 1, lm.adapter.mlp_out_name(1)
    stats = key_statistics(lm, layer, samples=1500, progress=False)
    rows = context_rows(REQUEST, ["", "I think. "]) + context_rows(OTHER, [""])
    batch = AnchoredBatch.build(lm, rows)
    run = AnchoredRun(lm, batch, layer, captures=[name])
    scales = injection_scales(run, name, 2, stats.solve)
    keys = run.captured[name].input
    key = keys[:2, 0].double().mean(0)
    torch.manual_seed(0)
    delta = torch.randn(lm.adapter.hidden_size).double()
    weight = lm.adapter.mlp_out_weight(layer)
    left, right = rank_one_update(weight, key, weight.double() @ key + delta, stats.solve(key))
    with torch.no_grad():
        change = keys.double() @ (left @ right).T  # (B, S, d): what W' - W adds per position
    real = batch.attention_mask[:, batch.anchor :].bool()
    expected = scales.double()[..., None] * delta
    assert torch.allclose(change[real], expected[real], atol=1e-5)
    assert torch.allclose(scales[:2, 0].mean(), torch.tensor(1.0), atol=1e-4)


def test_prepare_caches_prefixes_and_statistics_before_any_edit(tiny, tmp_path):
    editor = get_editor("rome", {"layer": 1, "stats_samples": 200, "prefixes": 2})
    editor.prepare(tiny, editor.config_for(tiny))
    home = tmp_path / "home"
    assert (home / "prefixes" / f"{tiny.fingerprint}.json").is_file()
    stats_files = list((home / "stats" / tiny.fingerprint).glob("*.safetensors"))
    assert len(stats_files) == 1 and "layers.1." in stats_files[0].name
    assert get_editor("ft-l").prepare(tiny, get_editor("ft-l").config_for(tiny)) is None


def test_the_default_layer_is_the_traced_mlp_peak_when_the_model_was_traced(tiny):
    from lmscalpel.mechanics.peaks import MIN_FACTS, record_peak, traced_peak

    config = ROMEConfig(default_depth=0.5)
    assert traced_peak(tiny.fingerprint) is None
    assert config.edit_layer(4, tiny.fingerprint) == 2  # never traced: the family's depth
    summary = {"mlp_peak_layer": 1, "window": 2, "model": tiny.name}
    summary |= {"fingerprint": tiny.fingerprint, "facts_traced": MIN_FACTS - 1}
    assert record_peak(summary) is None  # too few facts to become a default
    assert config.edit_layer(4, tiny.fingerprint) == 2
    assert record_peak({**summary, "facts_traced": MIN_FACTS}).layer == 1
    assert config.edit_layer(4, tiny.fingerprint) == 1
    assert ROMEConfig(layer=3).edit_layer(4, tiny.fingerprint) == 3  # an explicit layer wins
    assert get_editor("rome").config_for(tiny).layer == 1  # resolved, so run manifests record it
    quick = {k: v for k, v in STRONG.items() if k != "layer"} | {"max_steps": 2}
    patch = edit(tiny, REQUEST, method="rome", config=quick)
    assert patch.info["layer"] == 1


def test_a_shipped_peak_is_the_layer_rome_edits(tiny, monkeypatch):
    """A peak shipped in peaks.MEASURED for a model's fingerprint is the layer ROME edits on it
    when the config names none (the embedded model's entry is the peak documented in
    docs/causal_tracing.md; test_rome_real checks that fingerprint on the real model)."""
    quick = {k: v for k, v in STRONG.items() if k != "layer"} | {"max_steps": 1}
    depth_layer = edit(tiny, REQUEST, method="rome", config=quick, apply=False).info["layer"]
    shipped = 3 if depth_layer != 3 else 2
    peak = peaks.TracedPeak(layer=shipped, facts=100, window=2, model=tiny.name, source="test")
    monkeypatch.setitem(peaks.MEASURED, tiny.fingerprint, peak)
    patch = edit(tiny, REQUEST, method="rome", config=quick, apply=False)
    assert patch.info["layer"] == shipped
    assert patch.parameter_names == [tiny.adapter.mlp_out_weight_name(shipped)]

    doc = Path(__file__).parents[1] / "docs" / "causal_tracing.md"
    documented = re.search(r"MLP effect peaks at layer (\d+)", doc.read_text(encoding="utf-8"))
    assert documented, "docs/causal_tracing.md no longer states the embedded model's MLP peak"
    assert peaks.MEASURED["fe072e9ea3f8cab6"].layer == int(documented.group(1))
