"""MEND: gradient decomposition, the editor network, meta-training, checkpoints and patches."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from lmscalpel import EditRequest, LocalityProbe, edit, score_targets
from lmscalpel.core.config import ConfigError
from lmscalpel.core.requests import PortabilityProbe
from lmscalpel.data.cases import cases_from_requests
from lmscalpel.evaluation import EvalOptions, EvaluationError, MethodSpec, compare
from lmscalpel.evaluation.aggregate import case_metrics
from lmscalpel.evaluation.measure import measure
from lmscalpel.mechanics.stats import input_statistics
from lmscalpel.methods.mend import (
    EditorCheckpointError,
    MENDConfig,
    MENDTrainConfig,
    edit_token_grads,
    edited_parameter_names,
    editor_digest,
    load_editor,
    mend_patch,
    save_editor,
    train_mend,
)
from lmscalpel.methods.mend.batches import EDIT, LOCALITY, PARAPHRASE, MetaBatch
from lmscalpel.methods.mend.calibration import build_network, calibrate
from lmscalpel.methods.mend.edited import edited_forward
from lmscalpel.methods.mend.grads import lowest_layer, scored_logprobs
from lmscalpel.methods.mend.lower import LowerCache
from lmscalpel.methods.mend.reference import reference
from lmscalpel.methods.mend.train import split_records
from lmscalpel.methods.mend.validation import validate
from lmscalpel.runtime.layers import from_layer
from lmscalpel.scoring import build_batch, token_logprobs
from lmscalpel.testing import tiny_model

EIFFEL = EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    paraphrases=("Where is the Eiffel Tower? It is in the city of",),
    locality=(LocalityProbe("The Colosseum is located in the city of", "Rome"),),
)
APPLE = EditRequest(prompt="Apple was founded by", subject="Apple", target_new="Bill Gates")

RELATIONS = {
    "city": (
        ("{} is located in the city of", "Where is {}? It is in the city of"),
        ("Paris", "Rome", "Tokyo", "London", "Berlin", "Madrid", "Vienna", "Lisbon", "Athens"),
    ),
    "language": (
        ("The mother tongue of {} is", "{} is a native speaker of"),
        ("French", "Spanish", "German"),
    ),
    "instrument": (("{} plays the", "{} is incredible at the"), ("guitar", "piano")),
}
RELATIONS_OF = {prompt: targets for (prompt, _), targets in RELATIONS.values()}


def synthetic_records(n: int = 120, seed: int = 0) -> list[EditRequest]:
    """Counterfactual edits with a paraphrase and a neighbouring locality prompt each."""
    first = ["Eiffel", "Apple", "Colosseum", "Danielle", "Michel", "Toko", "Larry", "Steve"]
    second = ["Rocard", "Yasuda", "Knechtel", "Darrieux", "Jobs", "Gates", "Madrid", "Vienna"]
    rng = random.Random(seed)
    subjects = [f"{a} {b}" for a in first for b in second]
    rng.shuffle(subjects)
    records = []
    for i in range(n):
        subject, other = subjects[i % len(subjects)], subjects[(i + 7) % len(subjects)]
        (prompt, paraphrase), targets = RELATIONS[list(RELATIONS)[i % len(RELATIONS)]]
        records.append(
            EditRequest(
                prompt=prompt,
                subject=subject,
                target_new=rng.choice(targets),
                paraphrases=(paraphrase,),
                locality=(LocalityProbe(prompt.format(other), rng.choice(targets)),),
            )
        )
    return records


def small_config(**changes) -> MENDTrainConfig:
    values = dict(
        rank=32,
        steps=40,
        batch_size=8,
        val_size=32,
        val_every=20,
        lr=3e-3,
        max_minutes=None,
        stats_samples=2000,
    )
    values.update(changes)
    return MENDTrainConfig(**values)


def state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def assert_unchanged(lm, saved):
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, saved[n]), n
        assert not p.requires_grad and p.grad is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny llama, its untrained (calibrated) editor's validation, and a trained editor."""
    lm = tiny_model("llama")
    result = train_mend(lm, synthetic_records(), small_config(), progress=False)
    folder = save_editor(result.network, lm, tmp_path_factory.mktemp("mend") / "editor")
    return lm, result, folder


# ---- the gradient decomposition -------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_token_outer_products_sum_to_autograds_weight_gradient(model_type):
    lm = tiny_model(model_type)
    requests = [EIFFEL, APPLE]
    names = edited_parameter_names(lm.adapter, [-3, -1])
    grads = edit_token_grads(lm, requests, names)
    assert grads.mask.shape[0] == 2 and grads.mask.sum() > 4

    params = [lm.model.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    try:
        batch = build_batch(
            lm, [r.prompt for r in requests], [r.target_new for r in requests], share_prefixes=False
        )
        logprobs, _ = token_logprobs(lm, batch)
        per_pair = torch.zeros(2).index_add(0, batch.pair_index, -logprobs)
        per_pair = per_pair / torch.bincount(batch.pair_index, minlength=2)
        per_pair.sum().backward()
        for name, p in zip(names, params):
            expected = lm.adapter.to_storage(name, grads.weight_gradient(name))
            assert p.grad.shape == expected.shape
            torch.testing.assert_close(expected, p.grad, rtol=1e-4, atol=1e-6)
            assert p.grad.abs().max() > 0
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def test_gpt2_conv1d_is_edited_in_its_storage_layout(tiny_gpt2):
    lm = tiny_gpt2
    config = small_config(steps=0)
    network = build_network(lm, config)
    calibrate(lm, network, synthetic_records(16), config)
    patch = mend_patch(lm, [EIFFEL], network, MENDConfig())
    for delta in patch.deltas:
        assert delta.shape == tuple(lm.model.get_parameter(delta.name).shape)
    before = score_targets(lm, [EIFFEL.prompt], ["Rome"])[0].mean_logprob
    with patch.applied(lm):
        after = score_targets(lm, [EIFFEL.prompt], ["Rome"])[0].mean_logprob
    assert after > before


def test_functional_edit_matches_the_patched_weights(tiny):
    """The per-row hook realisation of ΔW used in training (started at the lowest edited block
    from the reference pass's hidden state) equals applying the patch."""
    config = small_config(steps=0)
    network = build_network(tiny, config)
    records = synthetic_records(16)
    calibrate(tiny, network, records, config)
    mb = MetaBatch.build(tiny, records[:3])
    ref = reference(tiny, mb, network.parameter_names)
    with torch.no_grad():
        factors = network.factors(ref.grads)
        with from_layer(tiny, ref.start, ref.hidden), edited_forward(tiny, factors, mb.owner):
            functional, _ = token_logprobs(tiny, mb.batch)
    for e in range(3):
        patch = mend_patch(tiny, [records[e]], network, MENDConfig())
        with patch.applied(tiny):
            direct, _ = token_logprobs(tiny, mb.batch)
        rows = (mb.owner == e).nonzero().flatten()
        tokens = torch.isin(mb.batch.rows, rows)
        torch.testing.assert_close(functional[tokens], direct[tokens], rtol=1e-4, atol=1e-4)


def test_reference_pass_from_the_kept_lower_blocks_matches_a_full_pass(tiny):
    """Meta-training's reference pass (lower blocks kept in a cache, edit and locality rows run
    apart, started at the lowest edited block) gives the full model's (u, δ) and locality
    distributions."""
    names = edited_parameter_names(tiny.adapter, [-2, -1])
    records = synthetic_records(6)
    cache = LowerCache(tiny, lowest_layer(tiny.adapter, names))
    mb = MetaBatch.build(tiny, records)
    for _ in range(2):  # the second time, everything below comes from the cache
        ref = reference(tiny, mb, names, cache)
        full = edit_token_grads(tiny, records, names)
        for name in names:
            torch.testing.assert_close(
                ref.grads.weight_gradient(name), full.weight_gradient(name), rtol=1e-4, atol=1e-6
            )
        loc = [r.locality[0] for r in records]
        batch = build_batch(tiny, [p.prompt for p in loc], [p.answer for p in loc])
        with torch.no_grad():
            expected = scored_logprobs(tiny, batch)
        torch.testing.assert_close(ref.locality_logprobs, expected, rtol=1e-4, atol=1e-5)
    assert len(cache.store) == 3 * len(records)


def test_a_meta_batch_scores_the_first_paraphrase_and_locality_probe_with_their_contrasts(tiny):
    """Each edit contributes its prompt, first paraphrase and first locality probe (portability
    probes are not trained on); validation batches add CounterFact's contrast pairs: the true
    target after the prompt and paraphrase, the new target after the locality prompt."""
    request = dataclasses.replace(
        EIFFEL,
        paraphrases=(*EIFFEL.paraphrases, "The Eiffel Tower stands in"),
        locality=(*EIFFEL.locality, LocalityProbe("Big Ben is in the city of", "London")),
        portability=(PortabilityProbe("The Eiffel Tower's country is", "Italy"),),
    )
    plain = MetaBatch.build(tiny, [request, APPLE])
    assert plain.keys == [
        (EIFFEL.prompt, "Rome"),
        (EIFFEL.paraphrases[0], "Rome"),
        (EIFFEL.locality[0].prompt, "Rome"),
        (APPLE.prompt, "Bill Gates"),
    ]
    assert plain.role.tolist() == [EDIT, PARAPHRASE, LOCALITY, EDIT]
    assert plain.partner.tolist() == [-1, -1, -1, -1]
    contrasted = MetaBatch.build(tiny, [request, APPLE], contrasts=True)
    targets = [key[1] for key in contrasted.keys]
    assert targets == ["Rome", "Paris", "Rome", "Paris", "Rome", "Rome", "Bill Gates"]
    assert contrasted.partner.tolist() == [1, -1, 3, -1, 5, -1, -1]  # APPLE has no true target
    assert contrasted.owner[contrasted.edit_rows[1]] == 1


# ---- the network ------------------------------------------------------------------------------
def test_untrained_network_is_the_identity_on_standardised_inputs(tiny):
    network = build_network(tiny, small_config())
    for name in network.parameter_names:
        rows, cols = network.shapes[name]
        u, d = torch.randn(5, cols), torch.randn(5, rows)
        u_new, d_new = network.transform(name, u, d)
        torch.testing.assert_close(u_new, u)
        torch.testing.assert_close(d_new, d)


def test_a_preconditioned_untrained_editor_steps_along_the_inverse_input_moment(tiny):
    """With ``precondition`` the input factor of ΔW is C⁻¹u (ROME's direction), C each matrix's
    input second moment from the statistics module; without it, the standardised u."""
    records = synthetic_records(16)
    plain = build_network(tiny, small_config(precondition=False))
    network = build_network(tiny, small_config())
    for net in (plain, network):
        calibrate(tiny, net, records, small_config(precondition=net.precondition))
    grads = edit_token_grads(tiny, [EIFFEL], network.parameter_names)
    moments = input_statistics(tiny, network.parameter_names, samples=2000, progress=False)
    mask = grads.mask[0]
    for name in network.parameter_names:
        u = grads.inputs[name][0, mask].double()
        moment = moments[name].moment.double()
        scale = moment.diagonal().mean()
        expected = u @ torch.linalg.inv(moment + 1e-3 * scale * torch.eye(len(moment))) * scale
        right = network.factors(grads)[name][1][0, mask].double()
        torch.testing.assert_close(right, expected, rtol=1e-3, atol=1e-4)
        key, mode = plain.modes[name]
        standardised = plain.transforms[key].standardise(
            grads.inputs[name][0, mask], grads.grads[name][0, mask], mode
        )[:, : u.shape[1]]
        torch.testing.assert_close(plain.factors(grads)[name][1][0, mask], standardised)


def test_matrices_of_one_shape_share_a_transform_with_their_own_scale_and_shift(tiny):
    network = build_network(tiny, small_config())
    a = tiny.adapter
    names = edited_parameter_names(a, [-3, -2, -1])
    assert network.parameter_names == names
    # llama: gate and up (2·hidden x hidden) share one transform; down (hidden x 2·hidden) another
    assert len(network.transforms) == 2
    gate, up = a.mlp_in_weight_names(3)
    assert network.modes[gate][0] == network.modes[up][0]
    assert network.modes[gate][1] != network.modes[up][1]
    assert network.log_step.shape == (len(names),)


def test_patch_rank_is_at_most_the_number_of_edit_tokens(trained):
    lm, result, _ = trained
    patch = mend_patch(lm, [EIFFEL], result.network, MENDConfig())
    tokens = patch.info["tokens"]
    for delta in patch.deltas:
        full = delta.materialize(torch.float64)
        assert torch.linalg.matrix_rank(full) <= tokens


# ---- meta-training --------------------------------------------------------------------------
def test_training_raises_held_out_edit_success_above_the_untrained_editor(trained):
    lm, result, _ = trained
    assert result.steps == 40
    untrained, best = result.untrained, result.best
    assert best["step"] > 0
    assert best["es"] > untrained["es"]
    assert (best["es"] + best["ps"]) / 2 > (untrained["es"] + untrained["ps"]) / 2
    assert best["nll"] < untrained["nll"]
    # the unedited model's validation (step scale 0): nothing changed, nothing edited
    assert result.unedited["dd"] == 0 and result.unedited["kl"] == pytest.approx(0, abs=1e-6)
    assert result.unedited["nll"] > untrained["nll"]
    # the validation numbers are reproducible from the returned (best) editor
    config = small_config()
    _, val = split_records(synthetic_records(), config)
    again = validate(lm, result.network, val, config)
    assert again["es"] == pytest.approx(best["es"])


def test_validation_scores_edits_as_the_benchmark_does(trained):
    """Training's validation (edits realised in the forward pass, contrast pairs in the batch)
    gives CounterFact's ES, PS and NS as the evaluation measures them on the applied patches."""
    lm, result, _ = trained
    rng = random.Random(3)
    records = []
    for r in synthetic_records(10, seed=5):
        options = [t for t in RELATIONS_OF[r.template] if t != r.target_new]
        records.append(dataclasses.replace(r, target_true=rng.choice(options)))
    config = small_config()
    got = validate(lm, result.network, records, config)
    rows = []
    for case, r in zip(cases_from_requests(records), records, strict=True):
        patch = mend_patch(lm, [r], result.network, MENDConfig())
        with patch.applied(lm):
            rows.append(case_metrics(measure(lm, [case], EvalOptions())[case.key]))
    for key, metric in (("es", "ES"), ("ps", "PS"), ("ns", "NS")):
        assert got[key] == pytest.approx(sum(row[metric] for row in rows) / len(rows))
    assert got["es"] > 0 and got["ns"] < 1  # the comparison is not trivially decided


def test_training_leaves_the_base_model_untouched():
    lm = tiny_model("llama")
    saved = state(lm)
    train_mend(lm, synthetic_records(60), small_config(steps=3, val_every=3), progress=False)
    assert_unchanged(lm, saved)


def test_training_stops_at_its_time_budget():
    lm = tiny_model("llama")
    result = train_mend(
        lm, synthetic_records(60), small_config(steps=10_000, max_minutes=0.0), progress=False
    )
    assert result.stopped == "time" and result.steps == 0


def test_too_few_records_for_the_held_out_slice_is_an_error(tiny):
    with pytest.raises(ConfigError, match="val_size"):
        train_mend(tiny, synthetic_records(10), small_config(), progress=False)


# ---- checkpoints ----------------------------------------------------------------------------
def test_saved_editor_reloads_and_gives_identical_patches(trained):
    lm, result, folder = trained
    reloaded = load_editor(folder, lm)
    first = mend_patch(lm, [EIFFEL, APPLE], result.network, MENDConfig())
    second = mend_patch(lm, [EIFFEL, APPLE], reloaded, MENDConfig())
    assert first.parameter_names == second.parameter_names
    for a, b in zip(first.deltas, second.deltas):
        assert torch.equal(a.materialize(), b.materialize())


def test_a_resumed_run_refuses_a_retrained_editor_in_the_same_folder(trained, tmp_path):
    """Evaluation records name the editor's weights digest: retraining into the same folder and
    resuming the run is refused instead of mixing edits of two editors."""
    lm, result, _ = trained
    folder = save_editor(result.network, lm, tmp_path / "editor")
    cases = cases_from_requests([EIFFEL])
    spec = MethodSpec("mend", {"editor": str(folder)})
    first = compare(lm, cases, [spec], out=tmp_path / "run")
    patch = edit(lm, EIFFEL, method="mend", config={"editor": str(folder)}, apply=False)
    assert patch.info["editor_sha256"] == editor_digest(folder)
    assert compare(lm, cases, [spec], out=tmp_path / "run").rows == first.rows  # resumes
    with torch.no_grad():
        result.network.log_step += 1.0
    try:
        save_editor(result.network, lm, folder)
    finally:
        with torch.no_grad():
            result.network.log_step -= 1.0
    with pytest.raises(EvaluationError, match="another configuration"):
        compare(lm, cases, [spec], out=tmp_path / "run")


def test_loading_an_editor_for_another_model_is_refused(trained):
    _, _, folder = trained
    other = tiny_model("llama", seed=1)
    with pytest.raises(EditorCheckpointError, match="trained for model"):
        load_editor(folder, other)
    with pytest.raises(EditorCheckpointError, match="trained for model"):
        edit(other, EIFFEL, method="mend", config={"editor": str(folder)})


def test_a_folder_without_an_editor_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(EditorCheckpointError, match="not a trained editor"):
        load_editor(tmp_path, tiny)


# ---- the registered editor ----------------------------------------------------------------
def test_mend_edit_changes_nothing_until_applied_and_reverts_exactly(trained):
    lm, _, folder = trained
    saved = state(lm)
    before = score_targets(lm, [EIFFEL.prompt], ["Rome"])[0].mean_logprob
    patch = edit(lm, EIFFEL, method="mend", config={"editor": str(folder)}, apply=False)
    assert patch.method == "mend" and not patch.is_applied
    assert_unchanged(lm, saved)
    patch.apply(lm)
    assert score_targets(lm, [EIFFEL.prompt], ["Rome"])[0].mean_logprob > before
    patch.revert()
    assert_unchanged(lm, saved)


def test_mend_patches_are_ordinary_low_rank_patches(trained, tmp_path):
    lm, result, folder = trained
    patch = edit(lm, EIFFEL, method="mend", config={"editor": str(folder)}, apply=False)
    assert set(patch.parameter_names) == set(result.network.parameter_names)
    assert all(d.rank == patch.info["tokens"] for d in patch.deltas)
    from lmscalpel import Patch

    again = Patch.load(patch.save(tmp_path / "p"))
    for a, b in zip(patch.deltas, again.deltas):
        assert torch.equal(a.materialize(), b.materialize())


def test_a_mend_patch_serves_as_a_lora_adapter_through_peft(trained, tmp_path):
    """MEND's low-rank deltas export exactly: peft with the adapter gives the patched logits."""
    import copy

    from peft import PeftModel

    from lmscalpel.lora_adapter import export_lora_adapter

    lm, _, folder = trained
    patch = edit(lm, EIFFEL, method="mend", config={"editor": str(folder)}, apply=False)
    base = copy.deepcopy(lm.model)
    export_lora_adapter(lm, [patch], tmp_path / "adapter")
    ids = lm.tokenizer([EIFFEL.prompt], return_tensors="pt").input_ids
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        with patch.applied(lm):
            patched = lm.model(input_ids=ids).logits
        served = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        through_peft = served(input_ids=ids).logits
    assert (patched - before).abs().max() > 1e-3
    assert (through_peft - patched).abs().max() < 1e-5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == patch.info["tokens"]  # exact: the deltas' own rank


def test_mend_without_an_editor_says_how_to_train_one(tiny):
    with pytest.raises(ConfigError, match="train-editor"):
        edit(tiny, EIFFEL, method="mend")


def test_gradient_direction_has_the_learned_norm_but_the_gradient_direction(trained):
    lm, result, _ = trained
    learned = mend_patch(lm, [EIFFEL], result.network, MENDConfig())
    plain = mend_patch(lm, [EIFFEL], result.network, MENDConfig(direction="gradient"))
    grads = edit_token_grads(lm, [EIFFEL], result.network.parameter_names)
    for a, b in zip(learned.deltas, plain.deltas):
        assert b.norm() == pytest.approx(a.norm(), rel=1e-4)
        gradient = lm.adapter.to_storage(a.name, grads.weight_gradient(a.name)).double()
        cosine = torch.nn.functional.cosine_similarity(
            -gradient.flatten(), b.materialize(torch.float64).flatten(), dim=0
        )
        assert cosine > 0.9999


# ---- the command line -------------------------------------------------------------------------
def test_cli_trains_an_editor_and_edits_with_it(tmp_path):
    from typer.testing import CliRunner

    from lmscalpel import save_requests
    from lmscalpel.cli import app

    runner = CliRunner()
    lm = tiny_model("llama")
    model_dir, other_dir = tmp_path / "tiny", tmp_path / "other"
    for folder, model in ((model_dir, lm), (other_dir, tiny_model("llama", seed=1))):
        model.model.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
    data = tmp_path / "records.json"
    save_requests(synthetic_records(40), data)
    out = tmp_path / "editor"
    result = runner.invoke(
        app,
        ["train-editor", "--method", "mend", "--data", str(data), "--out", str(out),
         "--model", str(model_dir), "--steps", "4", "--set", "val_size=8",
         "--set", "val_every=2", "--set", "rank=8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "untrained" in result.output and "trained (best)" in result.output
    meta = json.loads((out / "editor.json").read_text())
    assert meta["training"]["steps"] == 4 and meta["training"]["data"] == str(data)
    assert meta["rank"] == 8

    edit_args = ["edit", "--method", "mend", "--editor", str(out), "--prompt", EIFFEL.prompt,
                 "--subject", "Eiffel Tower", "--target", "Rome", "--save", str(tmp_path / "p")]  # fmt: skip
    result = runner.invoke(app, [*edit_args, "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p" / "patch.json").read_text())["method"] == "mend"

    eval_out = tmp_path / "eval"
    result = runner.invoke(
        app,
        ["eval", "--method", "mend", "--editor", str(out), "--data", str(data), "--n", "2",
         "--fluency-cases", "0", "--model", str(model_dir), "--out", str(eval_out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((eval_out / "summary.json").read_text())
    assert summary["rows"]["mend"]["n_cases"] == 2

    result = runner.invoke(app, [*edit_args, "--model", str(other_dir)])
    assert result.exit_code == 2 and "trained for model" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = runner.invoke(app, [*edit_args[:1], "--method", "ft-l", *edit_args[3:]])
    assert result.exit_code != 0 and "learned editors" in " ".join(result.output.split())


def test_training_chooses_the_step_scale_with_the_best_held_out_score(trained, tmp_path):
    lm, result, folder = trained
    scan = result.step_scale_scan
    assert set(scan) == {str(s) for s in small_config().step_scales}
    assert scan[str(result.step_scale)]["score"] == max(v["score"] for v in scan.values())
    assert scan["1.0"]["score"] == pytest.approx(result.best["score"])  # the trained editor as is
    # an editor saved with its training record edits at that scale by default
    saved = save_editor(result.network, lm, tmp_path / "e", {"step_scale": 0.4})
    default = edit(lm, EIFFEL, method="mend", config={"editor": str(saved)})
    default.revert()
    explicit = edit(lm, EIFFEL, method="mend", config={"editor": str(saved), "step_scale": 0.4})
    explicit.revert()
    assert default.info["step_sizes"] == explicit.info["step_sizes"]
    assert all(
        torch.equal(a.materialize(), b.materialize())
        for a, b in zip(default.deltas, explicit.deltas)
    )
    # and one saved without it, at the learned step sizes as they are
    plain = edit(lm, EIFFEL, method="mend", config={"editor": str(folder)})
    plain.revert()
    assert plain.info["step_sizes"] == pytest.approx(result.network.step_sizes())
