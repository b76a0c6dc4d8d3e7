"""Guarded edits: a patch that misses a bound is rolled back (bit-exactly) and says why."""

from __future__ import annotations

import pytest

from lmscalpel import ConfigError, EditRequest, LocalityProbe, edit, score_targets
from lmscalpel import guard as guard_module
from lmscalpel.guard import DEFAULT_GENERAL_PROMPTS, Guard, GuardRejected, guarded_apply
from lmscalpel.testing import same_weights as same
from lmscalpel.testing import tiny_model
from lmscalpel.testing import weight_copy as weights

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    paraphrases=("Where is the Eiffel Tower? It is in",),
    locality=(LocalityProbe("The Colosseum is located in the city of", "Rome"),),
)
STRONG = {"lr": 0.05, "steps": 20, "norm_constraint": 5.0}  # takes, and leaks (tiny model)
WEAK = {"lr": 1e-4, "steps": 1, "norm_constraint": 1e-4}  # barely moves anything
QUIET = dict(min_locality=None, general_prompts=(), max_general_changed=None)


@pytest.fixture
def lm():
    return tiny_model("llama")


def test_a_passing_edit_is_kept_with_its_report(lm):
    patch = edit(lm, REQUEST, "ft-l", STRONG, guard=Guard(min_generalization=0.0, **QUIET))
    assert patch.is_applied
    report = patch.info["guard"]
    assert report["passed"] and report["failures"] == []
    assert report["measured"]["reliability"] == 1.0
    # the guard's number is the definition: teacher-forced top-1 share of the new target
    assert report["measured"]["reliability"] == (
        score_targets(lm, [REQUEST.prompt], [REQUEST.target_new])[0].token_accuracy
    )
    assert report["measured"]["generalization"] == (
        score_targets(lm, list(REQUEST.paraphrases), ["Rome"])[0].token_accuracy
    )


def test_a_leaking_edit_is_rolled_back_bit_exactly_and_says_why(lm):
    saved = weights(lm)
    with pytest.raises(GuardRejected) as caught:
        edit(lm, REQUEST, "ft-l", STRONG, guard=Guard(min_locality=1.0, general_prompts=()))
    assert same(lm, saved)
    report = caught.value.report
    assert not report.passed
    assert report.measured["locality"] < 1.0
    assert any(f.startswith("locality") for f in report.failures)
    assert "locality" in str(caught.value)
    assert caught.value.patch is not None and not caught.value.patch.is_applied


def test_an_edit_that_does_not_take_is_rejected_on_reliability(lm):
    saved = weights(lm)
    with pytest.raises(GuardRejected) as caught:
        edit(lm, REQUEST, "ft-l", WEAK, guard=Guard(**QUIET))
    assert caught.value.report.measured["reliability"] < 1.0
    assert "reliability" in caught.value.report.failures[0]
    assert same(lm, saved)


def test_general_prompts_whose_answers_change_reject_the_edit(lm):
    prompts = ("The capital of Japan is", "Apple was founded by", "The official language of")
    strict = Guard(min_locality=None, general_prompts=prompts, max_general_changed=0)
    with pytest.raises(GuardRejected) as caught:
        edit(lm, REQUEST, "ft-l", STRONG, guard=strict)
    report = caught.value.report
    assert report.measured["general_total"] == 3
    assert report.measured["general_changed"] >= 1
    changed = [g for g in report.general if g["before"] != g["after"]]
    assert len(changed) == report.measured["general_changed"]
    # the same edit passes when any number of general answers may change
    lenient = Guard(min_locality=None, general_prompts=prompts, max_general_changed=3)
    assert edit(lm, REQUEST, "ft-l", STRONG, guard=lenient).is_applied


def test_a_dry_run_checks_and_leaves_the_model_as_it_was(lm):
    saved = weights(lm)
    patch = edit(lm, REQUEST, "ft-l", STRONG, apply=False, guard=Guard(**QUIET))
    assert not patch.is_applied and patch.info["guard"]["passed"]
    assert same(lm, saved)


def test_an_error_while_measuring_rolls_the_patch_back(lm, monkeypatch):
    saved = weights(lm)
    patch = edit(lm, REQUEST, "ft-l", STRONG, apply=False)
    real, calls = guard_module.score_targets, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the measurement after applying
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(guard_module, "score_targets", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        guarded_apply(lm, patch, Guard(**QUIET))
    assert same(lm, saved) and not patch.is_applied


def test_missing_probes_pass_and_are_reported_as_none(lm):
    bare = EditRequest(REQUEST.prompt, REQUEST.subject, "Rome")
    patch = edit(
        lm,
        bare,
        "ft-l",
        STRONG,
        guard=Guard(min_generalization=1.0, min_locality=1.0, general_prompts=()),
    )
    measured = patch.info["guard"]["measured"]
    assert measured["generalization"] is None and measured["locality"] is None


def test_measure_only_checks_nothing(lm):
    patch = edit(lm, REQUEST, "ft-l", WEAK, guard=Guard.measure_only())
    assert patch.is_applied and patch.info["guard"]["passed"]
    assert patch.info["guard"]["measured"]["general_total"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"min_reliability": 1.5},
        {"min_locality": -0.1},
        {"min_generalization": float("nan")},
        {"max_general_changed": -1},
        {"general_tokens": 0},
        {"general_prompts": "one string"},
        {"general_prompts": ["ok", " "]},
    ],
)
def test_bad_bounds_are_config_errors_naming_the_field(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        Guard(**bad)


def test_from_dict_defaults_refusals_and_round_trip():
    assert Guard.from_dict({}) == Guard()
    assert Guard.from_dict({"general_prompts": None}).general_prompts == DEFAULT_GENERAL_PROMPTS
    assert Guard.from_dict({"min_locality": None}).min_locality is None
    with pytest.raises(ConfigError, match="unknown guard field"):
        Guard.from_dict({"min_locallity": 0.5})
    guard = Guard(min_locality=0.5, general_prompts=("a b",))
    assert Guard.from_dict(guard.to_dict()) == guard
    assert len(DEFAULT_GENERAL_PROMPTS) >= 5


def test_edit_refuses_a_guard_of_the_wrong_type(lm):
    with pytest.raises(ConfigError, match="guard"):
        edit(lm, REQUEST, "ft-l", WEAK, guard={"min_locality": 1.0})
