"""IKE and IKE-plain: demonstrations, retrieval, overflow, patches of kind "context"."""

import json
from collections import Counter

import pytest
import torch

from lmscalpel import ConfigError, EditRequest, LocalityProbe, Patch, PatchError, edit
from lmscalpel.data.shared import shared_data_dir
from lmscalpel.methods import get_editor
from lmscalpel.methods.ike import (
    IKE,
    ContextOverflowError,
    Demonstration,
    IKEConfig,
    InContextConfig,
    default_pool_path,
    kind_schedule,
    load_pool,
    make_demonstration,
)
from lmscalpel.scoring import score_targets
from lmscalpel.testing import tiny_model
from lmscalpel.testing import weight_copy as weights
from lmscalpel.tokens import format_prompt

CITIES = {
    "Eiffel Tower": "Paris",
    "Colosseum": "Rome",
    "Big Ben": "London",
    "Sagrada Familia": "Barcelona",
}
LANGUAGES = {"Danielle Darrieux": "French", "Toko Yasuda": "Japanese", "Kari Kari": "Finnish"}


def _fact(template, subject, true, new, paraphrase, neighbour, case_id):
    return EditRequest(
        prompt=template.format(subject),
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrases=(paraphrase.format(subject),),
        locality=(LocalityProbe(*neighbour),),
        case_id=case_id,
    )


def _city(subject, true, new, case_id):
    louvre = ("The Louvre is located in the city of", "Paris")
    where = "Where is {}? It is in the city of"
    return _fact("{} is located in the city of", subject, true, new, where, louvre, case_id)


def _language(subject, true, new, case_id):
    rocard = ("Michel Rocard is a native speaker of", "French")
    born = "{} was born speaking"
    return _fact("The mother tongue of {} is", subject, true, new, born, rocard, case_id)


POOL = [_city(s, t, "Berlin", f"city-{i}") for i, (s, t) in enumerate(CITIES.items())] + [
    _language(s, t, "German", f"lang-{i}") for i, (s, t) in enumerate(LANGUAGES.items())
]
REQUEST = _city("Statue of Liberty", "New York", "Tokyo", "edit")


# ---- demonstrations ----------------------------------------------------------------------------
def test_each_demonstration_kind_is_built_from_the_right_fields():
    item = POOL[0]
    fact = "Eiffel Tower is located in the city of Berlin"
    assert make_demonstration(item, "copy") == Demonstration("copy", fact, item.prompt, "Berlin")
    assert make_demonstration(item, "update") == Demonstration(
        "update", fact, "Where is Eiffel Tower? It is in the city of", "Berlin"
    )
    assert make_demonstration(item, "retain") == Demonstration(
        "retain", fact, "The Louvre is located in the city of", "Paris"
    )
    assert make_demonstration(item, "retain").text() == (
        f"New Fact: {fact}\nPrompt: The Louvre is located in the city of Paris"
    )
    with pytest.raises(ValueError, match="unknown demonstration kind"):
        make_demonstration(item, "forget")


@pytest.mark.parametrize(
    ("k", "shares"), [(8, (1, 1, 2)), (7, (1, 3, 4)), (5, (0, 1, 1)), (1, (1, 1, 2))]
)
def test_kind_schedule_keeps_the_proportions_and_interleaves(k, shares):
    kinds = kind_schedule(k, shares)
    assert len(kinds) == k
    counts = Counter(kinds)
    for kind, share in zip(("copy", "update", "retain"), shares):
        assert abs(counts[kind] - k * share / sum(shares)) < 1  # largest remainder
    if k == 8:  # no kind bunches up
        assert kinds[:4].count("retain") == 2 and kinds[4:].count("retain") == 2


def test_ike_retrieves_the_most_similar_pool_facts_most_similar_last(tiny):
    editor = IKE(IKEConfig(k=3, copy_share=1, update_share=1, retain_share=1), pool=POOL)
    patch = edit(tiny, REQUEST, method=editor, apply=False)
    demos = patch.context_state["facts"][0]["demonstrations"]
    assert len(demos) == 3 and patch.info["k"] == [3]
    # the three nearest pool facts are the landmark-in-a-city facts, not the languages ...
    assert all("is located in the city of Berlin" in d["fact"] for d in demos)
    # ... ordered least similar first, and kinds follow the schedule for the nearest first
    similarity = patch.info["demo_similarity"][0]
    assert similarity == sorted(similarity, reverse=True)
    assert [d["kind"] for d in demos][::-1] == kind_schedule(3, (1, 1, 1))
    text = tiny.render_prompt(REQUEST.prompt)  # not applied: nothing changes
    assert text == REQUEST.prompt


def test_a_pool_item_identical_to_the_request_is_never_its_own_demonstration(tiny):
    editor = IKE(IKEConfig(k=2), pool=POOL)
    patch = edit(tiny, POOL[0], method=editor, apply=False)
    assert all(
        d["query"] != POOL[0].prompt for d in patch.context_state["facts"][0]["demonstrations"]
    )


# ---- rendering and patches ---------------------------------------------------------------------
def test_ike_patch_renders_demonstrations_then_fact_then_prompt_and_keeps_weights(tiny):
    saved = weights(tiny)
    before = score_targets(tiny, [REQUEST.prompt], ["Tokyo"])[0].mean_logprob
    patch = edit(tiny, REQUEST, method=IKE(IKEConfig(k=2), pool=POOL))
    assert patch.kind == "context" and not patch.deltas
    text = tiny.render_prompt(REQUEST.paraphrases[0])
    blocks = text.split("\n\n")
    assert len(blocks) == 3
    assert blocks[0].startswith("New Fact: ") and "\nPrompt: " in blocks[0]
    assert blocks[-1] == (
        "New Fact: Statue of Liberty is located in the city of Tokyo\n"
        "Prompt: Where is Statue of Liberty? It is in the city of"
    )
    after = score_targets(tiny, [REQUEST.prompt], ["Tokyo"])[0].mean_logprob
    assert after != before  # the model reads another input
    patch.revert()
    assert tiny.render_prompt(REQUEST.prompt) == REQUEST.prompt
    assert score_targets(tiny, [REQUEST.prompt], ["Tokyo"])[0].mean_logprob == pytest.approx(before)
    for name, p in tiny.model.named_parameters():
        assert torch.equal(p, saved[name])


def test_plain_variant_only_prepends_the_fact(tiny):
    patch = edit(tiny, REQUEST, method="ike-plain")
    assert tiny.render_prompt("The Louvre is located in the city of") == (
        "New Fact: Statue of Liberty is located in the city of Tokyo\n"
        "Prompt: The Louvre is located in the city of"
    )
    patch.revert()


def test_default_k_is_what_fits_the_context_and_an_explicit_overflow_raises():
    lm = tiny_model("llama")  # a context of 256 tokens
    pool = POOL * 8  # 56 items; duplicates are fine for the arithmetic
    patch = edit(lm, REQUEST, method=IKE(IKEConfig(max_k=40), pool=pool), apply=False)
    k = patch.info["k"][0]
    assert 0 < k < 40
    patch.apply(lm)
    n = len(lm.tokenizer(lm.render_prompt(REQUEST.paraphrases[0]))["input_ids"])
    assert n + 16 <= lm.adapter.max_context  # answer_tokens kept free
    patch.revert()
    with pytest.raises(ContextOverflowError, match="does not fit"):
        edit(lm, REQUEST, method=IKE(IKEConfig(k=k + 5), pool=pool))
    assert not lm.context_patches


def test_a_query_that_overflows_the_context_raises_instead_of_truncating(tiny):
    edit(tiny, REQUEST, method=IKE(IKEConfig(k=2), pool=POOL))
    long_query = "Tell me, " * 100 + "where is the Statue of Liberty?"
    with pytest.raises(ContextOverflowError, match="more than the model's context"):
        score_targets(tiny, [long_query], ["Tokyo"])


def test_ike_patch_saves_as_json_only_and_loads_onto_a_fresh_model(tiny, tmp_path):
    patch = edit(tiny, REQUEST, method=IKE(IKEConfig(k=3), pool=POOL))
    expected = tiny.render_prompt(REQUEST.prompt)
    folder = patch.save(tmp_path / "ike.patch")
    assert sorted(p.name for p in folder.iterdir()) == ["patch.json"]
    assert json.loads((folder / "patch.json").read_text())["kind"] == "context"
    fresh = tiny_model("llama")
    loaded = Patch.load(folder).apply(fresh)
    assert fresh.render_prompt(REQUEST.prompt) == expected
    assert score_targets(fresh, [REQUEST.prompt], ["Tokyo"])[0].token_logprobs == pytest.approx(
        score_targets(tiny, [REQUEST.prompt], ["Tokyo"])[0].token_logprobs
    )
    loaded.revert()
    assert fresh.render_prompt(REQUEST.prompt) == REQUEST.prompt


def test_many_sequential_patches_never_nest_and_retrieve_the_relevant_fact(tiny):
    facts = [_city(s, t, "Oslo", f"c{i}") for i, (s, t) in enumerate(CITIES.items())] + [
        _language(s, t, "Latin", f"l{i}") for i, (s, t) in enumerate(LANGUAGES.items())
    ]
    facts += [
        _city(f"{name} Museum", "Paris", "Oslo", f"m{i}")
        for i, name in enumerate(["Picasso", "Van Gogh", "Munch", "Rodin", "Dali", "Goya"])
    ]
    patches = [edit(tiny, request, method="ike-plain") for request in facts]
    assert len(tiny.rewriters()) == 1  # one rewriter for all patches of the method
    for request in facts:
        for query in (request.prompt, request.paraphrases[0]):
            text = tiny.render_prompt(query)
            assert text.count("New Fact:") == 1  # never nested, one fact retrieved
            assert f"New Fact: {request.prompt} {request.target_new}\n" in text
    for patch in reversed(patches):
        patch.revert()
    assert tiny.render_prompt(REQUEST.prompt) == REQUEST.prompt


def test_retrieve_shows_several_facts_most_similar_last(tiny):
    for request in POOL:
        edit(tiny, request, method="ike-plain", config={"retrieve": 2})
    text = tiny.render_prompt("The mother tongue of Kari Kari is")
    lines = text.splitlines()
    assert [line.startswith("New Fact:") for line in lines] == [True, True, False]
    assert lines[1] == "New Fact: The mother tongue of Kari Kari is German"


def test_ike_and_plain_patches_together_each_render_once(tiny):
    edit(tiny, REQUEST, method=IKE(IKEConfig(k=1), pool=POOL))
    edit(tiny, POOL[0], method="ike-plain")
    assert len(tiny.rewriters()) == 2
    assert tiny.render_prompt("x").count("Prompt: ") == 3  # IKE's demo and query, plain's query


def test_chat_variant_turns_demonstrations_into_turns(tiny):
    tiny.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tiny.chat = True
    edit(tiny, REQUEST, method=IKE(IKEConfig(k=2), pool=POOL))
    messages = tiny.render_chat(REQUEST.prompt)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == (
        f"New Fact: Statue of Liberty is located in the city of Tokyo\nPrompt: {REQUEST.prompt}"
    )
    assert messages[1]["content"] in ("Berlin", "Paris")  # a demonstration's answer
    text = format_prompt(tiny, REQUEST.prompt)
    assert text.endswith(f"Prompt: {REQUEST.prompt}\n<assistant>")
    score_targets(tiny, [REQUEST.prompt], ["Tokyo"])  # scores through the template


def test_chat_turns_off_puts_everything_in_one_user_message(tiny):
    tiny.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    )
    tiny.chat = True
    edit(tiny, REQUEST, method=IKE(IKEConfig(k=2, chat_turns=False), pool=POOL))
    messages = tiny.render_chat(REQUEST.prompt)
    assert [m["role"] for m in messages] == ["user"]
    assert messages[0]["content"].count("New Fact:") == 3


# ---- configuration, pool and errors ------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"k": -1},
        {"retrieve": 0},
        {"copy_share": 0, "update_share": 0, "retain_share": 0},
        {"kk": 3},
    ],
)
def test_bad_config_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        IKEConfig.from_dict(bad)


def test_ike_config_is_the_render_settings_plus_demonstrations_and_the_patch_keeps_them(tiny):
    config = IKEConfig(k=2, retrieve=3, instruction="Facts follow.")
    assert isinstance(config, InContextConfig)
    demo_fields = set(IKEConfig.field_names()) - set(InContextConfig.field_names())
    assert demo_fields == {"k", "max_k", "copy_share", "update_share", "retain_share", "pool",
                           "pool_size"}  # fmt: skip
    patch = edit(tiny, REQUEST, method=IKE(config, pool=POOL), apply=False)
    render = patch.context_state["render"]
    assert render == {**InContextConfig().to_dict(), "retrieve": 3, "instruction": "Facts follow."}
    assert InContextConfig.from_render_state(render) == InContextConfig(
        retrieve=3, instruction="Facts follow."
    )
    patch.apply(tiny)
    assert tiny.render_prompt(REQUEST.prompt).startswith("Facts follow.\n\nNew Fact: ")
    patch.revert()


def test_a_patch_with_broken_render_settings_is_refused_by_name(tiny):
    patch = edit(tiny, REQUEST, method="ike-plain", apply=False)
    patch.context_state["render"]["retrieve"] = 0
    with pytest.raises(ConfigError, match="retrieve must be at least 1"):
        patch.apply(tiny)
    assert not tiny.context_patches


def test_k_larger_than_the_pool_is_an_error(tiny):
    with pytest.raises(ConfigError, match="pool holds"):
        edit(tiny, REQUEST, method=IKE(IKEConfig(k=50), pool=POOL))


def test_a_missing_default_pool_says_how_to_fix_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LMSCALPEL_DATA"):
        edit(tiny, REQUEST, method="ike")


def test_pool_files_in_counterfact_and_lmscalpel_layouts(tmp_path):
    from lmscalpel import save_requests

    record = {
        "case_id": 7,
        "prompt": "Toko Yasuda, the",
        "target_new": "piano",
        "subject": "Toko Yasuda",
        "ground_truth": "guitar",
        "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the",
        "locality_ground_truth": "guitar",
    }
    (tmp_path / "cf.json").write_text(json.dumps([record, {"prompt": "broken"}]))
    (item,) = load_pool(tmp_path / "cf.json")
    assert (item.prompt, item.target_new, item.paraphrases, item.locality[0].answer) == (
        "Toko Yasuda, the",
        "piano",
        ("Toko Yasuda is incredible at",),
        "guitar",
    )
    save_requests(POOL, tmp_path / "pool.jsonl")
    assert load_pool(tmp_path / "pool.jsonl", size=3) == POOL[:3]


def test_the_default_pool_is_counterfacts_training_split():
    if not default_pool_path().is_file():
        pytest.skip(
            f"no CounterFact training split at {default_pool_path()} (the shared data folder "
            f"{shared_data_dir()}; set LMSCALPEL_DATA to the folder holding counterfact/train.json)"
        )
    pool = load_pool()
    assert len(pool) > 9000
    assert all(r.paraphrases and r.locality for r in pool[:100])


def test_a_weight_method_cannot_make_context_patches(tiny):
    patch = Patch.in_context(tiny, "ft", [REQUEST], {"facts": []})
    with pytest.raises(PatchError, match="does not make in-context patches"):
        patch.apply(tiny)


def test_a_broken_context_patch_is_refused_at_apply_time(tiny):
    patch = Patch.in_context(tiny, "ike", [REQUEST], {"render": {}})
    with pytest.raises(PatchError, match="carries no facts"):
        patch.apply(tiny)
    assert not tiny.context_patches and not patch.is_applied


def test_context_patches_cannot_be_exported(tiny, tmp_path):
    patch = edit(tiny, REQUEST, method="ike-plain", apply=False)
    with pytest.raises(PatchError, match="cannot be exported"):
        patch.export(tiny, tmp_path / "model")


def test_editor_instance_and_config_together_is_ambiguous(tiny):
    with pytest.raises(ConfigError, match="not to edit"):
        edit(tiny, REQUEST, method=get_editor("ike-plain"), config={"retrieve": 2})
