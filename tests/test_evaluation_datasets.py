"""Loaders on small samples of every layout (malformed records included) and on the real files."""

import json
from pathlib import Path

import pytest

from lmscalpel import EditRequest, LocalityProbe, save_requests
from lmscalpel.core.config import ConfigError
from lmscalpel.evaluation import (
    DatasetError,
    load_cases,
    read_dataset,
    select_cases,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(tmp_path, name, records):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


CF = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}


def test_counterfact_simplified_with_malformed_records(tmp_path):
    records = [
        CF,
        {**CF, "subject": "Nobody Here"},  # subject not in the prompt
        {**CF, "target_new": "French"},  # nothing to edit
        "not an object",
        {k: v for k, v in CF.items() if k != "target_new"},
    ]
    data = read_dataset(write(tmp_path, "cf.json", records))
    assert data.layout == "counterfact" and data.records == 5
    assert len(data.cases) == 1
    request = data.cases[0].requests[0]
    assert request.target_true == "French" and request.case_id == 7
    assert request.paraphrases == (CF["rephrase_prompt"],)
    assert request.locality == (LocalityProbe(CF["locality_prompt"], "French"),)
    reasons = {p.index: p.reason for p in data.problems}
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "Nobody Here" in reasons[1] and "not found" in reasons[1]
    assert "nothing to edit" in reasons[2]
    assert "not a JSON object" in reasons[3]
    assert "target_new" in reasons[4]
    assert "record 1" in str(data.problems[0])


ROME = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Danielle Darrieux's mother tongue is", "Danielle Darrieux speaks"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Louis Bonaparte speaks"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is", "Where Darrieux is from,"],
}
COURSE = {
    "prompt": "{} is a citizen of",
    "subject": "Ellie Kemper",
    "target_new": {"str": "Croatia"},
    "target_true": {"str": "United States"},
    "paraphrase_prompts": [{"prompt": "Ellie Kemper holds a passport of"}],
    "neighborhood_prompts": [{"prompt": "Tina Fey is a citizen of"}],
    "portable_prompts": [
        {"prompt": "The capital of Ellie Kemper's country is", "portable_target_new": "Zagreb",
         "portable_target_true": "Washington"},
    ],
}  # fmt: skip


def test_rome_layout_and_its_course_variant(tmp_path):
    data = read_dataset(write(tmp_path, "rome.json", [ROME, COURSE, {"requested_rewrite": 3}]))
    assert data.layout == "rome"
    original, course = data.cases
    request = original.requests[0]
    assert request.prompt == "The mother tongue of Danielle Darrieux is"
    assert (request.target_new, request.target_true) == ("English", "French")
    assert len(request.paraphrases) == 2
    assert [p.answer for p in request.locality] == ["French", "French"]  # neighbours keep truth
    assert original.generation_prompts == tuple(ROME["generation_prompts"])
    assert original.fluency_prompts(1) == [ROME["generation_prompts"][0]]
    port = course.requests[0].portability[0]
    assert (port.answer, port.answer_before, port.kind) == ("Zagreb", "Washington", "other")
    assert course.requests[0].locality[0].answer == "United States"
    assert [p.index for p in data.problems] == [2]


def test_zsre_mend_layout(tmp_path):
    record = {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft",
        "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
        "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
    }
    bad = {**record, "src": "What does it make?"}  # the subject is missing
    data = read_dataset(write(tmp_path, "zsre.json", [record, bad]))
    assert data.layout == "zsre"
    request = data.cases[0].requests[0]
    assert (request.target_new, request.target_true) == ("unmanned aircraft", "uniform")
    assert request.locality[0].answer == "Walter Sobchak"
    assert data.problems[0].index == 1


KNOWEDIT = {
    "subject": "Goursez Vreizh",
    "prompt": "The name of the country which Goursez Vreizh is associated with is",
    "target_new": "Franche-Comté",
    "ground_truth": ["France", "French Republic"],
    "rephrase_prompt": "Goursez Vreizh is associated with the country",
    "portability": {
        "Reasoning": [{"prompt": "The capital of the country of Goursez Vreizh is",
                       "ground_truth": ["Besançon", "Besancon"]}],
        "Subject_Aliasing": [{"prompt": "The country of Gorsedd of Brittany is",
                              "ground_truth": "Franche-Comté"}],
        "Logical_Generalization": [{"prompt": "Franche-Comté is home to",
                                    "ground_truth": "Goursez Vreizh"}],
    },
    "locality": {
        "Relation_Specificity": [{"prompt": "The founder of Goursez Vreizh is",
                                  "ground_truth": ["Jean Le Fustec"]}],
        "Forgetfulness": [{"prompt": "The country of Goursez Vreizh, not Franche-Comté, is",
                           "ground_truth": "France"}],
    },
}  # fmt: skip


def test_knowedit_maps_portability_and_locality_kinds(tmp_path):
    broken = {
        **KNOWEDIT,
        "locality": {"Relation_Specificity": [{"prompt": "x", "ground_truth": ""}]},
    }
    data = read_dataset(write(tmp_path, "knowedit.json", [KNOWEDIT, broken]))
    assert data.layout == "knowedit"
    case = data.cases[0]
    request = case.requests[0]
    assert request.target_true == "France"
    kinds = {p.kind: p.answer for p in request.portability}
    assert kinds == {"reasoning": "Besançon", "alias": "Franche-Comté", "reverse": "Goursez Vreizh"}
    assert case.aliases("Besançon") == ("Besançon", "Besancon")
    assert {p.kind for p in request.locality} == {"relation_specificity", "forgetfulness"}
    assert data.problems[0].index == 1 and "ground_truth" in data.problems[0].reason


MQUAKE = {
    "case_id": 5,
    "requested_rewrite": [
        {"prompt": "{} is a citizen of", "subject": "Ellie Kemper",
         "target_new": {"str": "Croatia"}, "target_true": {"str": "United States of America"},
         "question": "What is the country of citizenship of Ellie Kemper?"},
        {"prompt": "The head of state of {} is", "subject": "Croatia",
         "target_new": {"str": "Ivo Josipović"}, "target_true": {"str": "Kolinda Grabar-Kitarović"}},
    ],
    "questions": ["Who is the head of state of the country of citizenship of Ellie Kemper?"],
    "answer": "Donald Trump",
    "new_answer": "Ivo Josipović",
    "new_answer_alias": ["Josipović"],
    "single_hops": [{"question": "q1"}, {"question": "q2"}],
    "new_single_hops": [{"question": "q1"}, {"question": "q2"}],
    "fact_new": "ignored",
}  # fmt: skip


def test_mquake_edits_all_rewrites_of_a_case_together(tmp_path):
    data = read_dataset(write(tmp_path, "mquake.json", [MQUAKE, {**MQUAKE, "questions": []}]))
    assert data.layout == "mquake"
    case = data.cases[0]
    assert len(case.requests) == 2 and case.case_id == 5
    assert case.requests[1].prompt == "The head of state of Croatia is"
    assert case.requests[0].paraphrases == (MQUAKE["requested_rewrite"][0]["question"],)
    (probe,) = case.requests[0].portability
    assert (probe.kind, probe.answer, probe.answer_before) == (
        "multi-hop",
        "Ivo Josipović",
        "Donald Trump",
    )
    assert case.tags == {"hops": 2}
    assert case.aliases("Ivo Josipović") == ("Ivo Josipović", "Josipović")
    assert data.problems[0].index == 1


def test_knowns_become_counterfactual_edits_within_their_relation(tmp_path):
    records = [
        {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
         "template": "{} is located in the continent", "relation_id": "P30",
         "prompt": "Vinson Massif is located in the continent of"},
        {"known_id": 1, "subject": "Mount Kenya", "attribute": "Africa",
         "template": "{} is located in the continent", "relation_id": "P30",
         "prompt": "Mount Kenya is located in the continent of"},
        {"known_id": 2, "subject": "Kilimanjaro", "attribute": "Africa",
         "template": "{} is located in the continent", "relation_id": "P30",
         "prompt": "Kilimanjaro is located in the continent of"},
        {"known_id": 3, "subject": "Lonely", "attribute": "Nowhere", "template": "{} is in",
         "relation_id": "P999", "prompt": "Lonely is in"},
    ]  # fmt: skip
    first = read_dataset(write(tmp_path, "known_1000.json", records))
    again = read_dataset(write(tmp_path, "known_copy.json", records))
    assert first.layout == "knowns"
    assert [c.requests for c in first.cases] == [c.requests for c in again.cases]  # deterministic
    vinson = first.cases[0].requests[0]
    assert vinson.target_true == "Antarctica" and vinson.target_new == "Africa"
    kenya = first.cases[1].requests[0]
    assert kenya.target_new == "Antarctica"
    assert kenya.locality[0].prompt == records[2]["prompt"]  # a neighbour with the same answer
    assert [p.index for p in first.problems] == [3]


def test_our_jsonl_groups_requests_by_case_id_and_reports_bad_lines(tmp_path):
    a = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", case_id="x")
    b = EditRequest("The Louvre is in", "Louvre", "Rome", case_id="x")
    c = EditRequest("Apple was founded by", "Apple", "Bill Gates")
    path = tmp_path / "requests.jsonl"
    save_requests([a, b, c], path)
    with path.open("a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"prompt": "No subject here", "subject": "Tower",
                                 "target_new": "x"}) + "\n")  # fmt: skip
    data = read_dataset(path)
    assert data.layout == "requests"
    assert [len(case.requests) for case in data.cases] == [2, 1]
    assert data.cases[1].requests[0].case_id == 2  # numbered by record when missing
    assert [(p.index, p.where) for p in data.problems] == [(3, "line 4"), (4, "line 5")]
    assert "invalid JSON" in data.problems[0].reason


def test_deterministic_subsets(tmp_path):
    records = [{**CF, "case_id": i} for i in range(20)]
    path = write(tmp_path, "cf.json", records)
    assert [c.case_id for c in load_cases(path, 3, start=2)] == [2, 3, 4]
    seeded = [c.case_id for c in load_cases(path, 5, seed=1)]
    assert seeded == [c.case_id for c in load_cases(path, 5, seed=1)]
    assert seeded != [c.case_id for c in load_cases(path, 5, seed=2)]
    assert len(select_cases(load_cases(path), None, start=15)) == 5
    with pytest.raises(ConfigError, match="number of cases must be >= 0, got -1"):
        select_cases([], -1)
    with pytest.raises(ConfigError, match=r"\(start\) must be >= 0, got -2"):
        select_cases([], 3, start=-2)


def test_unknown_layout_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="layout"):
        read_dataset(write(tmp_path, "odd.json", [{"question": "?"}]))
    with pytest.raises(DatasetError, match="layout"):
        read_dataset(write(tmp_path, "cf.json", [CF]), layout="wikidata")
    with pytest.raises(FileNotFoundError):
        read_dataset(tmp_path / "missing.json")


REAL = [
    ("counterfact/edit.json", "counterfact", 10000),
    ("counterfact/train.json", "counterfact", 10000),
    ("zsre/train-1k.json", "zsre", 1000),
    ("knowns/known_1000.json", "knowns", 1209),
    ("knowedit/wiki_counterfact_train.json", "knowedit", 1428),
    ("knowedit/zsre_test_part.json", "knowedit", 800),
    ("mquake/mquake_cf_90.json", "mquake", 90),
]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize(("name", "layout", "records"), REAL)
def test_real_files_load(name, layout, records):
    data = read_dataset(SHARED / name)
    assert data.layout == layout and data.records == records
    assert len(data.cases) + len(data.problems) == records
    assert len(data.problems) < 0.05 * records  # malformed records are the exception
    assert all(p.reason for p in data.problems)
    kinds = {p.kind for c in data.cases for r in c.requests for p in r.portability}
    if layout == "knowedit":
        assert kinds <= {"reasoning", "alias", "reverse"} and "alias" in kinds
    if layout == "mquake":
        assert {c.tags["hops"] for c in data.cases} == {2, 3, 4}
        assert max(len(c.requests) for c in data.cases) > 1
