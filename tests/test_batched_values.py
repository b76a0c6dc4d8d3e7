"""Batched value optimisation: N requests together give each the δ it gets alone."""

import pytest
import torch

from lmscalpel import EditRequest
from lmscalpel.mechanics import keys_values
from lmscalpel.mechanics.anchored import AnchoredBatch, AnchoredRun
from lmscalpel.mechanics.keys_values import (
    AnchorStates,
    DivergedError,
    ValueOptions,
    anchor_states,
    compute_keys,
    context_rows,
    optimise_value,
    optimise_values,
)
from lmscalpel.mechanics.stats import key_statistics
from lmscalpel.methods import rome
from lmscalpel.testing import tiny_model

REQUESTS = [
    EditRequest(
        prompt="The Eiffel Tower is located in the city of",
        subject="Eiffel Tower",
        target_new="Rome",
    ),
    EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
    ),
    EditRequest(prompt="Toko Yasuda plays the", subject="Toko Yasuda", target_new="piano"),
    EditRequest(prompt="Apple was founded by", subject="Apple", target_new="Bill Gates"),
    EditRequest(
        prompt="The capital of Japan is Tokyo. Michel Rocard speaks",
        subject="Michel Rocard",
        target_new="German",
    ),
]
PREFIXES = ["", "Once upon a time. ", "I think. "]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))


def staggered_options(lm, solver):
    """Options under which the requests stop at different steps: the stop is the median of
    their NLLs after four steps."""
    probe = ValueOptions(lr=1.0, max_steps=4, stop_nll=0.0, kl_factor=0.25)
    curves = [optimise_value(lm, 1, r, PREFIXES, probe, key_solver=solver).nll for r in REQUESTS]
    stop = sorted(c[-1] for c in curves)[len(curves) // 2]
    return ValueOptions(lr=1.0, max_steps=8, stop_nll=stop, kl_factor=0.25)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "gemma3_text"])
@pytest.mark.parametrize("exact", [False, True])
def test_batched_values_equal_one_at_a_time(model_type, exact):
    lm = tiny_model(model_type)
    solver = key_statistics(lm, 1, samples=800, progress=False).solve if exact else None
    options = staggered_options(lm, solver)
    alone = [optimise_value(lm, 1, r, PREFIXES, options, key_solver=solver) for r in REQUESTS]
    steps = [s.steps for s in alone]
    assert len(set(steps)) > 1, steps  # the requests really stop at different steps
    for batch_size in (None, 2):
        together = optimise_values(
            lm, 1, REQUESTS, PREFIXES, options, key_solver=solver, batch_size=batch_size
        )
        assert [s.steps for s in together] == steps
        for one, many in zip(alone, together):
            assert torch.allclose(many.delta, one.delta, rtol=1e-4, atol=1e-5)
            assert many.nll == pytest.approx(one.nll, abs=1e-4)
            assert many.kl == pytest.approx(one.kl, abs=1e-4)
            assert torch.allclose(many.keys, one.keys, atol=1e-5)
            assert torch.allclose(many.outputs, one.outputs, atol=1e-5)
            assert many.value_norm == pytest.approx(one.value_norm, rel=1e-5)


def test_one_request_is_the_single_path_bit_for_bit(tiny):
    stats = key_statistics(tiny, 1, samples=800, progress=False)
    options = ValueOptions(lr=1.0, max_steps=5, stop_nll=0.0)
    one = optimise_value(tiny, 1, REQUESTS[0], PREFIXES, options, key_solver=stats.solve)
    many = optimise_values(tiny, 1, REQUESTS[:1], PREFIXES, options, key_solver=stats.solve)[0]
    assert torch.equal(one.delta, many.delta) and one.nll == many.nll


def test_values_at_a_block_output_and_their_targets(tiny):
    """MEMIT's use: δ at a block's output; ``output`` is the unedited hidden state there."""
    block = tiny.adapter.layer_name(2)
    options = ValueOptions(lr=1.0, max_steps=3, stop_nll=0.0, kl_factor=0.0, weight_decay=0.0)
    found = optimise_values(tiny, 2, REQUESTS[:3], PREFIXES, options, module=block)
    _, outputs = anchor_states(tiny, REQUESTS[:3], PREFIXES, outputs=[block])
    for i, solution in enumerate(found):
        assert solution.delta.shape == (tiny.adapter.hidden_size,)
        assert solution.nll[-1] < solution.nll[0]
        assert torch.allclose(solution.output, outputs[block][i], atol=1e-5)


def test_anchor_states_average_over_prefixes_in_chunks(any_tiny):
    name = any_tiny.adapter.mlp_out_name(1)
    whole = compute_keys(any_tiny, 1, REQUESTS, PREFIXES)
    chunked, _ = anchor_states(any_tiny, REQUESTS, PREFIXES, inputs=[name], batch_size=2)
    assert whole.shape == (len(REQUESTS), any_tiny.adapter.mlp_key_size(1))
    assert torch.allclose(chunked[name], whole, atol=1e-5)
    single = compute_keys(any_tiny, 1, REQUESTS[1:2], PREFIXES)
    assert torch.allclose(single[0], whole[1], atol=1e-5)


def test_a_selected_run_equals_a_run_of_the_selected_rows(any_tiny):
    lm = any_tiny
    rows = [row for r in REQUESTS[:3] for row in context_rows(r, PREFIXES)]
    name = lm.adapter.mlp_out_name(1)
    run = AnchoredRun(lm, AnchoredBatch.build(lm, rows), 1, captures=[name])
    picked = torch.tensor([7, 1, 2])
    selected = run.select(picked)
    direct = AnchoredRun(lm, AnchoredBatch.build(lm, [rows[i] for i in picked]), 1, captures=[name])
    a, b = selected.batch, direct.batch
    for got, want in [(selected.suffix_hidden(), direct.suffix_hidden())]:
        # the selected rows keep the original (wider) padding: compare real suffix columns
        real = b.attention_mask[:, b.anchor :].bool()
        assert torch.allclose(got[real], want[real], atol=1e-4)
    sel_logits = selected.logits(selected.suffix_hidden(), a.read_rows, a.read_cols)
    dir_logits = direct.logits(direct.suffix_hidden(), b.read_rows, b.read_cols)
    assert torch.equal(a.read_tokens, b.read_tokens)
    assert torch.allclose(sel_logits, dir_logits, atol=1e-4)
    kept, built = selected.captured[name].input[:, 0], direct.captured[name].input[:, 0]
    assert torch.allclose(kept, built, atol=1e-5)


def test_a_non_finite_loss_names_the_request_and_the_step(tiny):
    """A NaN in the embedding of a token only request 1's prompts hold."""
    head = tiny.adapter.embeddings.weight
    saved = head.detach().clone()
    others = set(tiny.tokenizer.encode(REQUESTS[0].prompt + " " + REQUESTS[0].target_new))
    token = next(t for t in tiny.tokenizer.encode(REQUESTS[1].prompt) if t not in others)
    with torch.no_grad():
        head[token] = float("nan")
    try:
        with pytest.raises(DivergedError, match="request 1 .*Darrieux.* at step 0") as caught:
            optimise_values(tiny, 1, REQUESTS[:2], [""], ValueOptions(max_steps=2))
        assert caught.value.request_index == 1 and caught.value.step == 0
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert isinstance(caught.value, RuntimeError)


def test_a_non_finite_delta_names_the_request_and_the_step(tiny, monkeypatch):
    """Batches of one: the second batch's optimiser makes its δ infinite at its second step; the
    error names the request by its index in the whole list."""
    real_step = torch.optim.Adam.step
    steps: dict[int, int] = {}

    def poisoned(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps[id(self)] = steps.get(id(self), 0) + 1
        if len(steps) == 2 and steps[id(self)] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    options = ValueOptions(max_steps=3, stop_nll=0.0)
    # batches hold requests of similar lengths: the second batch's request is the second shortest
    second = sorted(range(3), key=lambda i: keys_values._suffix_length(REQUESTS[i]))[1]
    match = f"request {second} .* at step 1: δ is not finite"
    with pytest.raises(DivergedError, match=match) as caught:
        optimise_values(tiny, 1, REQUESTS[:3], [""], options, batch_size=1)
    assert (caught.value.request_index, caught.value.step) == (second, 1)


def test_rome_builds_its_update_from_the_key_its_value_was_optimised_for(tiny, monkeypatch):
    """r-ROME (Gupta, Sajnani and Anumanchipalli 2024, "Rebuilding ROME"): the original code
    optimised v* with the averaged key k* but divided the update by the bare prompt's key, so
    W'k* ≠ v* and sequential edits collapsed. Here the key whose C⁻¹k* scales the injection
    while δ is optimised is bit for bit the key in the update's numerator and denominator."""
    stats = key_statistics(tiny, 1, samples=800, progress=False)
    solved = []
    real_solve = stats.solve
    monkeypatch.setattr(stats, "solve", lambda k: solved.append(k.clone()) or real_solve(k))
    built = {}
    real_update = rome.rank_one_update

    def spy(weight, key, value, c_inv_key=None):
        built.update(key=key.clone(), c_inv_key=c_inv_key.clone(), value=value.clone())
        return real_update(weight, key, value, c_inv_key)

    monkeypatch.setattr(rome, "rank_one_update", spy)
    options = ValueOptions(lr=1.0, max_steps=6, stop_nll=0.0)
    change = rome.rank_one_edit(tiny, 1, REQUESTS[0], PREFIXES, stats, options, exact=True)
    optimised_for = solved[0]  # the key injection_scales normalised δ's injection with
    assert torch.equal(built["key"], optimised_for)
    assert torch.equal(built["c_inv_key"], real_solve(optimised_for))
    weight = tiny.adapter.mlp_out_weight(1).double()
    k_star, v_star = built["key"], built["value"]
    edited = weight + change.left @ change.right
    assert torch.allclose(edited @ k_star, v_star, atol=1e-8 * float(v_star.norm()))
    # the mismatch is real on this model: the bare prompt's key is not k*, and an update divided
    # by it (the original code) would not write v* at k*
    bare = change.solution.keys[0].double()
    assert (bare - k_star).norm() > 0.05 * k_star.norm()
    direction = real_solve(k_star)
    original = (v_star - weight @ bare)[:, None] * (direction / (direction @ bare))[None, :]
    missed = ((weight + original) @ k_star - v_star).norm()
    assert missed > 0.01 * change.solution.delta.double().norm()


def test_anchor_states_resume_from_the_kept_input_of_an_updated_layer(any_tiny):
    """MEMIT's per-layer reads: after changing layer 1's MLP, a read resumed from layer 1's kept
    input equals a full pass (nothing below layer 1 changed)."""
    lm = any_tiny
    passes = AnchorStates(lm, REQUESTS, PREFIXES, batch_size=2)
    block = lm.adapter.layer_name(2)
    passes.read([lm.adapter.mlp_out_name(1)], [block], keep=1)
    weight = lm.adapter.mlp_out_weight(1)
    saved = weight.detach().clone()
    torch.manual_seed(0)
    with torch.no_grad():
        weight.add_(0.1 * torch.randn_like(weight))
    try:
        names = ([lm.adapter.mlp_out_name(2)], [block])
        resumed = passes.read(*names, keep=2, resume=True)
        full = anchor_states(lm, REQUESTS, PREFIXES, inputs=names[0], outputs=names[1])
        for got, want in zip(resumed, full):
            for name in want:
                assert torch.allclose(got[name], want[name], atol=1e-5)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    with pytest.raises(ValueError, match="keep="):
        AnchorStates(lm, REQUESTS, PREFIXES).read([block], resume=True)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_subject_at_the_first_token_is_scaled_by_a_prefixed_prompt_not_by_the_sink(model_type):
    """The first position carries the attention sink's massive activation (SmolLM2 at layer 11:
    ‖h‖ 23,977 against about 155). Simulated here by multiplying the module's output there by
    1,000: a first-token subject's δ must still be scaled and clipped by a prefixed prompt's ‖v‖
    (with the bare prompt's, δ grew past the weights and broke a MEMIT batch), and a subject
    elsewhere keeps the bare prompt's."""
    lm = tiny_model(model_type, add_bos=False)
    layer, module = 1, lm.adapter.mlp_out_name(1)
    at_start = EditRequest(prompt="It is located in", subject="It", target_new="Rome")
    inside = EditRequest(prompt="I think It is located in", subject="It", target_new="Rome")
    bare = AnchoredBatch.build(lm, context_rows(at_start, PREFIXES[:1]))
    assert bare.anchor == 0  # the subject is the sink itself

    seen = {}  # the positions of the body's current pass, for the hook at the module

    def positions(_body, _args, kwargs):
        seen["positions"] = kwargs["position_ids"]

    def sink(_module, _inputs, output):
        return torch.where((seen["positions"] == 0)[..., None], 1000.0 * output, output)

    def unedited_norms(request):
        batch = AnchoredBatch.build(lm, context_rows(request, PREFIXES))
        run = AnchoredRun(lm, batch, layer, captures=[module], fast=False)
        return run.captured[module].output[:, run.anchor_index].norm(dim=-1)

    options = ValueOptions(lr=2.0, max_steps=6, stop_nll=0.0, clamp_norm=0.5)
    handles = [
        lm.adapter.body.register_forward_pre_hook(positions, with_kwargs=True),
        lm.model.get_submodule(module).register_forward_hook(sink),
    ]
    try:
        start_norms, inside_norms = unedited_norms(at_start), unedited_norms(inside)
        assert start_norms[0] > 100 * start_norms[1]  # the simulated sink is in place
        found = optimise_values(lm, layer, [at_start, inside], PREFIXES, options)
    finally:
        for handle in handles:
            handle.remove()
    assert found[0].value_norm == pytest.approx(float(start_norms[1]), rel=1e-5)
    assert found[1].value_norm == pytest.approx(float(inside_norms[0]), rel=1e-5)
    for result in found:
        assert float(result.delta.norm()) <= 0.5 * result.value_norm * (1 + 1e-5)
        assert float(result.delta.norm()) > 0.1 * result.value_norm  # it did move
