"""Traces and known-facts aggregates written to a folder (lmscalpel.locate.outputs), the library
side of `lmscalpel trace`; they record nothing outside the folder."""

import json

import pytest
import torch

from lmscalpel.locate import trace
from lmscalpel.locate.aggregate import KnownFact, kind_peaks, model_knows
from lmscalpel.locate.outputs import save_trace, strongest_restorations, trace_known_facts
from lmscalpel.mechanics.peaks import peaks_file
from lmscalpel.scoring import next_token_logprobs
from lmscalpel.testing import tiny_model

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_save_trace_writes_arrays_and_a_heatmap_per_kind(tmp_path):
    lm = tiny_model("llama")
    result = trace(lm, PROMPT, "Eiffel Tower", "Paris", samples=2, noise=1.0)
    files = save_trace(result, tmp_path / "t")
    names = sorted(p.name for p in files)
    assert names == sorted(["trace.json", "trace.safetensors", "trace.png",
                            "trace_hidden.png", "trace_mlp.png", "trace_attn.png"])  # fmt: skip
    assert all(p.stat().st_size > 0 for p in files)
    rows = {row.kind: row for row in strongest_restorations(result)}
    for kind in result.kinds:
        effect = torch.nan_to_num(result.indirect_effect(kind), nan=-float("inf"))
        assert rows[kind].effect == pytest.approx(float(effect.max()))
        assert rows[kind].restored == pytest.approx(
            float(result.restored[kind][rows[kind].token, rows[kind].layer])
        )
    only_mlp = trace(lm, PROMPT, "Eiffel Tower", kinds="mlp", samples=2, noise=1.0)
    assert [p.name for p in save_trace(only_mlp, tmp_path / "m")][-1] == "trace_mlp.png"


def test_trace_known_facts_writes_the_summary_and_plots_and_names_the_peaks(tmp_path, home):
    lm = tiny_model("llama")
    subjects = ["Eiffel Tower", "Apple Jobs", "Michel Rocard", "Larry Gates", "Toko Yasuda"]
    prompts = [f"{s} is located in the city of" for s in subjects]
    top = next_token_logprobs(lm, prompts).argmax(-1).tolist()
    facts = [KnownFact(i, p, s, lm.tokenizer.decode([t]).strip())
             for i, (p, s, t) in enumerate(zip(prompts, subjects, top))]  # fmt: skip
    facts = [f for f, ok in zip(facts, model_knows(lm, facts)) if ok][:3]
    known = tmp_path / "known.json"
    known.write_text(json.dumps([f.__dict__ for f in facts]))
    done = trace_known_facts(lm, known, tmp_path / "agg", n=3, samples=2, noise=1.0,
                             tokens="classes", progress=False)  # fmt: skip
    assert done.summary == json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert [p.name for p in done.files] == [
        "summary.json", "last_subject_token.png", "token_classes.png"
    ]  # fmt: skip
    assert done.summary["facts_traced"] == len(facts)
    peaks = {p.kind: p for p in done.peaks}
    assert done.peaks == kind_peaks(done.summary)
    mean = done.summary["last_subject_token"]["mlp"]["mean"]
    assert peaks["mlp"].layer == done.mlp_peak_layer == max(range(len(mean)), key=mean.__getitem__)
    assert peaks["mlp"].effect == mean[peaks["mlp"].layer]
    last = done.summary["token_classes"]["mlp"]["last token"]
    assert peaks["mlp"].last_token_effect == last[peaks["mlp"].layer]
    assert not peaks_file().exists() and not any(home.rglob("peaks.json"))
