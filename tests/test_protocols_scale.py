"""Protocols at scale on a tiny model: sequential editing in groups of N (one editor call per
group, checkpoints that measure every earlier edit), resuming a killed run, batch size 1 as the
one-at-a-time protocol, methods that take one request per call or carry state along a sequence,
the unedited measurements shared between runs, and retention plots with several methods."""

import json
import math
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

from lmscalpel import save_requests
from lmscalpel.cli import app
from lmscalpel.core.config import MethodConfig
from lmscalpel.evaluation import (
    EvalOptions,
    EvaluationError,
    MethodSpec,
    compare,
    evaluate,
    plots,
    protocols,
)
from lmscalpel.evaluation.aggregate import aggregate, case_metrics
from lmscalpel.evaluation.measure import measure
from lmscalpel.evaluation.options import DEFAULT_CHECKPOINTS, comparable_settings
from lmscalpel.evaluation.store import JsonLines
from lmscalpel.methods import base
from lmscalpel.patch import ParameterDelta, Patch
from lmscalpel.testing import tiny_model
from test_evaluation_protocols import (  # noqa: F401 (one_thread: an autouse fixture)
    FAST,
    STRONG,
    assert_pristine,
    make_cases,
    one_thread,
    weights,
)

STEP = 0.25  # what the stand-in editor adds for each request


class MarkingEditor(base.Editor):
    """A stand-in weight method: request with case id i adds ``STEP`` to entry (0, i) of the first
    MLP output matrix, so the weights show exactly which edits the model carries."""

    name: ClassVar[str] = "test-mark"
    config_class: ClassVar[type] = MethodConfig
    calls: ClassVar[list[list[int]]] = []

    def compute(self, lm, requests, config):
        type(self).calls.append([r.case_id for r in requests])
        name = lm.adapter.mlp_out_weight_name(0)
        delta = torch.zeros_like(lm.model.get_parameter(name))
        for request in requests:
            delta[0, request.case_id] += STEP
        return Patch.from_deltas(lm, self.name, requests, [ParameterDelta.from_dense(name, delta)])


class OneAtATime(MarkingEditor):
    """The same, declaring that it takes one request per call (as a single-request method would)."""

    name: ClassVar[str] = "test-mark-one"
    max_requests_per_call: ClassVar[int] = 1


class SequenceAware(MarkingEditor):
    """The same, told its earlier patches of the sequence (as AlphaEdit needs the earlier keys)."""

    name: ClassVar[str] = "test-mark-sequence"
    earlier: ClassVar[list[list[int]]] = []

    def compute_in_sequence(self, lm, requests, config, earlier):
        type(self).earlier.append([r.case_id for p in earlier for r in p.requests])
        return self.compute(lm, requests, config)


EDITORS = (MarkingEditor, OneAtATime, SequenceAware)


@pytest.fixture(autouse=True)
def stand_ins():
    """The stand-in editors registered for one test (other tests may list every method)."""
    for cls in EDITORS:
        base.register(cls)
        cls.calls = []
    SequenceAware.earlier = []
    yield
    for cls in EDITORS:
        base._REGISTRY.pop(cls.name)


@pytest.fixture
def lm():
    return tiny_model("llama")


def options(**changes):
    return EvalOptions(**{**FAST.to_dict(), "protocol": "sequential", **changes})


def marked(lm, pristine):
    """The case ids whose edits the model carries now."""
    name = lm.adapter.mlp_out_weight_name(0)
    row = lm.model.get_parameter(name)[0] - pristine[name][0]
    return sorted(int(i) for i in torch.nonzero(row.abs() > STEP / 2).flatten())


@pytest.fixture
def measured(monkeypatch, lm):
    """Every measurement the protocols make: (case keys measured, edits the model carries)."""
    pristine, seen = weights(lm), []

    def spy(lm_, cases, options_, **kwargs):
        seen.append(([c.key for c in cases], marked(lm_, pristine)))
        return measure(lm_, cases, options_, **kwargs)

    monkeypatch.setattr(protocols, "measure", spy)
    return seen


def test_checkpoints_move_to_the_first_group_boundary_at_or_after_them():
    default = EvalOptions()
    assert default.checkpoints == DEFAULT_CHECKPOINTS == (1, 10, 100, 500, 1000, 2000)
    assert default.checkpoints_for(2000, 100) == [100, 500, 1000, 2000]
    assert default.checkpoints_for(2000) == [1, 10, 100, 500, 1000, 2000]
    assert default.checkpoints_for(1000, 300) == [300, 600, 1000]
    assert default.checkpoints_for(5, 2) == [2, 5]
    assert EvalOptions(checkpoints=(1, 3)).checkpoints_for(5, 2) == [2, 4, 5]
    assert EvalOptions(protocol="sequential").group_size == 1
    assert EvalOptions(protocol="sequential", batch_size=100).group_size == 100
    assert EvalOptions(protocol="batch").group_size is None


def test_settings_a_protocol_ignores_do_not_stop_a_resume():
    old_single = {**EvalOptions().measurement_settings(), "checkpoints": [1, 10, 100, 1000]}
    assert comparable_settings(old_single) == comparable_settings(
        EvalOptions().measurement_settings()
    )
    sequential = EvalOptions(protocol="sequential").measurement_settings()
    ones = EvalOptions(protocol="sequential", batch_size=1).measurement_settings()
    assert comparable_settings(sequential) == comparable_settings(ones)
    twos = EvalOptions(protocol="sequential", batch_size=2).measurement_settings()
    assert comparable_settings(sequential) != comparable_settings(twos)


def test_sequential_groups_make_one_call_each_and_checkpoints_measure_all_earlier_edits(
    lm, measured, tmp_path
):
    saved = weights(lm)
    cases = make_cases()
    summary = evaluate(lm, cases, "test-mark", options=options(batch_size=2), out=tmp_path,
                       progress=False)  # fmt: skip
    assert MarkingEditor.calls == [[0, 1], [2, 3], [4]]  # one editor call per group of 2
    assert_pristine(lm, saved)
    curve = summary.retention["test-mark"]
    assert [p["edits"] for p in curve] == [2, 4, 5]  # checkpoints 1, 3 moved to 2, 4; the end
    keys = [str(i) for i in range(5)]
    assert (
        measured
        == [  # (cases measured, edits the model carries)
            (keys[:2], [0, 1]),  # group 0, right after its edit
            (keys[:2], [0, 1]),  # checkpoint 2 (asked for 1): all earlier edits
            (keys[2:4], [0, 1, 2, 3]),  # group 1
            (keys[:4], [0, 1, 2, 3]),  # checkpoint 4 (asked for 3)
            (keys[4:], [0, 1, 2, 3, 4]),  # group 2 (the last, shorter)
            (keys, [0, 1, 2, 3, 4]),  # the end
        ]
    )
    records = JsonLines(tmp_path / "test-mark" / "cases.jsonl").read()
    assert [r["position"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["batch"] for r in records] == [0, 0, 1, 1, 2]
    by_group = {}
    for record in records:
        by_group.setdefault(record["batch"], []).append(record)
    for group in by_group.values():  # the group's editing time is shared among its cases
        total = sum(r["edit_seconds"] for r in group)
        assert total == pytest.approx(group[0]["batch_seconds"])
    row = summary.rows["test-mark"]
    assert row["n_edits"] == 5 and row["seconds_per_edit"] > 0
    assert summary.batch_size == 2
    assert "2 cases per editor call" in (tmp_path / "table.md").read_text()


def reference_curve(lm, cases, opts, size, points):
    """The sequential protocol by hand: groups applied one after another, every earlier case
    measured at the checkpoints."""
    pre = measure(lm, cases, opts, fluency_keys={c.key for c in cases[: opts.fluency_cases]})
    editor, applied, curve = base.get_editor("test-mark"), [], {}
    config = editor.config_for(lm)
    for start in range(0, len(cases), size):
        group = cases[start : start + size]
        patch = editor.compute(lm, [r for c in group for r in c.requests], config)
        applied.append(patch.apply(lm))
        done = start + len(group)
        if done in points:
            post = measure(lm, cases[:done], opts)
            curve[done] = aggregate(case_metrics(post[c.key], pre[c.key]) for c in cases[:done])
    for patch in reversed(applied):
        patch.revert()
    return curve


@pytest.mark.parametrize("size", [1, 2])
def test_sequential_results_equal_editing_group_after_group_by_hand(lm, tmp_path, size):
    cases = make_cases()
    opts = options(batch_size=size, fluency_cases=0)
    summary = evaluate(lm, cases, "test-mark", options=opts, out=tmp_path, progress=False)
    points = opts.checkpoints_for(len(cases), size)
    expected = reference_curve(lm, cases, opts, size, points)
    curve = {p["edits"]: p for p in summary.retention["test-mark"]}
    assert sorted(curve) == sorted(expected) == points
    for k, metrics in expected.items():
        for key, value in metrics.items():
            assert curve[k][key] == pytest.approx(value, abs=1e-6), (k, key)


def test_batch_size_one_is_the_one_at_a_time_protocol(lm, tmp_path):
    """--batch-size 1 and no batch size give the same records (and those of the protocol before
    groups existed: no batch fields, a checkpoint after every requested number of edits)."""
    cases = make_cases()
    runs = {}
    for name, size in (("none", None), ("one", 1)):
        evaluate(lm, cases, "ft-l", STRONG, options=options(batch_size=size), out=tmp_path / name,
                 progress=False)  # fmt: skip
        records = JsonLines(tmp_path / name / "ft-l" / "cases.jsonl").read()
        points = JsonLines(tmp_path / name / "ft-l" / "checkpoints.jsonl").read()
        runs[name] = (stripped(records), stripped(points))
    assert runs["none"] == runs["one"]
    records, points = runs["one"]
    assert [p["edits"] for p in points] == [1, 3, 5]
    assert all("batch" not in r for r in records)
    assert [r["position"] for r in records] == [1, 2, 3, 4, 5]


TIMING = {"edit_seconds", "peak_memory_mb", "memory_overhead_mb", "batch_seconds", "seconds"}


def stripped(records):
    """Records without their timings and memory (which differ from run to run), floats rounded."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in TIMING}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, float):
            return round(value, 5)
        return value

    return [clean(r) for r in records]


class PowerCut(RuntimeError):
    pass


def cut_in_compute(monkeypatch, cls, at):
    real = cls.compute

    def compute(self, lm_, requests, config):
        if len(cls.calls) + 1 == at:
            cls.calls.append("cut")
            raise PowerCut("killed while editing")
        return real(self, lm_, requests, config)

    monkeypatch.setattr(cls, "compute", compute)


def cut_while_recording(monkeypatch, at):
    """The run dies while writing case number ``at``'s record (after its group's state was saved)."""
    real, count = JsonLines.append, [0]

    def append(self, record):
        if self.path.name == "cases.jsonl":
            count[0] += 1
            if count[0] == at:
                raise PowerCut("killed while recording")
        real(self, record)

    monkeypatch.setattr(JsonLines, "append", append)


@pytest.mark.parametrize("where", ["compute", "record"])
def test_a_run_killed_mid_sequence_resumes_to_the_same_records(lm, monkeypatch, tmp_path, where):
    saved = weights(lm)
    cases = make_cases()
    run = dict(options=options(batch_size=2), progress=False)
    clean = evaluate(lm, cases, "test-mark-sequence", out=tmp_path / "clean", **run)
    SequenceAware.calls, SequenceAware.earlier = [], []

    with monkeypatch.context() as patched:
        if where == "compute":
            cut_in_compute(patched, SequenceAware, at=2)  # dies editing the second group
        else:
            cut_while_recording(patched, at=4)  # dies recording the second group's 2nd case
        with pytest.raises(PowerCut):
            evaluate(lm, cases, "test-mark-sequence", out=tmp_path / "cut", **run)
    assert_pristine(lm, saved)
    before = [c for c in SequenceAware.calls if c != "cut"]
    SequenceAware.calls = []
    resumed = evaluate(lm, cases, "test-mark-sequence", out=tmp_path / "cut", **run)
    assert_pristine(lm, saved)
    redone = [[0, 1]] if where == "compute" else [[0, 1], [2, 3]]
    assert before == redone  # what ran before the cut
    assert SequenceAware.calls == [[[2, 3], [4]], [[4]]][where == "record"]  # nothing edited twice
    # the sequence-aware editor saw all its earlier patches, also those reloaded after the cut
    assert SequenceAware.earlier[-1] == [0, 1, 2, 3]
    for name in ("cases.jsonl", "checkpoints.jsonl"):
        got = JsonLines(tmp_path / "cut" / "test-mark-sequence" / name).read()
        want = JsonLines(tmp_path / "clean" / "test-mark-sequence" / name).read()
        assert stripped(got) == stripped(want), name
    assert resumed.rows["test-mark-sequence"]["ES"] == clean.rows["test-mark-sequence"]["ES"]
    assert not (tmp_path / "cut" / "test-mark-sequence" / "state").exists()


def test_a_one_request_method_gets_its_group_one_request_after_another(lm, measured, tmp_path):
    cases = make_cases()
    for protocol in ("sequential", "batch"):
        OneAtATime.calls = []
        summary = evaluate(lm, cases, "test-mark-one", options=options(protocol=protocol,
                           batch_size=3), out=tmp_path / protocol, progress=False)  # fmt: skip
        assert OneAtATime.calls == [[0], [1], [2], [3], [4]]
        assert summary.rows["test-mark-one"]["n_edits"] == 5
    # batch protocol: the group's cases measured together, with all three of its edits applied
    assert (["0", "1", "2"], [0, 1, 2]) in measured and (["3", "4"], [3, 4]) in measured


def test_batch_protocol_takes_any_batch_size_and_records_seconds_per_edit(lm, tmp_path):
    cases = make_cases()
    for size in (1, 2, 5, 100):
        MarkingEditor.calls = []
        opts = EvalOptions(**{**FAST.to_dict(), "protocol": "batch", "batch_size": size})
        summary = evaluate(lm, cases, "test-mark", options=opts, out=tmp_path / str(size),
                           progress=False)  # fmt: skip
        assert [len(c) for c in MarkingEditor.calls] == [
            min(size, 5 - i) for i in range(0, 5, size)
        ]
        row = summary.rows["test-mark"]
        assert row["n_edits"] == 5 and row["seconds_per_edit"] > 0
        assert summary.batch_size == min(size, 5)


def test_runs_of_other_protocols_reuse_the_unedited_measurements(lm, monkeypatch, tmp_path):
    cases = make_cases()
    first = evaluate(lm, cases, "test-mark", options=options(), out=tmp_path / "a", progress=False)
    calls = []
    real = measure

    def counting(lm_, cases_, options_, **kwargs):
        calls.append(len(cases_))
        return real(lm_, cases_, options_, **kwargs)

    from lmscalpel.evaluation import runner

    monkeypatch.setattr(runner, "measure", counting)
    again = evaluate(lm, cases[:4], "test-mark", options=options(batch_size=2),
                     out=tmp_path / "b", baseline_from=[tmp_path / "a", tmp_path / "none"],
                     progress=False)  # fmt: skip
    assert calls == []  # the unedited model was not measured again
    assert again.rows["unedited"]["NS"] == pytest.approx(
        aggregate(
            case_metrics(r["pre"]) for r in JsonLines(tmp_path / "a" / "baseline.jsonl").read()[:4]
        )["NS"]
    )
    assert first.rows["unedited"]["n_cases"] == 5
    other = options(fluency_tokens=9)
    with pytest.raises(EvaluationError, match="cannot reuse"):
        evaluate(lm, cases, "test-mark", options=other, out=tmp_path / "c",
                 baseline_from=[tmp_path / "a"], progress=False)  # fmt: skip


def test_retention_plot_has_several_methods_on_one_plot(lm, monkeypatch, tmp_path):
    figures = []
    real = plots._save

    def keep(fig, path):
        figures.append((path.name, [[line.get_label() for line in ax.lines] for ax in fig.axes]))
        real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    specs = [MethodSpec("test-mark"), MethodSpec("test-mark-one", label="one at a time"),
             MethodSpec("test-mark-sequence")]  # fmt: skip
    summary = compare(lm, make_cases(), specs, options=options(batch_size=2), out=tmp_path,
                      progress=False)  # fmt: skip
    assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"
    lines = dict(figures)["retention.png"]
    names = ["test-mark", "one at a time", "test-mark-sequence"]
    assert lines[0][:3] == names  # ES panel: one line per method, then the unedited reference
    panels = [n for n in lines if n]
    assert len(panels) >= 4  # ES, PS, NS, locality (and fluency, edit accuracy)
    assert set(summary.retention) == set(names)
    table = (tmp_path / "table.md").read_text()
    assert "**one at a time**" in table and "| 0 |" in table  # unedited reference row
    path = plots.plot_curves(
        {"memit": [{"batch_size": 1, "ES": 1.0}, {"batch_size": 1000, "ES": 0.9}],
         "alphaedit": [{"batch_size": 1, "ES": 1.0}, {"batch_size": 1000, "ES": 0.95}]},
        tmp_path / "sizes.png", x="batch_size", xlabel="requests per call", title="t",
    )  # fmt: skip
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert dict(figures)["sizes.png"][0] == ["memit", "alphaedit"]


# ---- the CLI -----------------------------------------------------------------------------------
runner_cli = CliRunner()
FAST_FLAGS = ["--fluency-cases", "1", "--fluency-tokens", "6", "--fluency-prompts", "1"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "requests.jsonl"
    save_requests([r for c in make_cases() for r in c.requests], path)
    return str(path)


def test_cli_sequential_in_groups_and_batch_compare(model_dir, data_file, tmp_path):
    out = tmp_path / "seq"
    result = runner_cli.invoke(app, ["compare", "--methods", "test-mark,test-mark-one", "--data",
                                     data_file, "--model", model_dir, "--out", str(out),
                                     "--protocol", "sequential", "--batch-size", "2",
                                     "--checkpoints", "1,3", *FAST_FLAGS])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch_size"] == 2
    assert [p["edits"] for p in summary["retention"]["test-mark"]] == [2, 4, 5]
    assert (out / "retention.png").is_file() and "retention.png" in result.output
    out = tmp_path / "batch"
    result = runner_cli.invoke(app, ["eval", "--method", "test-mark", "--data", data_file,
                                     "--model", model_dir, "--out", str(out), "--protocol",
                                     "batch", "--batch-size", "3", *FAST_FLAGS])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch_size"] == 3 and summary["rows"]["test-mark"]["n_edits"] == 5
    assert math.isfinite(summary["rows"]["test-mark"]["seconds_per_edit"])


def test_cli_default_checkpoints_are_the_options_default():
    import inspect

    from lmscalpel.cli.evaluate import evaluate_command

    default = inspect.signature(evaluate_command).parameters["checkpoints"].default
    assert tuple(int(c) for c in default.split(",")) == DEFAULT_CHECKPOINTS


# ---- the benchmark's plan and target checks (no model) ------------------------------------------
def benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mass_lifelong.py"
    spec = importlib.util.spec_from_file_location("mass_lifelong", path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["mass_lifelong"] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_plans_the_issues_runs_and_reduces_them():
    bench = benchmark()
    full = {r.name: r for r in bench.plan(bench.parse_args([]))}
    assert list(full) == ["sequential-100", "sequential-1", "batch-1", "batch-10", "batch-100",
                          "batch-1000"]  # fmt: skip
    assert full["sequential-100"] == bench.Run("sequential-100", "sequential", 100,
                                               ("alphaedit", "memit", "rome"), 2000)  # fmt: skip
    assert full["sequential-1"].methods == ("alphaedit", "rome") and full["sequential-1"].n == 1000
    assert full["batch-1000"].methods == ("memit", "alphaedit") and full["batch-1000"].n == 1000
    small = bench.plan(bench.parse_args(["--n", "50", "--sizes", "1,10,100", "--only", "batch",
                                         "--methods", "memit"]))  # fmt: skip
    assert [(r.name, r.n, r.methods) for r in small] == [
        ("batch-1", 50, ("memit",)),
        ("batch-10", 50, ("memit",)),
    ]  # batch 100 > 50 cases: left out
    sized = bench.plan(bench.parse_args(["--sizes", "1:50,1000", "--only", "batch"]))
    assert [(r.name, r.n, r.folder) for r in sized] == [
        ("batch-1", 50, "batch-1-n50"),  # SIZE:N: that size on the first N cases
        ("batch-1000", 1000, "batch-1000-n1000"),
    ]


def test_benchmark_compares_each_method_s_largest_sequence():
    bench = benchmark()
    found = {
        "sequential-100-n2000": {"retention": {"alphaedit": [{"edits": 2000, "ES": 0.9}]}},
        "sequential-100-n500": {
            "retention": {"memit": [{"edits": 500}], "alphaedit": [{"edits": 500}]}
        },
        "sequential-1-n50": {"retention": {"rome": [{"edits": 50}]}},
    }
    partial = {"sequential-1-n1000": {"rome": [{"edits": 10}, {"edits": 100}]}}
    curves = bench.labelled(bench.longest_curves(found, partial))
    assert curves["sequential-100"] == {
        "alphaedit (2000 edits)": [{"edits": 2000, "ES": 0.9}],
        "memit (500 edits)": [{"edits": 500}],
    }
    assert curves["sequential-1"] == {"rome (100 edits)": [{"edits": 10}, {"edits": 100}]}


def test_benchmark_reads_rome_one_at_a_time_from_its_sequence_in_groups():
    bench = benchmark()
    args = bench.parse_args(["--single-n", "1000"])
    grouped = [{"edits": 100, "ES": 0.98}, {"edits": 1000, "ES": 0.7}, {"edits": 2000, "ES": 0.5}]
    found = {
        "sequential-100-n2000": {"retention": {"rome": grouped, "memit": grouped}},
        "sequential-1-n50": {"retention": {"rome": [{"edits": 50, "ES": 1.0}]}},
    }
    derived = bench.one_at_a_time_from_groups(bench.longest_curves(found), args)
    assert derived == {"rome (from sequential-100, 1000 edits)": grouped[:2]}  # not memit's
    # a one-at-a-time sequence of its own as long as --single-n: nothing is read from groups
    partial = {"sequential-1-n1000": {"rome": [{"edits": 500}, {"edits": 1000}]}}
    assert bench.one_at_a_time_from_groups(bench.longest_curves(found, partial), args) == {}
    assert bench.one_at_a_time_from_groups({}, args) == {}


def test_benchmark_counts_a_stopped_sequence_by_its_last_checkpoint(tmp_path):
    bench = benchmark()
    stopped = tmp_path / "sequential-1-n1000" / "alphaedit"
    stopped.mkdir(parents=True)
    points = [{"edits": 100, "metrics": {"ES": 0.9}}, {"edits": 500, "metrics": {"ES": 0.8}}]
    stopped.joinpath("checkpoints.jsonl").write_text(
        "\n".join(json.dumps(p) for p in points) + '\n{"edits": 10'  # a line cut by a kill
    )
    args = bench.parse_args(["--runs", str(tmp_path)])
    partial = bench.unfinished(args)
    assert partial == {"sequential-1-n1000": {"alphaedit": [{"edits": 100, "ES": 0.9},
                                                            {"edits": 500, "ES": 0.8}]}}  # fmt: skip
    base = {"ES": 0.3, "PS": 0.3, "NS": 0.7}
    found = {"sequential-1-n50": {"protocol": "sequential", "batch_size": 1, "n_cases": 50,
                                  "rows": {"unedited": base, "alphaedit": {"ES": 1.0}}}}  # fmt: skip
    target = "AlphaEdit, 1,000 one at a time: ES >= 85 over all edits at the end"
    check = {c["target"]: c for c in bench.target_checks(found, args, partial)}[target]
    assert (check["measured"], check["met"], check["n"]) == ("80.0", False, 500)
    (stopped.parent / "summary.json").write_text("{}")  # finished after all: not partial
    assert bench.unfinished(args) == {}


def test_benchmark_reads_every_run_folder_smallest_runs_first(tmp_path):
    bench = benchmark()
    for folder in ("batch-1000-n1000", "batch-10-n100", "sequential-1-n50", "sequential-1-n1000"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text(f'{{"name": "{folder}"}}')
    (tmp_path / "batch-100-n100").mkdir()  # unfinished: no summary
    found = bench.summaries(bench.parse_args(["--runs", str(tmp_path)]))
    assert list(found) == ["sequential-1-n50", "sequential-1-n1000", "batch-10-n100",
                           "batch-1000-n1000"]  # fmt: skip
    assert found["batch-10-n100"] == {"name": "batch-10-n100"}


def test_benchmark_checks_the_targets_and_says_what_was_not_measured():
    bench = benchmark()
    args = bench.parse_args(["--n", "500"])
    base = {"ES": 0.2, "PS": 0.2, "NS": 0.8, "fluency": 5.0}

    def run(protocol, size, **rows):
        return {"protocol": protocol, "batch_size": size, "rows": {"unedited": base, **rows}}

    found = {  # run folders, <run>-n<cases>
        "batch-1000-n500": run("batch", 1000, memit={"ES": 0.97, "PS": 0.85, "NS": 0.71,
                                                     "peak_memory_mb": 2000.0}),
        "batch-100-n500": run("batch", 100, memit={"seconds_per_edit": 0.5},
                              alphaedit={"seconds_per_edit": 2.0}),
        "sequential-1-n500": run("sequential", 1, alphaedit={"ES": 0.9}),
        "sequential-1-n50": run("sequential", 1, rome={"ES": 0.5, "seconds_per_edit": 4.0},
                                alphaedit={"ES": 0.1}),
    }  # fmt: skip
    checks = {c["target"]: c for c in bench.target_checks(found, args)}
    memit = "MEMIT, one batch of 1,000: "
    assert checks[memit + "ES >= 95"]["met"] is True
    assert checks[memit + "NS >= unedited - 8"]["met"] is False  # 71 < 80 - 8
    assert checks[memit + "peak memory <= 3 GB"]["met"] is True
    assert checks["AlphaEdit, one batch of 1,000: peak memory <= 3 GB"]["met"] is None
    speed = " at batch 100: seconds per edit <= 1/4 of ROME's single edit"
    assert checks["MEMIT" + speed]["met"] is True and checks["AlphaEdit" + speed]["met"] is False
    one_at_a_time = checks["AlphaEdit, 1,000 one at a time: ES >= 85 over all edits at the end"]
    assert one_at_a_time["met"] and one_at_a_time["n"] == 500  # the largest folder with the method
    sequential = [c for c in checks.values() if c["run"] == "sequential-100"]
    assert len(sequential) == 4 and all(c["met"] is None for c in sequential)  # not measured
    assert all(c["full_size"] is False for c in checks.values() if c["n"] is not None)

    # a reduced run without a batch of 1,000 checks the batch targets on its largest batch
    del found["batch-1000-n500"]
    found["batch-300-n500"] = run("batch", 300, memit={"ES": 0.9, "PS": 0.9, "NS": 0.8})
    checks = {c["target"]: c for c in bench.target_checks(found, args)}
    assert checks[memit + "ES >= 95"]["run"] == "batch-300"
    assert checks[memit + "ES >= 95"]["met"] is False


# ---- the real sequence-aware method ------------------------------------------------------------
def test_alphaedit_in_groups_resumes_after_a_kill_to_the_same_results(monkeypatch, tmp_path):
    """AlphaEdit's earlier keys travel in its saved patches: a sequence killed after its first
    group and resumed gives the records of one run straight through."""
    from lmscalpel.methods.alphaedit import AlphaEdit
    from test_alphaedit import CONFIG

    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    lm = tiny_model("llama")
    saved = weights(lm)
    cases = make_cases()
    run = dict(options=options(batch_size=2, fluency_cases=1), progress=False)
    clean = evaluate(lm, cases, "alphaedit", CONFIG, out=tmp_path / "clean", **run)
    real, seen = AlphaEdit.compute_in_sequence, []

    def dying(self, lm_, requests, config, earlier):
        seen.append(len(earlier))
        if len(seen) == 2:
            raise PowerCut("killed while editing the second group")
        return real(self, lm_, requests, config, earlier)

    with monkeypatch.context() as patched:
        patched.setattr(AlphaEdit, "compute_in_sequence", dying)
        with pytest.raises(PowerCut):
            evaluate(lm, cases, "alphaedit", CONFIG, out=tmp_path / "cut", **run)
    assert_pristine(lm, saved)
    monkeypatch.setattr(AlphaEdit, "compute_in_sequence", dying)
    seen.append("resume")
    resumed = evaluate(lm, cases, "alphaedit", CONFIG, out=tmp_path / "cut", **run)
    assert seen == [0, 1, "resume", 1, 2]  # the reloaded first patch, then both earlier patches
    assert_pristine(lm, saved)
    for name in ("cases.jsonl", "checkpoints.jsonl"):
        got = JsonLines(tmp_path / "cut" / "alphaedit" / name).read()
        want = JsonLines(tmp_path / "clean" / "alphaedit" / name).read()
        assert stripped(got) == stripped(want), name
    assert stripped(resumed.retention["alphaedit"]) == stripped(clean.retention["alphaedit"])
