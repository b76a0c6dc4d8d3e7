"""MEMIT on tiny random models: the solve, its relation to ROME, the spread over layers, patches."""

import json
from pathlib import Path

import pytest
import torch

from lmscalpel import EditRequest, edit, score_targets
from lmscalpel.core.config import ConfigError
from lmscalpel.mechanics import peaks
from lmscalpel.mechanics.keys_values import (
    ValueOptions,
    anchor_states,
    optimise_value,
    optimise_values,
)
from lmscalpel.mechanics.prefixes import context_prefixes
from lmscalpel.mechanics.stats import key_statistics
from lmscalpel.methods import get_editor, memit
from lmscalpel.methods.memit import MEMITConfig, least_squares_update
from lmscalpel.methods.rome import rank_one_edit, rank_one_update
from lmscalpel.patch import Patch
from lmscalpel.testing import tiny_model

REQUESTS = [
    EditRequest(
        prompt="The Eiffel Tower is located in the city of",
        subject="Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
    ),
    EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
    ),
    EditRequest(prompt="Toko Yasuda plays the", subject="Toko Yasuda", target_new="piano"),
    EditRequest(prompt="Apple was founded by", subject="Apple", target_new="Bill Gates"),
]
# Settings under which a tiny random model learns the edits, and the solve is nearly exact.
STRONG = {"lr": 1.0, "max_steps": 12, "stop_nll": 0.0, "clamp_norm": 10.0, "kl_factor": 0.0}
STRONG |= {"weight_decay": 0.0, "stats_samples": 1500, "prefixes": 2, "prefix_length": 4}


def STRONG_VALUES():
    return {k: v for k, v in STRONG.items() if k in ValueOptions.field_names()}


@pytest.fixture(autouse=True)
def home(request, tmp_path, monkeypatch):
    """A fresh cache for the tiny models; the embedded model keeps the user's (its converted
    weights, sampled text and statistics are computed once per machine)."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))


def state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_the_least_squares_solve():
    torch.manual_seed(0)
    keys, residuals = torch.randn(3, 9), torch.randn(3, 5)
    samples = torch.randn(200, 9)
    moment = samples.T @ samples / 200
    left, right = least_squares_update(keys, residuals, moment, 2.0)
    assert left.dtype == right.dtype == torch.float64
    assert left.shape == (5, 3) and right.shape == (3, 9)
    delta = left @ right
    k, c = keys.double(), moment.double()
    # the normal equations of min ‖ΔKᵀ − Rᵀ‖² + λ tr(ΔCΔᵀ): Δ (λC + KᵀK) = Rᵀ K
    assert torch.allclose(delta @ (2.0 * c + k.T @ k), residuals.double().T @ k, atol=1e-10)
    # a vanishing λ fits the (fewer than d_k) new keys exactly
    left, right = least_squares_update(keys, residuals, moment, 1e-9)
    assert torch.allclose((left @ right) @ k.T, residuals.double().T, atol=1e-6)
    # without statistics C = I
    left, right = least_squares_update(keys, residuals, None, 2.0)
    expected = residuals.double().T @ k @ torch.linalg.inv(2.0 * torch.eye(9).double() + k.T @ k)
    assert torch.allclose(left @ right, expected, atol=1e-10)


def test_one_key_is_rome_scaled_by_the_documented_factor():
    """Sherman-Morrison: kᵀ(λC + kkᵀ)⁻¹ = (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k), so MEMIT's rank-one update is
    ROME's times s = kᵀC⁻¹k / (λ + kᵀC⁻¹k)."""
    torch.manual_seed(1)
    weight, key, delta = torch.randn(5, 7).double(), torch.randn(7).double(), torch.randn(5)
    samples = torch.randn(60, 7)
    moment = (samples.T @ samples / 60).double()
    c_inv_key = torch.linalg.solve(moment, key)
    rome_left, rome_right = rank_one_update(weight, key, weight @ key + delta, c_inv_key)
    left, right = least_squares_update(key[None], delta[None], moment, 3.0)
    s = (key @ c_inv_key) / (3.0 + key @ c_inv_key)
    assert 0 < s < 1
    assert torch.allclose(left @ right, s * (rome_left @ rome_right), atol=1e-10)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_one_request_at_one_layer_is_romes_update_up_to_the_documented_difference(model_type):
    """End to end: MEMIT with layers=[l] optimises the same δ as ROME (without exact injection;
    the step size matched, since each measures it in units of its own module's output norm) and
    writes ROME's update scaled by s."""
    lm = tiny_model(model_type)
    layer, request = 1, REQUESTS[0]
    prefixes = context_prefixes(lm, 2, 4)
    stats = key_statistics(lm, layer, samples=1500, progress=False)
    config = MEMITConfig(**{**STRONG, "layers": [layer], "mom2_weight": 0.5})
    block = lm.adapter.layer_name(layer)
    z = optimise_values(lm, layer, [request], prefixes, config, module=block)[0]
    # each measures lr and clamp_norm in units of its module's output norm: match the steps
    mlp_norm = optimise_value(lm, layer, request, prefixes, ValueOptions(max_steps=1)).value_norm
    ratio = z.value_norm / mlp_norm
    options = ValueOptions(**STRONG_VALUES()).replace(
        lr=STRONG["lr"] * ratio, clamp_norm=STRONG["clamp_norm"] * ratio
    )
    change = rank_one_edit(lm, layer, request, prefixes, stats, options, exact=False)
    assert torch.allclose(change.solution.delta, z.delta, rtol=1e-3, atol=1e-4)

    patch = edit(lm, request, method="memit", config=config, apply=False)
    assert patch.info["layers"] == [layer] and patch.deltas[0].rank == 1
    delta = patch.deltas[0].materialize(torch.float64)
    name = lm.adapter.mlp_out_weight_name(layer)
    delta = lm.adapter.to_storage(name, delta)  # back to (out, in)
    key = change.key
    c_inv_key = stats.solve(key)
    s = (key @ c_inv_key) / (config.mom2_weight * key.numel() + key @ c_inv_key)
    rome = change.left @ change.right
    assert torch.allclose(delta, s * rome, rtol=1e-3, atol=1e-5 * float(rome.abs().max()))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "gpt_neox"])
def test_after_a_batch_every_request_reaches_its_target_hidden_state(model_type):
    """With a small λ the spread realises each request's z at the top layer (averaged over the
    prefixes, like the keys): the last layer's update maps each key to its target value."""
    lm = tiny_model(model_type)
    config = MEMITConfig(**{**STRONG, "layers": [1, 2], "mom2_weight": 1e-4})
    prefixes = context_prefixes(lm, config.prefixes, config.prefix_length)
    block = lm.adapter.layer_name(2)
    solutions = optimise_values(lm, 2, REQUESTS, prefixes, config, module=block, batch_size=32)
    targets = torch.stack([s.output + s.delta for s in solutions])
    saved = state(lm)
    patch = edit(lm, REQUESTS, method="memit", config=config)
    assert [d.rank for d in patch.deltas] == [4, 4]  # low-rank: 4 (out + in) < out · in
    _, reached = anchor_states(lm, REQUESTS, prefixes, outputs=[block])
    for i, solution in enumerate(solutions):
        error = (reached[block][i] - targets[i]).norm() / solution.delta.norm()
        assert error < 1e-3, (i, float(error))
    patch.revert()
    assert all(torch.equal(p, saved[n]) for n, p in lm.model.named_parameters())


def test_residuals_are_spread_from_the_lowest_layer_up(tiny):
    config = MEMITConfig(**{**STRONG, "layers": [2, 0, 1], "mom2_weight": 1e-4})
    patch = edit(tiny, REQUESTS[:2], method="memit", config=config, apply=False)
    shares = patch.info["layer_updates"]
    assert [u["layer"] for u in shares] == [0, 1, 2]
    # with an exact fit every layer writes 1/(layers left) of what remains: equal shares
    norms = [u["residual_norm"] for u in shares]
    assert max(norms) / min(norms) < 1.05, norms
    assert patch.hyperparameters["layers"] == [0, 1, 2]
    assert len(patch.info["requests"]) == 2 and "edit" in patch.info["seconds"]


def test_many_requests_are_stored_dense_and_1000_edits_round_trip_bit_exactly(tiny, tmp_path):
    requests = [
        EditRequest(prompt=f"Item {i} of the list is named", subject=f"Item {i}", target_new="Rome")
        for i in range(1000)
    ]
    config = {"layers": [1, 2], "max_steps": 1, "prefixes": 0, "stats_samples": 400}
    saved = state(tiny)
    patch = edit(tiny, requests, method="memit", config={**config, "batch_size": 500})
    assert [d.rank for d in patch.deltas] == [None, None]  # 1000 (out + in) > out · in: dense
    edited = state(tiny)
    assert any(not torch.equal(edited[n], saved[n]) for n in patch.parameter_names)
    patch.revert()
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())

    folder = patch.save(tmp_path / "thousand")
    loaded = Patch.load(folder)
    assert len(loaded.requests) == 1000 and loaded.info["layers"] == [1, 2]
    for mine, theirs in zip(patch.deltas, loaded.deltas):
        assert torch.equal(mine.dense, theirs.dense)
    loaded.apply(tiny)
    assert all(torch.equal(p, edited[n]) for n, p in tiny.model.named_parameters())
    loaded.revert()
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())
    assert json.loads((Path(folder) / "patch.json").read_text())["method"] == "memit"


def test_compute_leaves_the_model_untouched_also_on_error(tiny, monkeypatch):
    saved = state(tiny)
    config = MEMITConfig(**{**STRONG, "layers": [1, 2], "max_steps": 2})
    edit(tiny, REQUESTS[:2], method="memit", config=config, apply=False)
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())
    real, calls = memit.AnchorStates.read, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after layer 1 was written into the weights
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(memit.AnchorStates, "read", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        edit(tiny, REQUESTS[:2], method="memit", config=config)
    assert all(torch.equal(p, saved[n]) for n, p in tiny.model.named_parameters())
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_layers_come_from_the_traced_peak_else_the_family_depth(tiny, monkeypatch):
    config = MEMITConfig(span=2)
    assert config.edit_layers(30) == [6, 7]  # llama's first_depth 0.2 of 29 -> 6
    assert MEMITConfig.for_model("llama").first_depth == pytest.approx(0.13)
    assert MEMITConfig(layers=[-2, 1, 1]).edit_layers(4) == [1, 2]
    assert MEMITConfig(span=5).edit_layers(4) == [0, 1, 2]  # a shallow model: all but the top
    with pytest.raises(ConfigError, match="last layer"):
        MEMITConfig(layers=[1, -1]).edit_layers(4)
    peak = peaks.TracedPeak(layer=3, facts=100, window=2, model=tiny.name, source="test")
    monkeypatch.setitem(peaks.MEASURED, tiny.fingerprint, peak)
    assert MEMITConfig(span=2).edit_layers(4, tiny.fingerprint) == [1, 2]  # shifted down
    monkeypatch.setitem(peaks.MEASURED, tiny.fingerprint, peaks.TracedPeak(1, 100, 2, "t", "t"))
    editor = get_editor("memit", {"span": 2})
    assert editor.config_for(tiny).layers == [1, 2]  # resolved, so manifests record it
    # the embedded model: span 5 from its shipped peak, layer 4
    assert MEMITConfig().edit_layers(30, "fe072e9ea3f8cab6") == [4, 5, 6, 7, 8]


def test_configuration_bounds():
    with pytest.raises(ConfigError, match="mom2_weight"):
        MEMITConfig(mom2_weight=0.0)
    with pytest.raises(ConfigError, match="span"):
        MEMITConfig(span=0)
    with pytest.raises(ConfigError, match="batch_size"):
        MEMITConfig(batch_size=0)
    with pytest.raises(ConfigError, match="layer 7 out of range"):
        MEMITConfig(layers=[7]).edit_layers(4)
    help_lines = {f.name: f.help for f in MEMITConfig.describe()}
    assert "d_k" in help_lines["mom2_weight"] and help_lines["stats_corpus"]


EDIT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact"


@pytest.mark.real
@pytest.mark.slow
def test_a_batch_of_50_counterfact_edits_on_the_embedded_model(smol):
    """MEMIT's own setting, reduced: 50 CounterFact cases in one call with the defaults (layers 4-8
    from the traced peak, statistics from model-sampled text, computed once if missing)."""
    path = EDIT_DATA / "edit.json"
    if not path.is_file():
        pytest.skip(f"CounterFact data not found at {path}")
    records = json.loads(path.read_text())[:50]
    requests = [
        EditRequest(
            prompt=r["prompt"],
            subject=r["subject"],
            target_new=r["target_new"],
            target_true=r["ground_truth"],
        )
        for r in records
    ]

    def efficacy() -> float:
        prompts = [r.prompt for r in requests]
        new = score_targets(smol, prompts, [r.target_new for r in requests])
        true = score_targets(smol, prompts, [r.target_true for r in requests])
        return sum(a.mean_logprob > b.mean_logprob for a, b in zip(new, true)) / len(requests)

    before = efficacy()
    patch = edit(smol, requests, method="memit")
    try:
        assert patch.info["layers"] == [4, 5, 6, 7, 8]
        after = efficacy()
        assert after >= 0.9, (before, after)
    finally:
        patch.revert()
    assert efficacy() == before
