"""The runner's output folder: resuming a killed run, refusing another run's folder, the CLI."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmscalpel import save_requests
from lmscalpel.cli import app
from lmscalpel.evaluation import EvalOptions, EvaluationError, evaluate, load_cases
from lmscalpel.evaluation.store import JsonLines
from lmscalpel.methods import base
from lmscalpel.testing import tiny_model
from test_evaluation_protocols import (  # noqa: F401 (one_thread: an autouse fixture)
    FAST,
    STRONG,
    assert_pristine,
    make_cases,
    one_thread,
    weights,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class PowerCut(RuntimeError):
    pass


class Flaky:
    """ft-l's compute, counting its calls (by case id) and failing on call number ``fail_at``."""

    def __init__(self, monkeypatch, fail_at):
        self.calls, self.fail_at = [], fail_at
        cls = base.editor_class("ft-l")
        real = cls.compute

        def compute(editor, lm, requests, config):
            self.calls.append(requests[0].case_id)
            if len(self.calls) == self.fail_at:
                raise PowerCut("killed")
            return real(editor, lm, requests, config)

        monkeypatch.setattr(cls, "compute", compute)


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_a_killed_run_resumes_without_redoing_finished_cases(monkeypatch, tmp_path, protocol):
    lm = tiny_model("llama")
    saved = weights(lm)
    cases = make_cases()
    run = dict(options=FAST, protocol=protocol, out=tmp_path / "run", progress=False)
    flaky = Flaky(monkeypatch, fail_at=3)
    with pytest.raises(PowerCut):
        evaluate(lm, cases, "ft-l", STRONG, **run)
    assert_pristine(lm, saved)  # also after the crash
    sink = JsonLines(tmp_path / "run" / "ft-l" / "cases.jsonl")
    assert [r["case_id"] for r in sink.read()] == [0, 1]
    with open(sink.path, "ab") as handle:  # killed in the middle of writing a record
        handle.write(b'{"key": "2", "case_id": 2, "metr')
    flaky.calls, flaky.fail_at = [], None
    resumed = evaluate(lm, cases, "ft-l", STRONG, **run)
    assert flaky.calls == [2, 3, 4]  # finished cases were not edited again
    records = sink.read()
    assert [r["case_id"] for r in records] == [0, 1, 2, 3, 4]
    assert_pristine(lm, saved)

    monkeypatch.undo()  # the same run without interruption gives the same numbers
    clean = evaluate(lm, cases, "ft-l", STRONG, **{**run, "out": tmp_path / "clean"})
    for key in ("ES", "PS", "NS", "edit_acc", "locality_unchanged", "fluency"):
        assert resumed.rows["ft-l"].get(key) == pytest.approx(clean.rows["ft-l"].get(key)), key
    if protocol == "sequential":
        assert [p["edits"] for p in resumed.retention["ft-l"]] == [1, 3, 5]


def test_a_finished_run_started_again_only_rewrites_the_summary(monkeypatch, tmp_path):
    lm = tiny_model("llama")
    first = evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=tmp_path,
                     progress=False)  # fmt: skip
    flaky = Flaky(monkeypatch, fail_at=None)
    again = evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=tmp_path,
                     progress=False)  # fmt: skip
    assert flaky.calls == []
    assert again.rows == first.rows


def test_an_output_folder_of_another_run_is_refused(tmp_path):
    lm = tiny_model("llama")
    evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=tmp_path, progress=False)
    with pytest.raises(EvaluationError, match="other cases"):
        evaluate(lm, make_cases(3), "ft-l", STRONG, options=FAST, out=tmp_path, progress=False)
    with pytest.raises(EvaluationError, match="another configuration"):
        evaluate(lm, make_cases(2), "ft-l", {"lr": 0.01}, options=FAST, out=tmp_path,
                 progress=False)  # fmt: skip
    other = EvalOptions(**{**FAST.to_dict(), "fluency_tokens": 9})
    with pytest.raises(EvaluationError, match="other evaluation settings"):
        evaluate(lm, make_cases(2), "ft-l", STRONG, options=other, out=tmp_path, progress=False)
    summary = evaluate(lm, make_cases(3), "ft-l", STRONG, options=FAST, out=tmp_path,
                       overwrite=True, progress=False)  # fmt: skip
    assert summary.n_cases == 3
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(EvaluationError, match="holds no evaluation run"):
        evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=stranger, overwrite=True,
                 progress=False)  # fmt: skip
    assert (stranger / "notes.txt").read_text() == "mine"


# ---- the CLI -----------------------------------------------------------------------------------
runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "requests.jsonl"
    save_requests([r for c in make_cases(3) for r in c.requests], path)
    return str(path)


FAST_FLAGS = ["--fluency-cases", "1", "--fluency-tokens", "6", "--fluency-prompts", "1"]


def test_cli_eval_prints_the_baseline_and_writes_every_output(model_dir, data_file, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--method", "ft-l", "--data", data_file, "--n", "2",
                                 "--model", model_dir, "--out", str(out), "--set", "lr=0.05",
                                 *FAST_FLAGS])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "unedited" in result.output and "ft-l" in result.output and "ES" in result.output
    for name in ("summary.json", "table.md", "metrics.png", "run.json", "baseline.jsonl"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["info"]["layout"] == "requests"
    assert summary["info"]["methods"]["ft-l"]["config"]["lr"] == 0.05


def test_cli_compare_and_sequential(model_dir, data_file, tmp_path):
    out = tmp_path / "cmp"
    config = tmp_path / "methods.yaml"
    config.write_text("ft-l: {steps: 4, lr: 0.05}\nft-m: {steps: 5}\n")
    result = runner.invoke(app, ["compare", "--methods", "ft-l,ft-m", "--data", data_file,
                                 "--model", model_dir, "--out", str(out), "--protocol",
                                 "sequential", "--checkpoints", "1,2", "--config", str(config),
                                 "--set", "ft-m.steps=3", "--set", "lr=0.02", *FAST_FLAGS])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["rows"]) == ["unedited", "ft-l", "ft-m"]
    ft_l, ft_m = (summary["info"]["methods"][m]["config"] for m in ("ft-l", "ft-m"))
    assert (ft_l["steps"], ft_m["steps"]) == (4, 3)  # YAML section, then --set method.key
    assert ft_l["lr"] == ft_m["lr"] == 0.02  # --set key: every method that has it
    assert (out / "retention.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nonsense=1"], "nonsense"),
        (["--protocol", "parallel"], "protocol"),
        (["--data", "/nonexistent.json"], "no data file"),
    ],
)
def test_cli_reports_mistakes_in_one_line(model_dir, data_file, tmp_path, args, message):
    base_args = ["eval", "--method", "ft-l", "--data", data_file, "--model", model_dir,
                 "--out", str(tmp_path / "x")]  # fmt: skip
    result = runner.invoke(app, base_args + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.real
@pytest.mark.skipif(not (SHARED / "counterfact").is_dir(), reason="../shared/data is not present")
def test_ft_l_on_real_counterfact_cases(smol, tmp_path):
    cases = load_cases(SHARED / "counterfact" / "edit.json", 3)
    options = EvalOptions(fluency_cases=1, fluency_prompts=1, fluency_tokens=20)
    summary = evaluate(smol, cases, "ft-l", options=options, out=tmp_path, progress=False)
    base_row, row = summary.rows["unedited"], summary.rows["ft-l"]
    assert row["ES"] > base_row["ES"] and row["edit_acc"] > base_row["edit_acc"]
    assert 0.0 <= row["NS"] <= 1.0 and row["fluency"] > 2.0
    assert smol.context_patches == []
