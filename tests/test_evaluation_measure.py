"""Exact match as measured equals its definition: generate greedily, then check that the
continuation starts with the answer at a word boundary.

The regression: measurement used to declare a match, without generating, whenever every answer
token was the teacher-forced argmax, so " Sega" followed by "MX" counted as a match for "Sega".
"""

import random

import pytest
import torch

from lmscalpel import EditRequest
from lmscalpel.data.cases import EvalCase
from lmscalpel.evaluation import EvalOptions, measure
from lmscalpel.evaluation.measure import cannot_match, match_tokens, probes_of
from lmscalpel.evaluation.metrics import starts_with_answer
from lmscalpel.scoring import generate, score_targets
from lmscalpel.testing import tiny_model

PROMPTS = [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("The Colosseum is located in the city of", "Colosseum"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Michel Rocard is a native speaker of", "Michel Rocard"),
    ("Apple was founded by", "Apple"),
    ("The official language of Spain is", "Spain"),
    ("Toko Yasuda plays the", "Toko Yasuda"),
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def definition(lm, prompt, answer):
    """Exact match by its definition, one prompt at a time."""
    (text,) = generate(lm, [prompt], max_new_tokens=match_tokens(lm, prompt, [answer]))
    return starts_with_answer(text, [answer])


def argmax_prefixes(lm, prompts):
    """(prompt, answer) pairs where the answer is a prefix of the greedy continuation whose
    teacher-forced tokens are all the argmax: the cases the old shortcut called a match."""
    candidates = []
    for prompt in prompts:
        (text,) = generate(lm, [prompt], max_new_tokens=6)
        candidates += [
            (prompt, text[:end]) for end in range(1, len(text) + 1) if text[:end].strip()
        ]
    scores = score_targets(lm, [p for p, _ in candidates], [a for _, a in candidates])
    return [pair for pair, s in zip(candidates, scores) if all(s.argmax_hits)]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_measured_exact_match_equals_generate_then_check(model_type):
    lm = tiny_model(model_type)
    # Prompts ending in a space let answers start without one, as the tiny model's continuations
    # mostly do; both kinds of prompt are measured.
    prompts = [(p + tail, s) for p, s in PROMPTS for tail in ("", " ")]
    subjects = dict(prompts)
    prefixes = argmax_prefixes(lm, list(subjects))
    pairs = prefixes + [(p, answer) for p in subjects for answer in ("Paris", "Rome", "the")]
    cases = [
        EvalCase(key=str(i), requests=(EditRequest(p, subjects[p], answer),), index=i)
        for i, (p, answer) in enumerate(pairs)
    ]
    found = measure(lm, cases, EvalOptions(fluency_cases=0))
    measured = {pair: found[c.key]["edit"][0]["match"] for pair, c in zip(pairs, cases)}
    expected = {pair: definition(lm, *pair) for pair in pairs}
    assert measured == expected
    # The comparison covers what the old shortcut got wrong: every answer token the argmax, yet
    # the continuation glued to the answer (no word boundary), as well as true matches.
    assert any(not expected[pair] for pair in prefixes)
    assert any(expected[pair] for pair in prefixes)


@pytest.mark.parametrize(
    ("first", "answers", "ruled_out"),
    [
        (" Rome", ["Paris"], True),  # cannot begin "paris"
        (" 1990", ["1991"], True),
        (" Rome,", ["Romania"], True),  # "rome" then a boundary: not "romania"
        (" Sega", ["Sega"], False),  # may begin it: generation decides (" SegaMX" does not match)
        (" SegaMX", ["Sega"], False),  # "segamx" extends "sega": generation decides
        (" paris", ["Paris"], False),  # case is normalised
        (" Par", ["Paris"], False),
        (" New", ["New York City"], False),
        (" (", ["Paris"], False),  # punctuation only: undecided
        (" Grabar", ["Kolinda Grabar", "Grabar-Kitarović"], False),  # an alias may match
        (" Rome", ["Romé"], False),  # a combining accent may follow and compose into "é"
        (" Paré", ["Rome"], False),  # not ASCII: may be half a character
        ("do n", ["don"], False),  # a clean-up may glue "n't" on: "don't" matches "don"
        ("", ["Paris"], False),  # a special token: nothing known
    ],
)
def test_generation_is_skipped_only_when_no_continuation_can_match(first, answers, ruled_out):
    assert cannot_match(first, answers) is ruled_out


PIECES = ["a", "e", "s", "MX", "1", " ", ",", "-", "'", "_", "\u0301", "\u0338", " n't", "é", "="]
ANSWERS = ["Paris", "Pare", "Parés", "Romé", "Rome", "Sega", "1991", "don", "a", "e-1"]


def test_a_ruled_out_first_token_never_matches_whatever_follows():
    """The rule's claim checked on the definition itself: for random first tokens and answers,
    whenever generation is skipped, no continuation text makes the answer match."""
    rng = random.Random(0)
    tokens = ["".join(rng.choices(" abeimoprsx19,-'=", k=rng.randint(1, 5))) for _ in range(400)]
    tokens += [" Rome", " Pare", " Par", " 1990", " do", " Sega", " e"]
    rests = ["".join(rng.choices(PIECES, k=rng.randint(0, 3))) for _ in range(300)] + [""]
    skipped = 0
    for token in tokens:
        for answer in ANSWERS:
            if cannot_match(token, [answer]):
                skipped += 1
                assert not any(starts_with_answer(token + rest, [answer]) for rest in rests), (
                    token,
                    answer,
                )
    assert skipped > 100  # the rule does skip generation


def test_probes_of_a_case_extend_exact_match_answers_by_its_aliases():
    request = EditRequest("Where is the Eiffel Tower? In", "Eiffel Tower", "Rome", "Paris",
                          paraphrases=("The Eiffel Tower is in",))  # fmt: skip
    case = EvalCase(key="0", requests=(request,), index=0, answer_aliases={"Rome": ("Roma",)})
    probes = probes_of(case)
    assert [p.role for p in probes] == ["edit", "paraphrase"]
    assert all(p.answers == ("Rome", "Roma") for p in probes)
    assert [p.other for p in probes] == ["Paris", "Paris"]
