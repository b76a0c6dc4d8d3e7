import json

import pytest

from lmscalpel import EditRequest, EditRequestError, LocalityProbe, PortabilityProbe, edit
from lmscalpel.core.requests import load_requests, save_requests
from lmscalpel.report import before_after_table, probe, probes_for, role_label, shown_targets


def make(**kw):
    base = dict(
        prompt="The Eiffel Tower is located in the city of",
        subject="Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
    )
    base.update(kw)
    return EditRequest(**base)


def test_placeholder_is_filled_and_template_recovered():
    r = make(prompt="{} is located in the city of", paraphrases=("Where is {}? In",))
    assert r.prompt == "Eiffel Tower is located in the city of"
    assert r.template == "{} is located in the city of"
    assert r.paraphrases == ("Where is Eiffel Tower? In",)


def test_subject_missing_names_both():
    with pytest.raises(EditRequestError) as error:
        make(subject="Louvre")
    assert "'Louvre'" in str(error.value) and "Eiffel Tower is located" in str(error.value)


def test_subject_case_must_match():
    with pytest.raises(EditRequestError, match="verbatim"):
        make(subject="eiffel tower")


@pytest.mark.parametrize("field", ["target_new", "prompt", "subject"])
def test_empty_fields_are_rejected(field):
    with pytest.raises(EditRequestError, match="empty"):
        make(**{field: "  "})


def test_target_new_equal_to_true_is_rejected():
    with pytest.raises(EditRequestError, match="nothing to edit"):
        make(target_new=" Paris")


def test_wrong_types_are_rejected():
    with pytest.raises(EditRequestError, match="must be a string"):
        make(target_new=3)
    with pytest.raises(EditRequestError, match="list of strings"):
        make(paraphrases=5)
    with pytest.raises(EditRequestError, match="probe"):
        make(locality=("just a string",))
    with pytest.raises(EditRequestError, match="portability kind"):
        make(portability=(PortabilityProbe("Q", "A", kind="sideways"),))


def test_probes_from_dicts():
    r = make(
        locality=[{"prompt": "The Louvre is in", "answer": "Paris"}],
        portability=[
            {"prompt": "The Eiffel Tower's country is", "answer": "Italy", "kind": "multi-hop"}
        ],
    )
    assert r.locality == (LocalityProbe("The Louvre is in", "Paris"),)
    assert r.portability[0].kind == "multi-hop"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_roundtrip(tmp_path, suffix):
    requests = [
        make(paraphrases=("The Eiffel Tower stands in",), locality=(LocalityProbe("A is", "B"),)),
        make(case_id=7, portability=(PortabilityProbe("Q", "A", kind="reverse"),)),
    ]
    path = tmp_path / f"requests{suffix}"
    save_requests(requests, path)
    assert load_requests(path) == requests


def test_malformed_record_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = make().to_dict()
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "subject": "Louvre"}) + "\n")
    with pytest.raises(EditRequestError, match="line 2"):
        load_requests(path)
    path.write_text(json.dumps([good, {"prompt": "x"}]))
    path = path.rename(tmp_path / "bad.json")
    with pytest.raises(EditRequestError, match=r"record 1.*required"):
        load_requests(path)
    path.write_text(json.dumps([{**good, "colour": "red"}]))
    with pytest.raises(EditRequestError, match="unknown field"):
        load_requests(path)


def test_prompt_longer_than_context_is_rejected_before_editing(tiny):
    long_prompt = "The Eiffel Tower " + "is very tall and " * 200 + "is located in"
    before = {n: p.clone() for n, p in tiny.model.named_parameters()}
    with pytest.raises(EditRequestError, match="longer than the model's context"):
        edit(tiny, make(prompt=long_prompt), method="ft")
    for n, p in tiny.model.named_parameters():
        assert p.equal(before[n])


def test_one_bad_request_in_a_batch_stops_the_whole_edit(tiny):
    good = make()
    long_prompt = "The Eiffel Tower " + "is very tall and " * 200 + "is in"
    with pytest.raises(EditRequestError, match="request 1"):
        edit(tiny, [good, make(prompt=long_prompt)], method="ft")


def test_probes_enumerate_every_prompt_with_what_it_wants_and_competes_with():
    r = make(
        paraphrases=("Where is {}? In", "The {} stands in"),
        locality=({"prompt": "The Colosseum is in", "answer": "Rome", "kind": "near"},),
        portability=(
            {
                "prompt": "The Eiffel Tower's country is",
                "answer": "Italy",
                "answer_before": "France",
            },
            {"prompt": "La tour Eiffel is in", "answer": "Rome", "kind": "alias"},
        ),
    )
    got = [(p.role, p.prompt, p.wanted, p.other, p.kind, p.answers) for p in r.probes()]
    assert got == [
        ("edit", r.prompt, "Rome", "Paris", None, ("Rome",)),
        ("paraphrase", "Where is Eiffel Tower? In", "Rome", "Paris", None, ("Rome",)),
        ("paraphrase", "The Eiffel Tower stands in", "Rome", "Paris", None, ("Rome",)),
        # locality: the unchanged answer is wanted, and the new target must not leak into it
        ("locality", "The Colosseum is in", "Rome", "Rome", "near", None),
        (
            "portability",
            "The Eiffel Tower's country is",
            "Italy",
            "France",
            "multi-hop",
            ("Italy",),
        ),
        ("portability", "La tour Eiffel is in", "Rome", None, "alias", ("Rome",)),
    ]
    assert make(target_true=None).probes()[0].other is None


def test_the_report_shows_each_probe_with_its_new_and_true_target(tiny):
    r = make(
        locality=({"prompt": "The Colosseum is in", "answer": "Rome"},),
        portability=({"prompt": "The tower's country is", "answer": "Italy", "kind": "alias"},),
    )
    probes = probes_for(r)
    assert [role_label(p) for p in probes] == ["edit", "unrelated", "portability:alias"]
    assert [shown_targets(p) for p in probes] == [
        ("Rome", "Paris"),
        (None, "Rome"),
        ("Italy", None),
    ]
    results = probe(tiny, probes, max_new_tokens=2)
    assert results[1].logprob_new is None and results[1].logprob_true < 0
    assert results[2].logprob_true is None and results[0].logprob_true < 0
    assert before_after_table(results, results).row_count == 3
