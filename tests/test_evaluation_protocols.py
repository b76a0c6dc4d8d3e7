"""The protocols on a tiny model: edits measured, reverts verified, the model left pristine, and
in-context patches measured through the prompt rewriter like any other patch."""

from typing import ClassVar

import pytest
import torch

from lmscalpel import EditRequest, LocalityProbe, PortabilityProbe, score_targets
from lmscalpel.core.config import MethodConfig
from lmscalpel.evaluation import EvalCase, EvalOptions, EvaluationError, compare, evaluate
from lmscalpel.evaluation.protocols import SequentialState
from lmscalpel.methods import base
from lmscalpel.patch import Patch
from lmscalpel.testing import tiny_model
from lmscalpel.testing import weight_copy as weights

FACTS = [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    ("The Colosseum is located in the city of", "Colosseum", "Paris", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "German", "French"),
    ("Michel Rocard is a native speaker of", "Michel Rocard", "Spanish", "French"),
    ("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs"),
]
STRONG = {"lr": 0.05, "norm_constraint": 5.0, "steps": 15}
FAST = EvalOptions(fluency_cases=2, fluency_prompts=1, fluency_tokens=8, checkpoints=(1, 3))


def make_cases(n=len(FACTS)):
    cases = []
    for i, (prompt, subject, new, true) in enumerate(FACTS[:n]):
        other = FACTS[(i + 1) % len(FACTS)]
        request = EditRequest(
            prompt,
            subject,
            new,
            true,
            paraphrases=(f"Everyone knows that {prompt[0].lower()}{prompt[1:]}",),
            locality=(LocalityProbe(other[0], other[3]),),
            portability=(PortabilityProbe(f"{subject} is famous. {prompt}", new, "alias"),),
            case_id=i,
        )
        cases.append(EvalCase(key=str(i), requests=(request,), index=i, source="test"))
    return cases


def assert_pristine(lm, saved):
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert lm.context_patches == []


@pytest.fixture(autouse=True)
def one_thread():
    """Small forward passes run fastest on one thread (and several crawl on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lm():
    return tiny_model("llama")


def test_single_protocol_edits_each_case_and_leaves_the_model_pristine(lm, tmp_path):
    saved = weights(lm)
    summary = evaluate(lm, make_cases(), "ft-l", STRONG, options=FAST, out=tmp_path, progress=False)
    assert_pristine(lm, saved)
    base_row, row = summary.rows["unedited"], summary.rows["ft-l"]
    assert list(summary.rows) == ["unedited", "ft-l"]
    assert row["ES"] == 1.0 and base_row["ES"] < 1.0  # every edit took
    assert row["edit_acc"] > base_row["edit_acc"]
    assert "locality_unchanged" in row and "locality_unchanged" not in base_row
    assert {"portability", "portability/alias", "fluency", "exact_match"} <= set(row)
    assert row["seconds_per_edit"] > 0 and row["peak_memory_mb"] > 0
    assert row["n_cases"] == 5 and row["n_edits"] == 5
    records = [line for line in (tmp_path / "ft-l" / "cases.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all('"revert_verified": true' in r for r in records)


@pytest.fixture
def damaged_backups(monkeypatch):
    """Every applied patch's backup is damaged, so its revert cannot restore the weights."""
    real = Patch.apply

    def apply(self, target, *, keep_backup=True):
        real(self, target, keep_backup=keep_backup)
        for saved in (self._backup or {}).values():
            saved.view(-1)[0] += 1.0
        return self

    monkeypatch.setattr(Patch, "apply", apply)


def test_a_revert_that_does_not_restore_the_weights_stops_the_run(lm, damaged_backups, tmp_path):
    """The patch checks its own restoration; the run stops at the first case, recording none."""
    with pytest.raises(EvaluationError, match="ft-l: reverting the ft-l patch .* bit-exactly"):
        evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=tmp_path, progress=False)
    assert not (tmp_path / "ft-l" / "cases.jsonl").exists()


def test_a_sequential_run_whose_pristine_copies_do_not_restore_stops(lm, monkeypatch, tmp_path):
    real = SequentialState.protect

    def protect(self, names):
        real(self, names)
        for saved in self.pristine.saved.values():
            saved.view(-1)[0] += 1.0

    monkeypatch.setattr(SequentialState, "protect", protect)
    with pytest.raises(EvaluationError, match="restoring a weight snapshot .* bit-exactly"):
        evaluate(lm, make_cases(2), "ft-l", STRONG, protocol="sequential", options=FAST,
                 out=tmp_path, progress=False)  # fmt: skip


def test_an_editor_that_changes_the_model_outside_its_patch_stops_the_run(
    lm, monkeypatch, tmp_path
):
    real = base.editor_class("ft-l").compute

    def meddling(self, lm_, requests, config):
        patch = real(self, lm_, requests, config)
        with torch.no_grad():
            next(lm_.model.parameters()).view(-1)[0] += 1.0  # a weight no patch records
        return patch

    monkeypatch.setattr(base.editor_class("ft-l"), "compute", meddling)
    with pytest.raises(EvaluationError, match="weights changed during the run"):
        evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=tmp_path, progress=False)


def test_batch_protocol_edits_groups_of_cases_in_one_call(lm, tmp_path, monkeypatch):
    calls = []
    real = base.get_editor("ft-l").__class__.compute

    def counting(self, lm_, requests, config):
        calls.append(len(requests))
        return real(self, lm_, requests, config)

    monkeypatch.setattr(base.editor_class("ft-l"), "compute", counting)
    saved = weights(lm)
    options = EvalOptions(**{**FAST.to_dict(), "protocol": "batch", "batch_size": 2})
    summary = evaluate(lm, make_cases(), "ft-l", STRONG, options=options, out=tmp_path,
                       progress=False)  # fmt: skip
    assert calls == [2, 2, 1]
    assert_pristine(lm, saved)
    assert summary.protocol == "batch" and summary.rows["ft-l"]["n_cases"] == 5
    assert summary.rows["ft-l"]["edit_acc"] > summary.rows["unedited"]["edit_acc"]


def test_sequential_protocol_accumulates_edits_and_draws_a_retention_curve(lm, tmp_path):
    saved = weights(lm)
    summary = evaluate(lm, make_cases(), "ft-l", STRONG, protocol="sequential", options=FAST,
                       out=tmp_path, progress=False)  # fmt: skip
    assert_pristine(lm, saved)
    curve = summary.retention["ft-l"]
    assert [p["edits"] for p in curve] == [1, 3, 5]  # the checkpoints <= 5, and the end
    assert all({"ES", "NS", "fluency"} <= set(p) for p in curve)
    assert summary.rows["ft-l"]["ES"] == curve[-1]["ES"]  # the row: all edits, measured last
    assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "ft-l" / "state").exists()  # resume state removed once finished


class Rewriter:
    def __init__(self, text):
        self.text = text

    def rewrite(self, prompt):
        return self.text


class ConstantContext(base.Editor):
    """A stand-in in-context method: every prompt becomes one fixed text."""

    name: ClassVar[str] = "test-constant-context"
    config_class: ClassVar[type] = MethodConfig
    kind: ClassVar[str] = "context"

    def compute(self, lm, requests, config):
        return Patch(self.name, list(requests), kind="context",
                     context_state={"text": "The Colosseum is located in the city of"})  # fmt: skip

    def build_rewriter(self, patches, lm):  # all applied patches of the method at once
        return Rewriter(patches[-1].context_state["text"])


@pytest.fixture
def constant_context():
    """The stand-in registered for one test only (other tests may list every method)."""
    base.register(ConstantContext)
    yield
    base._REGISTRY.pop(ConstantContext.name)


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_in_context_patches_are_measured_through_the_prompt_rewriter(
    lm, tmp_path, protocol, constant_context
):
    cases = make_cases(3)
    summary = evaluate(lm, cases, "test-constant-context", protocol=protocol, options=FAST,
                       out=tmp_path, progress=False)  # fmt: skip
    assert lm.context_patches == []
    fixed = "The Colosseum is located in the city of"
    first = (tmp_path / "test-constant-context" / "cases.jsonl").read_text().splitlines()[0]
    import json

    post = json.loads(first)["post"]
    expected = score_targets(lm, [fixed], [cases[0].requests[0].target_new])[0].mean_logprob
    assert post["edit"][0]["new"] == pytest.approx(expected, abs=1e-5)
    assert summary.rows["test-constant-context"]["n_cases"] == 3


def test_compare_runs_methods_on_the_same_cases_and_shares_the_baseline(lm, tmp_path):
    summary = compare(lm, make_cases(3), {"ft-l": STRONG, "ft-m": STRONG}, options=FAST,
                      out=tmp_path, progress=False)  # fmt: skip
    assert list(summary.rows) == ["unedited", "ft-l", "ft-m"]
    assert len((tmp_path / "baseline.jsonl").read_text().splitlines()) == 3
    table = (tmp_path / "table.md").read_text()
    assert "| unedited |" in table and "| ft-m |" in table
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_cases_the_model_cannot_edit_are_left_out_and_reported(lm):
    long = EditRequest("word " * 300 + "Paris is in", "Paris", "Italy")
    cases = [*make_cases(2), EvalCase(key="9", requests=(long,), index=9)]
    summary = evaluate(lm, cases, "ft-l", STRONG, options=FAST, progress=False)
    assert summary.n_cases == 2
    assert summary.info["left_out_cases"][0]["key"] == "9"
