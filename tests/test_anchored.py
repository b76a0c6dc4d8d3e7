"""The anchored fast path must equal a full forward pass, in values and in gradients."""

import pytest
import torch

from lmscalpel.mechanics.anchored import AnchoredBatch, AnchoredRow, AnchoredRun
from lmscalpel.runtime.hooks import add_at_positions
from lmscalpel.scoring import score_targets
from lmscalpel.tokens import encode_prompt, subject_last_token

ROWS = [
    AnchoredRow("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
    AnchoredRow("Apple was founded by. The Eiffel Tower is in", "Eiffel Tower", "Paris, France"),
    AnchoredRow("Eiffel Tower is a", "Eiffel Tower"),
]


def test_rows_are_aligned_at_the_subjects_last_token(tiny):
    batch = AnchoredBatch.build(tiny, ROWS)
    for r, row in enumerate(ROWS):
        ids = encode_prompt(tiny, row.prompt)
        shift = batch.anchor - subject_last_token(tiny, row.prompt, row.subject)
        real = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        assert real[: len(ids)] == ids
        assert batch.attention_mask[r, :shift].sum() == 0  # left padding only
        assert batch.position_ids[r, shift] == 0
    assert batch.read_rows.tolist().count(2) == 0  # the row without a target is not scored


def test_a_subject_mentioned_in_a_prefix_is_skipped(tiny):
    prefix, prompt = "Paris has the Eiffel Tower. ", "The Eiffel Tower is in"
    row = AnchoredRow(prefix + prompt, "Eiffel Tower", subject_from=len(prefix))
    batch = AnchoredBatch.build(tiny, [row])
    assert batch.anchor > subject_last_token(tiny, row.prompt, "Eiffel Tower")  # not the first
    bare = encode_prompt(tiny, prompt)
    assert (
        batch.input_ids[0, batch.anchor] == bare[subject_last_token(tiny, prompt, "Eiffel Tower")]
    )
    assert batch.input_ids[0, batch.anchor + 1 :].tolist() == bare[-2:]  # " is", " in"


def test_scored_tokens_match_plain_teacher_forcing(tiny):
    batch = AnchoredBatch.build(tiny, ROWS)
    run = AnchoredRun(tiny, batch, 1)
    logits = run.logits(run.suffix_hidden(), batch.read_rows, batch.read_cols)
    chosen = torch.log_softmax(logits, -1).gather(1, batch.read_tokens[:, None]).squeeze(1)
    for r in (0, 1):
        expected = score_targets(tiny, [ROWS[r].prompt], [ROWS[r].target])[0].token_logprobs
        got = chosen[batch.read_rows == r].tolist()
        assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("layer", [0, 2])
def test_fast_path_equals_the_full_pass_with_gradients(any_tiny, layer):
    lm = any_tiny
    batch = AnchoredBatch.build(lm, ROWS)
    name = lm.adapter.mlp_out_name(layer)
    results = []
    for fast in (True, False):
        run = AnchoredRun(lm, batch, layer, captures=[name], fast=fast)
        assert run.fast == fast
        torch.manual_seed(0)
        delta = torch.randn(lm.adapter.hidden_size, requires_grad=True)
        hidden = run.suffix_hidden({name: add_at_positions(delta, [run.anchor_index] * 3)})
        logits = run.logits(hidden, batch.read_rows, batch.read_cols)
        loss = torch.log_softmax(logits, -1).gather(1, batch.read_tokens[:, None]).sum()
        loss.backward()
        keys = run.captured[name].input[:, run.anchor_index :]
        plain = run.suffix_hidden().detach()
        results.append((hidden.detach(), delta.grad.clone(), keys, plain))
    (h_fast, g_fast, k_fast, plain_fast), (h_full, g_full, k_full, plain_full) = results
    assert torch.allclose(h_fast, h_full, atol=1e-4)
    assert torch.allclose(g_fast, g_full, atol=1e-4, rtol=1e-3)
    assert torch.allclose(k_fast, k_full, atol=1e-5)
    assert torch.allclose(plain_fast, plain_full, atol=1e-4)
    # the injection matters: the suffix differs from the unedited pass
    assert not torch.allclose(h_fast, plain_fast, atol=1e-3)


def test_the_model_is_intact_after_a_fast_pass(tiny):
    layers = tiny.adapter.layer_list
    before = list(layers)
    run = AnchoredRun(tiny, AnchoredBatch.build(tiny, ROWS), 2)
    run.suffix_hidden()
    assert list(layers) == before


def test_an_anchor_in_the_first_column_needs_no_prefix_cache(tiny):
    rows = [AnchoredRow("The Eiffel Tower is in", "The", "Paris")]
    batch = AnchoredBatch.build(tiny, rows)
    assert batch.anchor == 0  # no BOS in the tiny llama tokenizer
    name = tiny.adapter.mlp_out_name(1)
    delta = torch.ones(tiny.adapter.hidden_size)
    hidden = []
    for fast in (True, False):
        run = AnchoredRun(tiny, batch, 1, captures=[name], fast=fast)
        hidden.append(run.suffix_hidden({name: add_at_positions(delta, [run.anchor_index])}))
    assert torch.allclose(hidden[0], hidden[1], atol=1e-4)


def test_states_at_the_anchors_are_the_same_in_a_batch_cut_after_them(any_tiny):
    """AnchorStates reads keys and outputs on rows that end at the anchor: what later columns
    hold cannot change them (causal attention), so they equal the full rows' states."""
    from lmscalpel.runtime.hooks import Tap, tap
    from lmscalpel.runtime.kv import run_body

    lm = any_tiny
    full = AnchoredBatch.build(lm, ROWS)
    cut = full.through_anchor()
    assert cut.width == full.anchor + 1 < full.width
    assert (cut.last_cols <= cut.anchor).all() and len(cut.read_rows) == 0
    names = [lm.adapter.mlp_out_name(1), lm.adapter.layer_name(2)]
    found = []
    for batch in (full, cut):
        with torch.no_grad(), tap(lm.model, dict.fromkeys(names, Tap(input=True))) as seen:
            run_body(lm, batch.input_ids, batch.attention_mask, batch.position_ids)
        found.append([seen[n].input[:, batch.anchor] for n in names])
    for a, b in zip(*found):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
