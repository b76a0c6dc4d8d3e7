import math

import pytest
import torch

from lmscalpel import generate, score_targets
from lmscalpel.scoring import build_batch, next_token_logprobs
from lmscalpel.testing import tiny_model
from lmscalpel.tokens import encode_prompt, encode_target, subject_token_positions, target_text

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Apple was founded by",
    "The capital of Japan is",
]
TARGETS = ["Paris", "Rome", "French", "Steve Jobs", " Tokyo and Kyoto"]


def test_leading_space_rules():
    assert target_text("city of", "Paris") == " Paris"
    assert target_text("city of", " Paris") == " Paris"
    assert target_text("city of ", "Paris") == "Paris"
    assert target_text("<assistant>", " Paris", chat=True) == "Paris"


def _manual(lm, prompt, target):
    """log P(target | prompt) from one plain forward pass of the whole model."""
    p, t = encode_prompt(lm, prompt), encode_target(lm, prompt, target)
    with torch.no_grad():
        logits = lm.model(torch.tensor([p + t])).logits[0].log_softmax(-1)
    return [float(logits[len(p) - 1 + i, tok]) for i, tok in enumerate(t)]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text", "gpt_neox"])
def test_batched_equals_one_by_one_equals_manual(model_type):
    lm = tiny_model(model_type)
    batched = score_targets(lm, PROMPTS, TARGETS, batch_size=3)
    for prompt, target, b in zip(PROMPTS, TARGETS, batched):
        single = score_targets(lm, [prompt], [target])[0]
        assert b.token_ids == single.token_ids
        for x, y, z in zip(b.token_logprobs, single.token_logprobs, _manual(lm, prompt, target)):
            assert abs(x - y) < 1e-4 and abs(x - z) < 1e-4


def test_prefix_sharing_uses_one_row_per_prompt(tiny):
    prompt = PROMPTS[0]
    batch = build_batch(tiny, [prompt] * 3, ["Paris", "Rome", "Paris France"])
    assert batch.input_ids.shape[0] == 1  # all three read from the longest row
    unshared = build_batch(
        tiny, [prompt] * 3, ["Paris", "Rome", "Paris France"], share_prefixes=False
    )
    assert unshared.input_ids.shape[0] == 3


def test_bos_is_added_when_the_tokenizer_adds_it():
    lm = tiny_model("llama", add_bos=True)
    assert encode_prompt(lm, "Paris")[0] == lm.tokenizer.bos_token_id
    assert lm.tokenizer.bos_token_id not in encode_target(lm, "city of", "Paris")
    scores = score_targets(lm, PROMPTS, TARGETS)
    assert all(math.isfinite(s.mean_logprob) for s in scores)


def test_score_fields(tiny):
    s = score_targets(tiny, [PROMPTS[3]], ["Steve Jobs"])[0]
    assert len(s.token_ids) == len(s.token_logprobs) == len(s.argmax_hits) >= 2
    assert s.mean_logprob == pytest.approx(s.sum_logprob / len(s.token_ids))
    assert s.prob == pytest.approx(math.exp(s.sum_logprob))
    assert 0 <= s.token_accuracy <= 1


def test_next_token_logprobs_match_the_first_target_token(tiny):
    dist = next_token_logprobs(tiny, PROMPTS)
    scores = score_targets(tiny, PROMPTS, TARGETS)
    for row, s in zip(dist, scores):
        assert float(row[s.token_ids[0]]) == pytest.approx(s.token_logprobs[0], abs=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_batched_generation_equals_one_by_one(model_type):
    lm = tiny_model(model_type)
    prompts = [PROMPTS[0], PROMPTS[3], "Paris"]
    batched = generate(lm, prompts, max_new_tokens=6, batch_size=3)
    assert batched == [generate(lm, [p], max_new_tokens=6)[0] for p in prompts]


def test_subject_positions(tiny):
    prompt = PROMPTS[0]
    positions = subject_token_positions(tiny, prompt, "Eiffel Tower")
    ids = encode_prompt(tiny, prompt)
    decoded = tiny.tokenizer.decode([ids[i] for i in positions])
    assert decoded.strip() == "Eiffel Tower"


def test_chat_template_wraps_prompts():
    lm = tiny_model("llama")
    lm.tokenizer.chat_template = (
        "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    )
    lm.chat = True
    text = lm.tokenizer.decode(encode_prompt(lm, "Where is the Eiffel Tower?"))
    assert text.startswith("<user>") and text.endswith("<bot>")
    assert subject_token_positions(lm, "Where is the Eiffel Tower?", "Eiffel")
    assert target_text("<bot>", " Paris", chat=True) == "Paris"


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_a_long_shared_prefix_runs_once_and_scores_the_same(model_type, monkeypatch):
    from lmscalpel import scoring

    lm = tiny_model(model_type)
    prefix = "The capital of Japan is Tokyo. The capital of Italy is Rome. " * 4
    prompts = [prefix + p for p in PROMPTS]
    shared = []
    real = scoring._shared_prefix_length
    monkeypatch.setattr(
        scoring, "_shared_prefix_length", lambda *a: shared.append(real(*a)) or shared[-1]
    )
    batched = score_targets(lm, prompts, TARGETS)
    assert shared and shared[0] >= scoring.MIN_SHARED_PREFIX  # the cached path was taken
    for prompt, target, b in zip(prompts, TARGETS, batched):
        assert b.token_logprobs == pytest.approx(_manual(lm, prompt, target), abs=1e-4)
