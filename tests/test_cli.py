"""The CLI on a tiny model saved as a local Hugging Face folder: what each command does, checked
through the library (answers, files, the layer ROME edits), not through the words typed."""

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmscalpel import load_model
from lmscalpel.cli import app
from lmscalpel.locate.aggregate import KnownFact, model_knows
from lmscalpel.mechanics import peaks
from lmscalpel.methods import available_methods, editor_class, resolve_layers
from lmscalpel.methods.rome import ROMEConfig
from lmscalpel.patch import Patch
from lmscalpel.scoring import next_token_logprobs, score_targets

runner = CliRunner()
PROMPT = "The Eiffel Tower is located in the city of"
EDIT = ["edit", "--prompt", PROMPT, "--subject", "Eiffel Tower", "--target", "Rome",
        "--target-true", "Paris", "--method", "ft-m", "--set", "lr=0.05",
        "--set", "norm_constraint=5"]  # fmt: skip


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own cache folder (recorded peaks, statistics)."""
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def flat(output: str) -> str:
    """The output with line breaks (rich wraps at the terminal width) made spaces."""
    return " ".join(output.split())


def prefers(lm, prompt, a, b) -> bool:
    """Whether ``lm`` finds continuation ``a`` more likely than ``b`` after ``prompt``."""
    sa, sb = score_targets(lm, [prompt, prompt], [a, b])
    return sa.mean_logprob > sb.mean_logprob


def digests(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def test_info_reports_the_model_and_the_family_depth_layer(model_dir):
    lm = load_model(model_dir)
    depth = ROMEConfig.for_model("llama").default_depth
    expected = resolve_layers(None, [depth], lm.adapter.num_layers)[0]
    result = run("info", "--model", model_dir)
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert lm.fingerprint in out and f"layers │ {lm.adapter.num_layers}" in out
    assert f"ROME edits layer {expected}: the family's default depth ({depth:g}" in out


def test_an_edit_from_the_cli_flips_the_answer_and_its_patch_reapplies(model_dir, tmp_path):
    lm = load_model(model_dir)
    assert prefers(lm, PROMPT, "Paris", "Rome")  # the tiny model's own belief, before
    patch_dir = tmp_path / "eiffel.patch"
    result = run(*EDIT, "--model", model_dir, "--save", patch_dir,
                 "--unrelated", "The Colosseum is in=>Rome")  # fmt: skip
    assert result.exit_code == 0, result.output
    patch = Patch.load(patch_dir)
    assert patch.method == "ft-m" and patch.hyperparameters["lr"] == 0.05
    assert [r.target_new for r in patch.requests] == ["Rome"]
    assert patch.requests[0].locality[0].answer == "Rome"
    fresh = load_model(model_dir)  # the command left the folder's weights alone
    assert prefers(fresh, PROMPT, "Paris", "Rome")
    patch.apply(fresh)
    assert prefers(fresh, PROMPT, "Rome", "Paris")
    patch.revert()
    assert prefers(fresh, PROMPT, "Paris", "Rome")

    export = tmp_path / "exported"
    result = run("apply", patch_dir, "--model", model_dir, "--export", export)
    assert result.exit_code == 0, result.output
    assert prefers(load_model(str(export)), PROMPT, "Rome", "Paris")


def test_generate_and_score_print_the_model_s_own_numbers(model_dir):
    lm = load_model(model_dir)
    result = run("score", PROMPT, "Paris", "Rome", "--model", model_dir, "--top", "0")
    assert result.exit_code == 0, result.output
    for s in score_targets(lm, [PROMPT, PROMPT], ["Paris", "Rome"]):
        assert f"{s.mean_logprob:.3f}" in result.output
    result = run("generate", PROMPT, "--model", model_dir, "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    top = lm.tokenizer.decode([int(next_token_logprobs(lm, [PROMPT]).argmax())])
    assert flat(result.stdout).startswith(flat(PROMPT + top))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subject", "Louvre"], "not found in the prompt"),
        (["--set", "lrr=1"], "lrr"),
        (["--method", "nonsense"], "unknown editing method"),
        (["--editor", "some/folder"], "is for learned editors"),
    ],
)
def test_a_malformed_edit_exits_2_in_one_line_and_touches_no_file(
    model_dir, tmp_path, args, message
):
    patch_dir = tmp_path / "eiffel.patch"
    assert run(*EDIT, "--model", model_dir, "--save", patch_dir).exit_code == 0
    before = digests(patch_dir), digests(model_dir)
    result = run(*EDIT, *args, "--model", model_dir, "--save", patch_dir)
    assert result.exit_code == 2, result.output
    assert not result.stdout.strip(), result.stdout  # the error goes to stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stderr.rstrip().endswith(lines[0])  # (before it: progress bars only)
    assert (digests(patch_dir), digests(model_dir)) == before


def test_a_malformed_requests_file_or_patch_or_model_exits_2(model_dir, tmp_path):
    bad = tmp_path / "requests.jsonl"
    bad.write_text(json.dumps({"prompt": PROMPT, "subject": "Eiffel Tower"}) + "\n")
    result = run("edit", "--requests", bad, "--model", model_dir)
    assert result.exit_code == 2, result.output
    assert result.stderr.rstrip().splitlines()[-1].startswith("error:"), result.output
    result = run("info", "--model", "/no/such/folder")
    assert result.exit_code == 2 and "no model file or folder" in result.output
    result = run("apply", tmp_path / "no-patch", "--model", model_dir)
    assert result.exit_code == 2 and "not a saved patch" in result.output
    result = run("edit", "--prompt", PROMPT, "--model", model_dir)  # no subject, no target
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_methods_prints_every_field_with_its_family_default(model_dir):
    result = run("methods", "--family", "llama")
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    for name in available_methods():
        config = editor_class(name).config_class
        assert f"{name}:" in out and config.__name__ in out
        for field in config.describe("llama"):
            assert f"│ {field.name} " in out, (name, field.name)
    llama = ROMEConfig.for_model("llama").default_depth
    assert llama != ROMEConfig().default_depth
    rome = flat(run("methods", "rome", "--family", "llama").output)
    assert f"│ default_depth │ float │ {llama!r} " in rome and "mend" not in rome.split("│")[0]
    generic = flat(run("methods", "rome").output)
    assert f"│ default_depth │ float │ {ROMEConfig().default_depth!r} " in generic
    result = run("edit", "--help-config", "--method", "rome", "--model", model_dir)
    assert result.exit_code == 0 and f"{llama!r}" in result.output, result.output
    result = run("methods", "nonsense")
    assert result.exit_code == 2 and "unknown editing method" in result.output
    assert run("methods", "--family", "nonsense").exit_code == 2


def _known_facts(lm, count: int) -> list[KnownFact]:
    """``count`` facts whose attribute is the tiny model's own top prediction, so it knows them."""
    names = ["Eiffel", "Apple", "Colosseum", "Danielle", "Michel", "Toko", "Larry", "Steve"]
    subjects = [f"{a} {b}" for a in names for b in reversed(names) if a != b]
    prompts = [f"{s} is located in the city of" for s in subjects]
    top = next_token_logprobs(lm, prompts).argmax(-1).tolist()
    facts = [
        KnownFact(i, p, s, lm.tokenizer.decode([t]).strip())
        for i, (p, s, t) in enumerate(zip(prompts, subjects, top))
    ]
    facts = [f for f, ok in zip(facts, model_knows(lm, facts)) if ok]
    assert len(facts) >= count
    return facts[:count]


def test_tracing_records_rome_s_layer_only_when_asked(model_dir, tmp_path, home):
    lm = load_model(model_dir)
    known = tmp_path / "known.json"
    known.write_text(json.dumps([f.__dict__ for f in _known_facts(lm, peaks.MIN_FACTS)]))
    trace = ["trace", "--known", known, "--n", peaks.MIN_FACTS, "--samples", "2",
             "--noise", "1.0", "--model", model_dir]  # fmt: skip
    depth = ROMEConfig.for_model("llama").layer_choice(lm.adapter.num_layers, lm.fingerprint)
    assert depth.reason == "depth"

    result = run(*trace, "--out", tmp_path / "plain")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["facts_traced"] == peaks.MIN_FACTS
    peak = summary["mlp_peak_layer"]
    assert peak != depth.layer  # so the two cases below can tell the layers apart
    assert "add --record-peak" in flat(result.output)
    assert not peaks.peaks_file().exists() and not any(home.rglob("peaks.json"))
    config = ROMEConfig.for_model("llama")
    assert config.layer_choice(lm.adapter.num_layers, lm.fingerprint) == depth
    assert f"ROME edits layer {depth.layer}: the family's default" in flat(
        run("info", "--model", model_dir).output
    )

    result = run(*trace, "--out", tmp_path / "recorded", "--record-peak")
    assert result.exit_code == 0, result.output
    choice = config.layer_choice(lm.adapter.num_layers, lm.fingerprint)
    assert (choice.layer, choice.reason, choice.peak.facts) == (peak, "recorded", peaks.MIN_FACTS)
    assert choice.peak.recorded  # when
    info = flat(run("info", "--model", model_dir).output)
    assert f"ROME edit layer │ {peak} (your recorded trace peak)" in info
    assert f"ROME edits layer {peak}: MLP peak of your causal-tracing aggregate " in info
    assert f"({peaks.MIN_FACTS} known facts, window {summary['window']}), recorded " in info
    assert choice.peak.recorded in info
    assert run("stats", "--model", model_dir, "--samples", "20").stdout.startswith(
        f"layer {peak}:"
    )  # every later ROME default follows the recorded peak


def test_record_peak_refuses_what_cannot_give_a_default(model_dir, tmp_path):
    args = ["trace", "--out", tmp_path, "--model", model_dir, "--record-peak"]
    result = run(*args, "--prompt", PROMPT, "--subject", "Eiffel Tower")
    assert result.exit_code == 2 and "--known" in result.output
    known = tmp_path / "known.json"
    known.write_text("[]")
    result = run(*args, "--known", known, "--n", peaks.MIN_FACTS - 1)
    assert result.exit_code == 2 and f"at least {peaks.MIN_FACTS} facts" in result.output
    result = run(*args, "--known", known, "--kind", "hidden")
    assert result.exit_code == 2 and "MLP" in result.output
    assert not peaks.peaks_file().exists()


def test_demo_edits_then_reverts_with_the_patch_s_own_check(model_dir, monkeypatch):
    reverts = []
    real = Patch.revert

    def counted(self, *args):
        real(self, *args)  # raises PatchError unless every touched tensor has its digest again
        reverts.append(self.method)

    monkeypatch.setattr(Patch, "revert", counted)
    result = run("demo", "--model", model_dir, "--method", "ft-l")
    assert result.exit_code == 0, result.output
    assert reverts == ["ft-l"] and "weights restored bit-exactly" in flat(result.stdout)
