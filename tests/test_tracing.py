"""Causal tracing (Meng et al. 2022) on tiny random models, one real trace on the embedded model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lmscalpel.cli import app
from lmscalpel.locate import (
    TraceResult,
    TracingError,
    default_window,
    embedding_std,
    noise_level,
    trace,
    window_layers,
)
from lmscalpel.locate import restoration as restoration_module
from lmscalpel.locate.aggregate import (
    KnownFact,
    aggregate,
    model_knows,
    token_classes,
    traced_positions,
)
from lmscalpel.locate.tracing import noise_draws
from lmscalpel.runtime.hooks import Tap, replace_at_positions, tap
from lmscalpel.testing import tiny_model
from lmscalpel.tokens import encode_prompt, subject_token_positions

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _reference(lm, prompt, subject, answer_token, kind, window, sigma, samples, seed=0):
    """One full forward pass per restoration and noise draw, hooks on the real modules: the slow
    and obvious definition that the batched tracer must reproduce."""
    a = lm.adapter
    ids = torch.tensor([encode_prompt(lm, prompt)])
    subject_pos = subject_token_positions(lm, prompt, subject)
    draws = noise_draws(samples, len(subject_pos), a.hidden_size, sigma, seed)
    n_tokens, n_layers = ids.shape[1], a.num_layers

    def name(layer):
        return {"hidden": a.layer_name, "mlp": a.mlp_name, "attn": a.attn_name}[kind](layer)

    clean = {}
    with torch.no_grad():
        for layer in range(n_layers):
            with tap(lm.model, {name(layer): Tap(output=True)}) as seen:
                lm.model(ids)
            clean[layer] = seen[name(layer)].output[0]

    def prob(draw, restore):
        def corrupt(h):
            h = h.clone()
            h[0, subject_pos] += draw
            return h

        taps = {a.embeddings_name: Tap(replace=corrupt)}
        for layer, token in restore:
            taps[name(layer)] = Tap(replace=replace_at_positions(clean[layer][token], [token]))
        with torch.no_grad(), tap(lm.model, taps):
            logits = lm.model(ids).logits[0, -1]
        return float(torch.softmax(logits.float(), -1)[answer_token])

    corrupted = sum(prob(d, []) for d in draws) / samples
    table = torch.full((n_tokens, n_layers), float("nan"))
    for token in range(n_tokens):
        for layer in range(n_layers):
            layers = [layer] if kind == "hidden" else window_layers(layer, window, n_layers)
            restore = [(j, token) for j in layers]
            table[token, layer] = sum(prob(d, restore) for d in draws) / samples
    return corrupted, table


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text", "gpt_neox"])
def test_batched_trace_equals_one_restoration_at_a_time(model_type):
    lm = tiny_model(model_type, layers=4)
    options = dict(samples=3, noise=0.5, window=3, batch_tokens=64)
    fast = trace(lm, PROMPT, SUBJECT, **options)
    # the fallback that recomputes whole sequences must agree too
    whole = trace(lm, PROMPT, SUBJECT, reuse_prefix=False, **options)
    for kind in ("hidden", "mlp", "attn"):
        corrupted, expected = _reference(
            lm, PROMPT, SUBJECT, fast.answer_token, kind, 3, 0.5, samples=3
        )
        for result in (fast, whole):
            assert result.p_corrupted == pytest.approx(corrupted, abs=1e-5)
            torch.testing.assert_close(result.restored[kind], expected, atol=1e-5, rtol=0)
    assert _hook_count(lm.model) == 0


def test_restoring_the_last_layer_at_the_last_token_recovers_the_clean_probability(tiny):
    result = trace(tiny, PROMPT, SUBJECT, samples=4, noise=2.0)
    assert result.p_corrupted != pytest.approx(result.p_clean, abs=1e-3)  # the noise bites
    restored = result.restored["hidden"]
    assert restored[-1, -1] == pytest.approx(result.p_clean, abs=1e-5)
    # the last layer at any other token cannot reach the prediction any more
    torch.testing.assert_close(
        restored[:-1, -1], torch.full_like(restored[:-1, -1], result.p_corrupted)
    )


def test_bfloat16_is_close_to_float32(tiny):
    exact = trace(tiny, PROMPT, SUBJECT, samples=3, noise=1.0)
    fast = trace(tiny, PROMPT, SUBJECT, samples=3, noise=1.0, precision="bfloat16")
    assert fast.precision == "bfloat16"
    for kind in exact.kinds:
        torch.testing.assert_close(fast.restored[kind], exact.restored[kind], atol=0.01, rtol=0)
    with pytest.raises(TracingError, match="precision"):
        trace(tiny, PROMPT, SUBJECT, noise=1.0, precision="float8")


def test_zero_noise_makes_the_corrupted_run_the_clean_one(tiny):
    result = trace(tiny, PROMPT, SUBJECT, samples=2, noise=0.0)
    assert result.p_corrupted == pytest.approx(result.p_clean, abs=1e-6)
    for kind in result.kinds:
        assert result.indirect_effect(kind).abs().max() < 1e-5


def test_shapes_answer_and_untraced_tokens(tiny):
    n_layers = tiny.adapter.num_layers
    result = trace(tiny, PROMPT, SUBJECT, "Paris", samples=2, noise=1.0, positions=[0, 2, 5])
    n_tokens = len(result.tokens)
    assert n_tokens == len(encode_prompt(tiny, PROMPT))
    assert result.subject_positions == subject_token_positions(tiny, PROMPT, SUBJECT)
    assert result.kinds == ["hidden", "mlp", "attn"]
    for kind in result.kinds:
        assert result.restored[kind].shape == (n_tokens, n_layers)
        assert result.indirect_effect(kind).shape == (n_tokens, n_layers)
        traced = ~result.restored[kind].isnan().any(dim=1)
        assert traced.nonzero().flatten().tolist() == [0, 2, 5]
    # token 0 precedes the subject: restoring it changes nothing
    assert result.restored["hidden"][0].tolist() == [result.p_corrupted] * n_layers
    assert result.answer == "Paris"
    own = trace(tiny, PROMPT, SUBJECT, samples=2, noise=1.0, kinds="hidden", positions=[2])
    top = tiny.model(torch.tensor([encode_prompt(tiny, PROMPT)])).logits[0, -1].argmax()
    assert own.answer_token == int(top)


def test_noise_samples_average_and_the_seed_repeats(tiny):
    a = trace(tiny, PROMPT, SUBJECT, kinds="hidden", samples=3, noise=1.0, seed=1)
    b = trace(tiny, PROMPT, SUBJECT, kinds="hidden", samples=3, noise=1.0, seed=1)
    c = trace(tiny, PROMPT, SUBJECT, kinds="hidden", samples=3, noise=1.0, seed=2)
    torch.testing.assert_close(a.restored["hidden"], b.restored["hidden"], equal_nan=True)
    assert a.p_corrupted != c.p_corrupted


def test_bad_input_raises_clearly_and_leaves_no_hooks(tiny, monkeypatch):
    with pytest.raises(TracingError, match="not found"):
        trace(tiny, PROMPT, "Colosseum", noise=1.0)
    with pytest.raises(TracingError, match="unknown kind"):
        trace(tiny, PROMPT, SUBJECT, kinds="mlps", noise=1.0)
    with pytest.raises(TracingError, match="samples"):
        trace(tiny, PROMPT, SUBJECT, samples=0, noise=1.0)
    with pytest.raises(TracingError, match="out of range"):
        trace(tiny, PROMPT, SUBJECT, positions=[99], noise=1.0)
    with pytest.raises(TracingError, match="no tokens"):
        trace(tiny, PROMPT, SUBJECT, answer="", noise=1.0)

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(restoration_module, "run_layers", explode)
    with pytest.raises(RuntimeError, match="boom"):
        trace(tiny, PROMPT, SUBJECT, samples=2, noise=1.0)
    assert _hook_count(tiny.model) == 0


def test_windows_scale_with_depth():
    assert default_window(48) == 10 and default_window(30) == 10
    assert default_window(12) == 4 and default_window(2) == 1
    assert list(window_layers(5, 10, 30)) == list(range(0, 10))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(3, 1, 30)) == [3]


def test_noise_level_is_three_subject_embedding_stds_and_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path))
    sample = [(PROMPT, SUBJECT), ("The Colosseum is located in the city of", "Colosseum")]
    ids = [
        encode_prompt(tiny, p)[i] for p, s in sample for i in subject_token_positions(tiny, p, s)
    ]
    expected = tiny.adapter.embeddings(torch.tensor(ids)).std().item()
    assert embedding_std(tiny, sample) == pytest.approx(expected, rel=1e-6)
    assert noise_level(tiny, sample) == pytest.approx(3 * expected, rel=1e-6)
    cache = json.loads((tmp_path / "tracing" / "embedding_std.json").read_text())
    assert any(key.startswith(tiny.fingerprint) for key in cache)
    with torch.no_grad():  # a cached value is read back, not recomputed
        tiny.adapter.embeddings.weight.mul_(2)
    try:
        assert noise_level(tiny, sample) == pytest.approx(3 * expected, rel=1e-6)
    finally:
        with torch.no_grad():
            tiny.adapter.embeddings.weight.div_(2)


def test_result_round_trips_through_files(tiny, tmp_path):
    result = trace(tiny, PROMPT, SUBJECT, samples=2, noise=1.0, positions=[1, 2, 8])
    result.save(tmp_path)
    loaded = TraceResult.load(tmp_path)
    assert loaded.tokens == result.tokens and loaded.p_clean == result.p_clean
    for kind in result.kinds:
        torch.testing.assert_close(loaded.restored[kind], result.restored[kind], equal_nan=True)
    again = TraceResult.from_dict(json.loads((tmp_path / "trace.json").read_text()))
    torch.testing.assert_close(
        again.restored["mlp"], result.restored["mlp"], equal_nan=True, atol=1e-6, rtol=0
    )


def test_token_classes():
    classes = token_classes(8, [1, 2, 3])
    assert classes == {
        "first subject token": [1],
        "middle subject tokens": [2],
        "last subject token": [3],
        "first subsequent token": [4],
        "further tokens": [5, 6],
        "last token": [7],
    }
    at_end = token_classes(4, [2, 3])
    assert at_end["last subject token"] == [3] == at_end["last token"]
    assert at_end["first subsequent token"] == [] and at_end["further tokens"] == []
    assert traced_positions(8, [1, 2, 3], "last-subject") == [3]
    assert traced_positions(8, [1, 2, 3], "classes") == [1, 3, 4, 7]
    assert traced_positions(8, [1, 2, 3], "all") == list(range(1, 8))
    with pytest.raises(ValueError, match="tokens"):
        traced_positions(8, [1], "some")


CANDIDATES = [
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Toko Yasuda plays the", "Toko Yasuda"),
    ("Microsoft was founded by", "Microsoft"),
    ("The capital of Japan is", "Japan"),
    ("The Colosseum is located in the city of", "Colosseum"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("Apple was founded by", "Apple"),
    ("The official language of Spain is", "Spain"),
    ("Larry Knechtel plays the", "Larry Knechtel"),
    ("Michel Rocard is a native speaker of", "Michel Rocard"),
]


def _own_facts(lm):
    """Three facts whose attribute is the tiny model's own top prediction (a word), so it
    'knows' them, with one it gets wrong second."""
    facts = []
    for prompt, subject in CANDIDATES:
        top = lm.model(torch.tensor([encode_prompt(lm, prompt)])).logits[0, -1].argmax()
        word = lm.tokenizer.decode([int(top)]).strip()
        if word.isalpha() and len(facts) < 3:
            facts.append(KnownFact(len(facts), prompt, subject, word))
    assert len(facts) == 3
    wrong = KnownFact(9, "Michel Rocard is a native speaker of", "Michel Rocard", "zzzz")
    return [facts[0], wrong, *facts[1:]]


def test_aggregate_keeps_known_facts_and_names_the_mlp_peak(tmp_path):
    lm = tiny_model("llama", layers=6)
    facts = _own_facts(lm)
    assert model_knows(lm, facts) == [True, False, True, True]
    summary = aggregate(
        lm, facts, n=2, samples=2, noise=1.0, tokens="classes", out_dir=tmp_path, progress=False
    )
    assert summary["facts_traced"] == 2 and summary["known_ids"] == [0, 1]
    assert summary["facts_checked"] == 3
    curve = summary["last_subject_token"]["mlp"]["mean"]
    assert len(curve) == 6
    assert summary["mlp_peak_layer"] == max(range(6), key=curve.__getitem__)
    assert sum(summary["mlp_peak_bootstrap"].values()) == pytest.approx(1.0, abs=0.01)
    classes = summary["token_classes"]["hidden"]
    assert classes["middle subject tokens"] is None  # not traced in "classes" mode
    assert len(classes["last token"]) == 6
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["mlp_peak_layer"] == summary["mlp_peak_layer"]
    lines = (tmp_path / "facts.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # resuming traces only what is missing
    more = aggregate(
        lm, facts, n=3, samples=2, noise=1.0, tokens="classes", out_dir=tmp_path, progress=False
    )
    assert more["facts_traced"] == 3
    assert len((tmp_path / "facts.jsonl").read_text().splitlines()) == 3
    assert more["last_subject_token"]["mlp"]["mean"] != curve


runner = CliRunner()


def test_cli_trace_writes_arrays_metadata_and_heatmaps(model_dir, tmp_path):
    out = tmp_path / "trace"
    result = runner.invoke(
        app,
        ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--answer", "Paris",
         "--samples", "2", "--noise", "1.0", "--out", str(out), "--model", model_dir],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("trace.json", "trace.safetensors", "trace.png"):
        assert (out / name).stat().st_size > 0
    for kind in ("hidden", "mlp", "attn"):
        assert (out / f"trace_{kind}.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "trace.json").read_text())
    assert meta["answer"] == "Paris" and meta["samples"] == 2
    assert len(meta["restored"]["mlp"]) == len(meta["tokens"])
    assert "P_clean" in result.output

    one = tmp_path / "one"
    result = runner.invoke(
        app,
        ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "mlp", "--samples", "2",
         "--window", "2", "--out", str(one), "--model", model_dir],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (one / "trace_mlp.png").is_file() and not (one / "trace_hidden.png").exists()
    assert json.loads((one / "trace.json").read_text())["window"] == 2


def test_cli_trace_aggregate(model_dir, tmp_path):
    from lmscalpel import load_model

    lm = load_model(model_dir)
    facts = _own_facts(lm)
    known = tmp_path / "known.json"
    known.write_text(json.dumps([{"known_id": f.known_id, **f.__dict__} for f in facts]))
    out = tmp_path / "agg"
    result = runner.invoke(
        app,
        ["trace", "--known", str(known), "--n", "2", "--samples", "2", "--noise", "1.0",
         "--tokens", "last-subject", "--out", str(out), "--model", model_dir],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert f"peaks at layer {summary['mlp_peak_layer']}" in result.output
    assert (out / "last_subject_token.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "token_classes.png").exists()

    classes = tmp_path / "classes"
    result = runner.invoke(
        app,
        ["trace", "--known", str(known), "--n", "2", "--samples", "2", "--noise", "1.0",
         "--tokens", "classes", "--kind", "mlp", "--out", str(classes), "--model", model_dir],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (classes / "token_classes.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_trace_reports_bad_input_in_one_line(model_dir, tmp_path):
    result = runner.invoke(
        app,
        ["trace", "--prompt", PROMPT, "--subject", "Big Ben", "--noise", "1",
         "--out", str(tmp_path), "--model", model_dir],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "not found" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        app, ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "mlps",
              "--out", str(tmp_path), "--model", model_dir],
    )  # fmt: skip
    assert result.exit_code == 2 and "--kind" in result.output


@pytest.mark.real
def test_trace_on_the_embedded_model(smol):
    prompt, subject = "The Eiffel Tower is located in the city of", "Eiffel Tower"
    n_tokens = len(encode_prompt(smol, prompt))
    subject_pos = subject_token_positions(smol, prompt, subject)
    result = trace(
        smol, prompt, subject, "Paris", kinds="hidden", samples=5,
        positions=[*subject_pos, n_tokens - 1],
    )  # fmt: skip
    restored = result.restored["hidden"]
    assert restored.shape == (n_tokens, 30) == result.indirect_effect("hidden").shape
    assert result.p_clean > 0.3 > 0.1 > result.p_corrupted
    assert restored[-1, -1] == pytest.approx(result.p_clean, abs=1e-4)
    # some subject token's early state carries the fact: restoring it brings much of it back
    assert result.indirect_effect("hidden")[subject_pos, :10].max() > 0.2
