"""Validation at the door, through the Python API (issue 15, item 1): every malformed request,
config value, config file and method name of the issue's probe is one of lmscalpel's documented
errors, naming what is wrong, and the model is bit-identical after every failed call."""

import dataclasses
import hashlib
import json
import math
import pickle
import typing

import pytest

from lmscalpel.core.config import ConfigError, MethodConfig, short_repr
from lmscalpel.core.requests import EditRequest, EditRequestError, load_requests
from lmscalpel.data.reading import DatasetError, read_dataset
from lmscalpel.editing import edit
from lmscalpel.methods import available_methods, editor_class, get_editor
from lmscalpel.methods.base import UnknownMethodError
from lmscalpel.methods.config_files import method_configs, parse_overrides
from lmscalpel.methods.ft import FTConfig, FTLConfig, FTMConfig
from lmscalpel.methods.ike.config import IKEConfig, InContextConfig
from lmscalpel.methods.lora import LoRAConfig
from lmscalpel.methods.mend import MENDConfig, MENDTrainConfig
from lmscalpel.methods.rome import ROMEConfig
from lmscalpel.testing import tiny_model

NAN, INF = float("nan"), float("inf")
PROMPT = "The Eiffel Tower is located in the city of"
GOOD = {"prompt": PROMPT, "subject": "Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}
SURROGATE = "\udc80"  # a lone surrogate: a str that cannot be encoded (the tokenizer's TypeError)


def weights_digest(lm) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(lm.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def all_config_classes() -> list[type[MethodConfig]]:
    classes = {editor_class(m).config_class for m in available_methods()}
    return sorted(classes | {MENDTrainConfig}, key=lambda c: c.__name__)


# ---- config values ----------------------------------------------------------------------------

# (config class, field, value): the raw exceptions, silent acceptances and NaN edits
BAD_VALUES = [
    (ROMEConfig, "lr", NAN),  # the optimiser's ValueError
    (ROMEConfig, "lr", INF),  # NaN weights
    (ROMEConfig, "lr", 1e308),  # NaN weights
    (ROMEConfig, "lr", 0),  # silently accepted
    (ROMEConfig, "lr", -0.5),
    (ROMEConfig, "kl_factor", NAN),
    (ROMEConfig, "kl_factor", INF),
    (ROMEConfig, "kl_factor", -1),
    (ROMEConfig, "weight_decay", NAN),
    (ROMEConfig, "weight_decay", INF),
    (ROMEConfig, "weight_decay", -1),
    (ROMEConfig, "max_steps", 0),
    (ROMEConfig, "max_steps", -1),
    (ROMEConfig, "stop_nll", NAN),
    (ROMEConfig, "stop_nll", -1),
    (ROMEConfig, "clamp_norm", -1),
    (ROMEConfig, "clamp_norm", 0),
    (ROMEConfig, "kl_prompt", "{}{}"),  # IndexError from str.format
    (ROMEConfig, "kl_prompt", "{0} and {1}"),
    (ROMEConfig, "kl_prompt", "{subject} is a"),
    (ROMEConfig, "kl_prompt", "no placeholder"),
    (ROMEConfig, "kl_prompt", "{"),
    (ROMEConfig, "kl_prompt", "{} is }"),
    (ROMEConfig, "kl_prompt", "{!r} is a"),
    (ROMEConfig, "kl_prompt", SURROGATE + " {}"),
    (ROMEConfig, "default_depth", 1.5),
    (ROMEConfig, "default_depth", NAN),
    (ROMEConfig, "prefixes", -1),
    (ROMEConfig, "prefix_length", 0),
    (ROMEConfig, "stats_samples", 0),
    (ROMEConfig, "stats_corpus", ""),
    (ROMEConfig, "lr", "fast"),
    (ROMEConfig, "max_steps", 2.5),
    (ROMEConfig, "max_steps", True),
    (ROMEConfig, "lr", 10**400),  # an int too large for a float
    (FTLConfig, "weight_decay", INF),  # NaN weights
    (FTLConfig, "weight_decay", NAN),
    (FTLConfig, "weight_decay", -0.1),
    (FTLConfig, "norm_constraint", NAN),  # NaN weights
    (FTLConfig, "norm_constraint", INF),
    (FTLConfig, "norm_constraint", 0),
    (FTLConfig, "lr", NAN),
    (FTLConfig, "lr", 0),
    (FTLConfig, "steps", -1),  # silently accepted
    (FTLConfig, "steps", 0),
    (FTLConfig, "stop_loss", NAN),
    (FTLConfig, "layers", []),
    (FTLConfig, "default_depths", []),
    (FTLConfig, "default_depths", [0.5, NAN]),
    (FTLConfig, "default_depths", [2.0]),
    (FTConfig, "lr", INF),
    (FTMConfig, "lr", -1),
    (LoRAConfig, "rank", 0),
    (LoRAConfig, "alpha", NAN),
    (LoRAConfig, "alpha", 0),
    (LoRAConfig, "seed", -1),
    (InContextConfig, "retrieve", 0),
    (InContextConfig, "answer_tokens", 0),
    (InContextConfig, "encoder", ""),
    (InContextConfig, "instruction", SURROGATE),
    (IKEConfig, "k", -1),
    (IKEConfig, "max_k", -1),
    (IKEConfig, "copy_share", NAN),
    (IKEConfig, "retain_share", -1),
    (IKEConfig, "retain_share", INF),
    (IKEConfig, "pool_size", 0),
    (InContextConfig, "encoder", "x" * 300),  # a raw OSError (name too long) where it is opened
    (IKEConfig, "pool", "x" * 300),
    (IKEConfig, "pool", "a/" + "b" * 256 + "/c.json"),
    (ROMEConfig, "stats_corpus", "a\0b"),
    (MENDConfig, "editor", "x" * 300),
    (MENDConfig, "step_scale", 0),
    (MENDConfig, "step_scale", NAN),
    (MENDTrainConfig, "stats_corpus", "x" * 300),
    (MENDTrainConfig, "lr", NAN),
    (MENDTrainConfig, "layers", []),
    (MENDTrainConfig, "step_scales", [0.5, -1]),
    (MENDTrainConfig, "step_scales", []),
    (MENDTrainConfig, "ridge", 0),
    (MENDTrainConfig, "grad_clip", NAN),
    (MENDTrainConfig, "max_minutes", -1),
    (MENDTrainConfig, "rank", 0),
]


def _value_id(value):
    return repr(value)[:20]


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    BAD_VALUES,
    ids=[f"{c.__name__}.{n}={_value_id(v)}" for c, n, v in BAD_VALUES],
)
def test_a_bad_config_value_is_a_config_error_naming_field_and_value(cls, name, value):
    for make in (
        lambda: cls(**{name: value}),
        lambda: cls.from_dict({name: value}),
        lambda: cls.from_dict({"defaults": {name: value}}, "llama"),
        lambda: cls.for_model("llama", **{name: value}),
        lambda: cls().replace(**{name: value}),
    ):
        with pytest.raises(ConfigError) as caught:
            make()
        message = str(caught.value)
        assert f"{cls.__name__}.{name}" in message, message
        if isinstance(value, float) and not isinstance(value, bool):
            assert repr(value) in message or f"{value}" in message, message


@pytest.mark.parametrize("cls", all_config_classes(), ids=lambda c: c.__name__)
def test_every_float_field_of_every_method_config_refuses_nan(cls):
    hints = typing.get_type_hints(cls)
    floats = [f.name for f in dataclasses.fields(cls) if "float" in str(hints[f.name])]
    for name in floats:
        field_type = str(hints[name])
        value = [NAN] if "list" in field_type or "tuple" in field_type else NAN
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{name}"):
            cls(**{name: value})


@pytest.mark.parametrize("cls", all_config_classes(), ids=lambda c: c.__name__)
def test_every_declared_bound_is_enforced_just_past_it_and_allowed_at_it(cls):
    """Each bound of each field, from its own declaration: the bound itself (when inclusive) is
    accepted, a step past it is refused with the allowed range in the message."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        is_int = "int" in str(hints[f.name]) and "float" not in str(hints[f.name])
        step = 1 if is_int else 1e-6
        listed = "list" in str(hints[f.name]) or "tuple" in str(hints[f.name])
        wrap = (lambda v: [v]) if listed else (lambda v: v)
        for key, outside in (("at_least", -step), ("above", 0), ("at_most", step), ("below", 0)):
            if key not in f.metadata:
                continue
            bound = f.metadata[key]
            outside = math.copysign(max(abs(outside), abs(bound) * 1e-9), outside) if outside else 0
            bad = bound + outside if key in ("at_least", "at_most") else bound
            if is_int:
                bad = int(bad)
            with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{f.name} must be"):
                cls(**{f.name: wrap(bad)})
            if key in ("at_least", "at_most") and math.isfinite(bound):
                good = int(bound) if is_int else float(bound)
                try:
                    cls(**{f.name: wrap(good)})
                except ConfigError as error:  # only cross-field rules may refuse it
                    assert f"{cls.__name__}.{f.name} must be" not in str(error), error


def test_the_defaults_of_every_method_and_family_pass_their_own_bounds():
    for cls in all_config_classes():
        for family in (None, *cls.family_defaults):
            cls.for_model(family)


def test_an_allowed_range_is_described_for_the_methods_listing():
    described = {f.name: f for f in ROMEConfig.describe()}
    assert described["lr"].allowed == "above 0, at most 1000 and finite"
    assert described["max_steps"].allowed == "at least 1 and at most 100000"
    assert described["kl_prompt"].allowed == "with {}"


def test_a_literal_brace_in_a_format_field_is_written_doubled():
    assert ROMEConfig(kl_prompt="{{x}} {} is a").kl_prompt == "{{x}} {} is a"


def test_an_infinite_gradient_clip_is_allowed_where_declared_but_nan_never():
    assert MENDTrainConfig(grad_clip=INF).grad_clip == INF
    with pytest.raises(ConfigError, match="grad_clip"):
        MENDTrainConfig(grad_clip=NAN)


# ---- config files and overrides ----------------------------------------------------------------

BAD_CONFIG_DICTS = [
    ({"defaults": 5}, "defaults"),
    ({"defaults": [1, 2]}, "defaults"),
    ({"families": 5}, "families"),
    ({"families": {"llama": 5}}, "families.llama"),
    ({"families": {"llama": {"nosuch": 1}}}, "nosuch"),
    ({"families": {"gpt2": {"lrr": 1}}}, "lrr"),
    ({"defaults": {"lr": "fast"}}, "lr"),
    ({"defaults": {}, "extra": 1}, "extra"),
    ({"defaults": {1: 2}}, "keys must be names"),
    ({1: 2}, "unknown"),
    ({"lrr": 0.1}, "lrr"),
    ({"lr": None}, "lr"),
    ({"layer": [3]}, "layer"),
]


@pytest.mark.parametrize(("data", "message"), BAD_CONFIG_DICTS, ids=lambda v: short_repr(v, 30))
def test_a_config_of_the_wrong_shape_is_a_config_error(data, message):
    with pytest.raises(ConfigError, match=message):
        ROMEConfig.from_dict(data, "llama")


@pytest.mark.parametrize("data", [5, "lr: 1", [1], None], ids=repr)
def test_a_config_that_is_not_a_mapping_is_a_config_error(data):
    with pytest.raises(ConfigError, match="mapping"):
        ROMEConfig.from_dict(data)


BAD_YAML_FILES = [
    (b"defaults: 5\n", "defaults"),
    (b"lr: [\n", "invalid YAML"),
    (b"lr: .nan\n", "ROMEConfig.lr"),
    (b"lr: .inf\n", "ROMEConfig.lr"),
    (b"\xff\xfe lr: 1\n", "not UTF-8"),
    (b"[" * 5000, "invalid YAML"),
    (b"families: {llama: [1]}\n", "families.llama"),
    (b"- 1\n- 2\n", "mapping"),
]


@pytest.mark.parametrize(("content", "message"), BAD_YAML_FILES, ids=lambda v: short_repr(v, 24))
def test_a_bad_yaml_config_file_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "rome.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        ROMEConfig.from_yaml(path, "llama")
    with pytest.raises(ConfigError, match=message):
        method_configs(["rome"], "llama", path)


def test_a_config_path_that_is_a_folder_or_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="folder"):
        ROMEConfig.from_yaml(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config file"):
        ROMEConfig.from_yaml(tmp_path / "none.yaml")


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lr"], "key=value"),
        (["=1"], "key=value"),
        ([5], "key=value"),
        (["lr=["], "invalid list"),
        (["layers=[1, 2"], "invalid list"),
        (["lr=" + "[" * 5000], "invalid list"),
    ],
    ids=lambda v: short_repr(v, 20),
)
def test_a_malformed_override_is_a_config_error(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(items)


def test_override_text_that_is_not_yaml_stays_text_for_the_config_to_judge():
    assert parse_overrides(["kl_prompt={} is a", "x={}", "y=[1, 2]", "z=.nan"]) == {
        "kl_prompt": "{} is a",
        "x": "{}",
        "y": [1, 2],
        "z": pytest.approx(NAN, nan_ok=True),
    }
    assert ROMEConfig().replace(**parse_overrides(["kl_prompt={} is a"])).kl_prompt == "{} is a"


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ("lr=.nan", "lr"),
        ("lr=.inf", "lr"),
        ("layers=[]", "layers"),
        ("steps=-1", "steps"),
        ("weight_decay=.nan", "weight_decay"),
        ("norm_constraint=.nan", "norm_constraint"),
        ("lr=2020-01-01", "lr"),
        ("lr={", "lr"),  # not YAML: the text "{", not a float
        ("steps={}", "steps"),
        ("lr=fast", "lr"),
    ],
)
def test_an_out_of_range_override_is_a_config_error_naming_the_field(item, field):
    with pytest.raises(ConfigError, match=rf"FTLConfig\.{field}"):
        method_configs(["ft-l"], "llama", None, parse_overrides([item]))


def test_a_non_text_override_key_is_a_config_error():
    with pytest.raises(ConfigError, match="name"):
        method_configs(["ft-l"], "llama", None, {5: 1})


# ---- method names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "suggested"), [("rom", "rome"), ("ft_l", "ft-l"), ("Lora", "lora")]
)
def test_an_unknown_method_is_a_config_error_with_close_matches(name, suggested):
    for call in (
        lambda: get_editor(name),
        lambda: editor_class(name),
        lambda: method_configs([name], None),
    ):
        with pytest.raises(UnknownMethodError) as caught:
            call()
        assert isinstance(caught.value, ConfigError)
        assert suggested in caught.value.suggestions and repr(suggested) in str(caught.value)
        assert "available:" in str(caught.value)


@pytest.mark.parametrize("name", ["nosuch", "", 5, None])
def test_a_method_name_nothing_is_close_to_is_still_an_unknown_method_error(name):
    with pytest.raises(UnknownMethodError, match="unknown editing method"):
        get_editor(name)


# ---- edit requests ------------------------------------------------------------------------------


def request(**changes):
    data = {**GOOD, **changes}
    return EditRequest.from_dict({k: v for k, v in data.items() if v is not ...})


# (changes to a good request, the field the message must name)
BAD_REQUESTS = [
    ({"prompt": PROMPT + SURROGATE}, "prompt"),  # the tokenizer's TypeError
    ({"subject": "Eiffel" + SURROGATE}, "subject"),
    ({"target_new": SURROGATE}, "target_new"),
    ({"target_true": "Par" + SURROGATE}, "target_true"),
    ({"paraphrases": ["Where is the Eiffel Tower?" + SURROGATE]}, "paraphrases[0]"),
    ({"subject": ""}, "subject"),
    ({"subject": "   "}, "subject"),
    ({"target_new": ""}, "target_new"),
    ({"target_new": " "}, "target_new"),
    ({"subject": "Louvre"}, "subject"),
    ({"subject": "eiffel tower"}, "subject"),
    ({"subject": " Eiffel Tower"}, "subject"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ["a"]}, "prompt"),
    ({"subject": ...}, "subject"),
    ({"target_new": ...}, "target_new"),
    ({"target_new": "Paris"}, "target_new"),
    ({"paraphrases": 5}, "paraphrases"),
    ({"paraphrases": {"a": 1}}, "paraphrases"),
    ({"paraphrases": [5]}, "paraphrases[0]"),
    ({"paraphrases": [""]}, "paraphrases[0]"),
    ({"locality": 5}, "locality"),  # a raw TypeError
    ({"locality": "Rome is in"}, "locality"),
    ({"locality": [5]}, "locality[0]"),
    ({"locality": ["just a string"]}, "locality[0]"),
    ({"locality": [{"prompt": "Rome is in"}]}, "locality[0]"),
    ({"locality": [{"prompt": "Rome is in", "answer": 5}]}, "locality[0]"),
    ({"locality": [{"prompt": "Rome is in", "answer": "Italy", "x": 1}]}, "locality[0]"),
    ({"locality": [{"prompt": SURROGATE, "answer": "Italy"}]}, "locality[0]"),
    ({"locality": [{"prompt": "a", "answer": "b"}, None]}, "locality[1]"),
    ({"portability": 5}, "portability"),
    ({"portability": [["Paris is in", "France"]]}, "portability[0]"),  # silently accepted
    ({"portability": [{"prompt": "a", "answer": "b", "kind": "sideways"}]}, "portability[0]"),
    ({"portability": [{"prompt": "a", "answer": "b", "answer_before": 5}]}, "portability[0]"),
    ({"portability": [{"prompt": "a", "answer": "b", "kind": ["multi-hop"]}]}, "portability[0]"),
    ({"portability": [{"prompt": "a"}]}, "portability[0]"),
    ({"case_id": 1.5}, "case_id"),
    ({"case_id": True}, "case_id"),
    ({"case_id": 10**5000}, "case_id"),
    ({"case_id": [1]}, "case_id"),
    ({"case_id": SURROGATE}, "case_id"),
    ({"extra": 5}, "extra"),
    ({"extra": {"note": SURROGATE}}, "extra"),
    ({"extra": {"x": object()}}, "extra"),
    ({"nosuch": 1}, "nosuch"),
    ({"Prompt": PROMPT}, "Prompt"),
]


@pytest.mark.parametrize(("changes", "field"), BAD_REQUESTS, ids=lambda v: short_repr(v, 40))
def test_a_malformed_request_is_an_edit_request_error_naming_the_field(changes, field):
    with pytest.raises(EditRequestError) as caught:
        request(**changes)
    assert field in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_deeply_nested_extra_is_an_edit_request_error():
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(EditRequestError, match="extra"):
        request(extra={"deep": nested})


def test_a_good_request_and_single_probes_are_accepted():
    r = request(
        locality={"prompt": "The Colosseum is in", "answer": "Rome"},
        portability=[{"prompt": "The Eiffel Tower's country is", "answer": "Italy"}],
    )
    assert r.locality[0].answer == "Rome" and r.portability[0].kind == "multi-hop"
    assert EditRequest.from_dict(r.to_dict()) == r


BAD_REQUEST_FILES = [
    ("requests.json", json.dumps([GOOD])[:-7].encode(), "invalid JSON"),  # truncated
    ("requests.jsonl", (json.dumps(GOOD)[:-3] + "\n").encode(), "line 1"),
    ("requests.json", b"\xff\xfe\x00[", "not UTF-8"),
    ("requests.json", json.dumps(GOOD).encode("utf-16"), "not UTF-8"),
    ("requests.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("requests.jsonl", b"[" * 100_000 + b"\n", "nested too deeply"),
    ("requests.json", json.dumps([{**GOOD, "locality": 5}]).encode(), "locality"),
    ("requests.jsonl", (json.dumps({**GOOD, "locality": 5}) + "\n").encode(), "locality"),
    ("requests.json", json.dumps([GOOD, 5]).encode(), "record 1"),
    ("requests.json", b'"just a string"', "JSON object"),
    ("requests.json", json.dumps([{**GOOD, "prompt": "\\udc80"}]).encode(), "prompt"),
    (
        "requests.json",
        b'[{"prompt": "The \\udc80 Eiffel Tower is in", "subject": "Eiffel Tower", '
        b'"target_new": "Rome"}]',
        "prompt",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "message"), BAD_REQUEST_FILES, ids=lambda v: short_repr(v, 30)
)
def test_a_bad_requests_file_is_an_edit_request_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EditRequestError, match=message) as caught:
        load_requests(path)
    assert str(path) in str(caught.value)


def test_a_requests_path_that_is_a_folder_or_missing_is_a_clear_error(tmp_path):
    with pytest.raises(EditRequestError, match="folder"):
        load_requests(tmp_path)
    with pytest.raises(FileNotFoundError, match="no requests file"):
        load_requests(tmp_path / "none.json")
    with pytest.raises(EditRequestError, match="cannot read"):
        load_requests(tmp_path / ("x" * 300 + ".json"))  # too long for the file system
    with pytest.raises(ConfigError, match="cannot read"):
        ROMEConfig.from_yaml(tmp_path / ("x" * 300 + ".yaml"))


# ---- whole edits: refused before anything runs, the model untouched ---------------------------


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


# (method, config): every NaN-weight edit and raw optimiser error of the issue
REFUSED_CONFIGS = [
    ("rome", {"lr": INF}),
    ("rome", {"lr": 1e308}),
    ("rome", {"lr": NAN}),
    ("rome", {"kl_factor": NAN}),
    ("rome", {"kl_factor": INF}),
    ("rome", {"weight_decay": NAN}),
    ("rome", {"weight_decay": INF}),
    ("rome", {"kl_prompt": "{}{}"}),
    ("rome", {"max_steps": 0}),
    ("rome", {"stop_nll": NAN}),
    ("rome", {"clamp_norm": -1}),
    ("ft-l", {"weight_decay": INF}),
    ("ft-l", {"norm_constraint": NAN}),
    ("ft-l", {"lr": NAN}),
    ("ft-l", {"lr": 0}),
    ("ft-l", {"steps": -1}),
    ("ft-m", {"layers": []}),
    ("lora", {"rank": 0}),
    ("ike-plain", {"retrieve": 0}),
    ("ike", {"retrieve": 2, "encoder": "x" * 300}),  # fuzz: a raw OSError
    ("rome", {"stats_corpus": "a\0b"}),
    ("rome", {"defaults": 5}),
    ("rome", {"families": {"llama": 5}}),
]


@pytest.mark.parametrize(("method", "config"), REFUSED_CONFIGS, ids=lambda v: short_repr(v, 30))
def test_a_refused_config_leaves_the_model_bit_identical(lm, method, config):
    before = weights_digest(lm)
    with pytest.raises(ConfigError):
        edit(lm, request(), method=method, config=config)
    assert weights_digest(lm) == before


@pytest.mark.parametrize("method", ["nosuch", "rom"])
def test_an_unknown_method_in_edit_is_refused_and_the_model_untouched(lm, method):
    before = weights_digest(lm)
    with pytest.raises(UnknownMethodError):
        edit(lm, request(), method=method)
    assert weights_digest(lm) == before


def test_a_too_long_request_is_refused_before_the_method_runs(lm, monkeypatch):
    calls = []
    editor_type = editor_class("ft-l")
    monkeypatch.setattr(editor_type, "compute", lambda *args: calls.append(args))
    before = weights_digest(lm)
    too_long = request(prompt="word " * 400 + PROMPT)
    with pytest.raises(EditRequestError, match="context"):
        edit(lm, too_long, method="ft-l")
    long_probe = request(locality=[{"prompt": "word " * 400, "answer": "x"}])
    with pytest.raises(EditRequestError, match="locality prompt"):
        edit(lm, long_probe, method="ft-l")
    long_port = request(portability=[{"prompt": "word " * 400, "answer": "x"}])
    with pytest.raises(EditRequestError, match="portability prompt"):
        edit(lm, long_port, method="ft-l")
    assert not calls and weights_digest(lm) == before


@pytest.mark.parametrize("bad", [5, "a request", [5], [], {"prompt": PROMPT}])
def test_something_that_is_not_a_request_is_refused(lm, bad):
    before = weights_digest(lm)
    with pytest.raises(EditRequestError):
        edit(lm, bad, method="ft-l")
    assert weights_digest(lm) == before


def test_a_config_of_the_wrong_class_is_refused(lm):
    with pytest.raises(ConfigError, match="takes a FTLConfig"):
        edit(lm, request(), method="ft-l", config=ROMEConfig())
    with pytest.raises(ConfigError):
        edit(lm, request(), method="ft-l", config=5)


def test_an_unknown_method_error_survives_pickling():
    with pytest.raises(UnknownMethodError) as caught:
        get_editor("rom")
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value) and again.suggestions == ["rome"]


@pytest.mark.parametrize(("n", "start"), [(-1, 0), (1, -3), (1.5, 0), (True, 0)])
def test_a_negative_or_fractional_selection_is_a_dataset_error(tmp_path, n, start):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([GOOD]))
    with pytest.raises(DatasetError, match="must be a whole number"):
        read_dataset(path).select(n, start=start)


def test_a_data_path_that_is_a_folder_unreadable_or_not_utf8_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="is a folder, not a data file"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match="cannot read a data file"):
        read_dataset(tmp_path / ("x" * 300 + ".json"))
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps([GOOD]).replace("Rome", "R\xf4me").encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_dataset(latin)
    with pytest.raises(FileNotFoundError, match="no data file"):
        read_dataset(tmp_path / "none.json")
