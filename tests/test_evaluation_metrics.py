"""Metric definitions on hand-built numbers with known answers."""

import math

import pytest

from lmscalpel.evaluation import aggregate, case_metrics
from lmscalpel.evaluation import metrics as m

LOG = math.log


def test_counterfact_success_and_magnitude():
    new = [LOG(0.5), LOG(0.1), LOG(0.3)]
    true = [LOG(0.25), LOG(0.2), LOG(0.3)]  # wins, loses, tie (a tie is not a success)
    assert m.success_rate(new, true) == pytest.approx(1 / 3)
    assert m.mean_margin(new, true) == pytest.approx((0.25 - 0.1 + 0.0) / 3)
    assert m.success_rate([LOG(0.5)], [None]) is None  # no true target: undefined, not 0
    assert m.success_rate([], []) is None


def test_harmonic_mean_is_romes_score():
    assert m.harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(3 / (1 + 2 + 2))
    assert m.harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert m.harmonic_mean([1.0, None, 1.0]) is None


def test_token_accuracy_and_unchanged():
    assert m.token_accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        m.token_accuracy([])
    assert m.unchanged([5, 7], [5, 7])
    assert not m.unchanged([5, 7], [5, 8])


@pytest.mark.parametrize(
    ("generated", "answers", "expected"),
    [
        (" Paris, France.", "Paris", True),
        (" PARIS!", "paris", True),
        ("  the  Hague is", "The Hague", True),
        (" Parisian cafés", "Paris", False),  # a word boundary is required
        (" Rome", "Paris", False),
        (" Grabar-Kitarović was", ["Kolinda Grabar-Kitarović", "Grabar-Kitarović"], True),
        (" anything", "", False),  # an empty answer matches nothing
    ],
)
def test_exact_match_normalises_case_punctuation_and_space(generated, answers, expected):
    assert m.starts_with_answer(generated, answers) is expected


def test_ngram_entropy_known_value_and_repetition_scores_low():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert m.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    varied = "The tower was built in 1889 for the world fair and is made of wrought iron."
    looping = "the the the the the the the the the the the the the the the the"
    assert m.ngram_entropy(looping) == 0.0
    assert m.ngram_entropy(varied) > 3.0
    assert m.fluency([varied, looping]) == pytest.approx(m.ngram_entropy(varied) / 2)
    assert m.fluency([]) is None


def _edit(new, true, acc=1.0, match=True):
    return {"prompt": "p", "new": LOG(new), "true": LOG(true), "acc": acc, "match": match}


POST = {
    "edit": [_edit(0.6, 0.2)],
    "paraphrase": [_edit(0.3, 0.4, 0.5, False), _edit(0.5, 0.1, 1.0, True)],
    "locality": [
        {"prompt": "l1", "kind": "neighborhood", "answer": LOG(0.7), "new": LOG(0.1), "acc": 1.0,
         "top1": [1, 2]},
        {"prompt": "l2", "kind": "forgetfulness", "answer": LOG(0.1), "new": LOG(0.3), "acc": 0.0,
         "top1": [9]},
    ],
    "portability": [
        {"prompt": "q1", "kind": "multi-hop", "answer": LOG(0.2), "before": None, "acc": 0.5,
         "match": False},
        {"prompt": "q2", "kind": "alias", "answer": LOG(0.4), "before": None, "acc": 1.0,
         "match": True},
    ],
    "fluency": {"texts": ["x"], "entropy": 5.5},
}  # fmt: skip
PRE_TOP1 = {"locality": [{"top1": [1, 2]}, {"top1": [4]}]}


def test_case_metrics_from_a_hand_built_measurement():
    values = case_metrics(POST, PRE_TOP1, {"hops": 3})
    assert values["ES"] == 1.0 and values["EM"] == pytest.approx(0.4)
    assert values["PS"] == 0.5 and values["PM"] == pytest.approx((-0.1 + 0.4) / 2)
    assert values["NS"] == 0.5 and values["NM"] == pytest.approx((0.6 - 0.2) / 2)
    assert values["edit_acc"] == 1.0 and values["paraphrase_acc"] == 0.75
    assert values["exact_match"] == 1.0 and values["paraphrase_exact_match"] == 0.5
    assert values["locality_unchanged"] == 0.5
    assert values["locality_unchanged/neighborhood"] == 1.0
    assert values["locality_unchanged/forgetfulness"] == 0.0
    assert values["portability"] == 0.75
    assert values["portability/multi-hop"] == 0.5 and values["portability/alias"] == 1.0
    assert values["portability_exact_match/alias"] == 1.0
    assert values["portability/3-hop"] == 0.75
    assert values["fluency"] == 5.5


def test_unedited_case_has_no_locality_unchanged_and_aggregate_weighs_cases_equally():
    assert "locality_unchanged" not in case_metrics(POST)
    row = aggregate([{"ES": 1.0, "PS": 0.5, "NS": 1.0}, {"ES": 0.0, "PS": 1.0, "NS": 0.5}])
    assert row["ES"] == 0.5 and row["PS"] == 0.75 and row["NS"] == 0.75
    assert row["score"] == pytest.approx(m.harmonic_mean([0.5, 0.75, 0.75]))
    assert aggregate([{"ES": 1.0}, {"fluency": 4.0}]) == {"ES": 1.0, "fluency": 4.0}
