"""Fuzzing the Python API (issue 15): random and adversarial edit requests (odd types, lone
surrogates, huge strings, missing and extra keys), hyperparameters of rome / ft-l / ike / lora
(nan, inf, negative, huge, wrong types; as dicts and as YAML files of every layout) and JSONL
request files (truncated, not UTF-8, nested, wrong shapes).

Every call must either succeed — a patch whose deltas are finite, which applies and reverts to the
bit-identical model — or raise one of lmscalpel's documented errors (the ones the CLI reports as
one line, :func:`lmscalpel.cli.app.user_errors`); after every failed call the model's weights hash
exactly as before. A call that is valid but would run long (``steps=10**9``) is stopped by a time
budget (an exception raised from a timer, anywhere in the computation), after which the weights
must be untouched too.

``make test`` runs a short hypothesis profile; the slow suite runs the long one, and with
``$LMSCALPEL_RELIABILITY_OUT`` set writes how many inputs it generated and what became of them to
``fuzz.json`` there (docs/reliability.md quotes it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmscalpel.cli.app import user_errors
from lmscalpel.core.files import atomic_write_json
from lmscalpel.core.requests import EditRequest, load_requests
from lmscalpel.editing import edit
from lmscalpel.methods import editor_class
from lmscalpel.patch import Patch
from lmscalpel.testing import tiny_model

DOCUMENTED = user_errors()
SHORT = settings(
    max_examples=int(os.environ.get("LMSCALPEL_FUZZ_EXAMPLES", "12")),
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
LONG = settings(
    max_examples=int(os.environ.get("LMSCALPEL_FUZZ_LONG_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
BUDGET_SECONDS = float(os.environ.get("LMSCALPEL_FUZZ_BUDGET", "1.5"))

PROMPT = "The Eiffel Tower is located in the city of"
GOOD = {"prompt": PROMPT, "subject": "Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}
#: cheap configurations of each fuzzed method on a tiny model (the fuzz changes some fields)
CHEAP: dict[str, dict[str, Any]] = {
    "rome": {"layer": 1, "max_steps": 3, "statistics": False, "prefixes": 0},
    "ft-l": {"layers": [1], "steps": 2, "lr": 0.01},
    "ft-m": {"layers": [1], "steps": 2, "lr": 0.01},
    "lora": {"layers": [1], "steps": 2, "rank": 2},
    "ike": {"retrieve": 1, "answer_tokens": 4},
}

# ---- bookkeeping -------------------------------------------------------------------------------
TALLY: Counter[tuple[str, str]] = Counter()


def tally_to_json(tally: Counter[tuple[str, str]], name: str) -> None:
    """Add this module's counts to ``fuzz.json`` in ``$LMSCALPEL_RELIABILITY_OUT``."""
    out = os.environ.get("LMSCALPEL_RELIABILITY_OUT")
    if not out or not tally:
        return
    path = Path(out) / "fuzz.json"
    data = json.loads(path.read_text()) if path.is_file() else {"suites": {}}
    data["suites"][name] = {f"{area}:{outcome}": n for (area, outcome), n in sorted(tally.items())}
    totals: Counter[str] = Counter()  # of the malformed-input suites (faults are counted apart)
    for suite_name, suite in data["suites"].items():
        for key, n in suite.items():
            if suite_name in ("api", "cli"):
                totals[key.split(":")[1]] += n
    data["totals"] = dict(totals)
    data["generated_inputs"] = sum(totals.values())
    data["malformed_inputs_refused"] = totals.get("documented-error", 0)
    data["raw_exceptions"] = totals.get("raw-exception", 0)
    data["measured"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(path, data)


@pytest.fixture(scope="module", autouse=True)
def fuzz_figures():
    TALLY.clear()
    yield
    tally_to_json(TALLY, "api")


@pytest.fixture(scope="module", autouse=True)
def fuzz_home(tmp_path_factory):
    """A cache folder of the module's own (statistics, prefixes), and one torch thread."""
    old_home, old_threads = os.environ.get("LMSCALPEL_HOME"), torch.get_num_threads()
    os.environ["LMSCALPEL_HOME"] = str(tmp_path_factory.mktemp("fuzz-home"))
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    if old_home is None:
        os.environ.pop("LMSCALPEL_HOME", None)
    else:
        os.environ["LMSCALPEL_HOME"] = old_home


@pytest.fixture(scope="module")
def lm(fuzz_home):
    """The tiny model, after one good edit of each fuzzed method: what those import lazily
    (``datasets``, the sentence encoder) is imported before any time budget could interrupt an
    import half-way (which leaves a broken module behind for the rest of the process)."""
    model = tiny_model("llama")
    request = EditRequest.from_dict(GOOD)
    for method, config in CHEAP.items():
        edit(model, request, method=method, config=config).revert()
    return model


def weight_digest(lm) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(lm.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class OverBudget(Exception):
    """Raised by the timer inside a call that runs past its budget (not an lmscalpel error)."""


@contextmanager
def budget(seconds: float = BUDGET_SECONDS):
    """Raise :class:`OverBudget` wherever the block is when ``seconds`` have passed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise OverBudget(f"over the {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)  # again and again: a handler that fires
    # inside a callback whose exceptions are ignored (the garbage collector's) is not the end
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def finite(patch: Patch) -> bool:
    return all(bool(torch.isfinite(t).all()) for d in patch.deltas for t in d.tensors().values())


def attempt(lm, area: str, call: Callable[[], Any]) -> str:
    """Run ``call`` (which may edit ``lm``) and judge it; returns the outcome's name.

    Success: any patch it returns has finite deltas, and reverting it restores the weights bit for
    bit. Failure: a documented error (or the time budget), and the weights are bit-identical."""
    before = weight_digest(lm)
    try:
        with budget():
            result = call()
    except DOCUMENTED as error:
        outcome = "documented-error"
        assert str(error).strip(), f"{type(error).__name__} without a message"
    except OverBudget:
        outcome = "over-budget"
    except RecursionError as error:  # a raw exception: the defect this suite exists to find
        TALLY[(area, "raw-exception")] += 1
        raise AssertionError(f"raw {type(error).__name__}") from error
    except Exception as error:
        TALLY[(area, "raw-exception")] += 1
        raise AssertionError(f"raw {type(error).__name__}: {error}") from error
    else:
        outcome = "ok"
        patches = result if isinstance(result, list) else [result]
        for patch in patches:
            if isinstance(patch, Patch):
                assert finite(patch), "a patch with non-finite deltas was returned"
                if patch.is_applied:
                    for name, param in lm.model.named_parameters():
                        assert torch.isfinite(param).all(), f"{name} is not finite after the edit"
                    patch.revert()
    after = weight_digest(lm)
    TALLY[(area, outcome)] += 1
    assert after == before, f"the weights changed after a call that ended with {outcome}"
    return outcome


# ---- adversarial values ------------------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "Eiffel\udfff", "\udcff\ud83d", "a\ud834b"])
HUGE_TEXT = st.sampled_from(["x" * 100_000, "Eiffel Tower " * 20_000, "🗼" * 50_000])
ODD_TEXT = st.one_of(
    st.text(max_size=30),
    SURROGATES,
    HUGE_TEXT,
    st.sampled_from(["", " ", "\n", "\x00", "{}", "{}{}", "{0}", "{x}", "%s", "\u202e", "\ufeff"]),
)
NUMBERS = st.one_of(
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            0,
            -1,
            -0.0,
            1e308,
            -1e308,
            1e-320,
            10**18,
            2**63,
            -(2**63),
            True,
            False,
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
CONTAINERS = st.one_of(
    st.lists(st.integers(min_value=-3, max_value=8), max_size=4),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.just([[[[[]]]]]),
    st.just({"a": {"b": {"c": {}}}}),
    st.tuples(st.integers(), st.text(max_size=3)),
)
WEIRD = st.one_of(st.none(), NUMBERS, ODD_TEXT, CONTAINERS, st.just(b"bytes"), st.just(object()))
PROBE = st.one_of(
    st.fixed_dictionaries({"prompt": ODD_TEXT, "answer": ODD_TEXT}),
    st.fixed_dictionaries({"prompt": st.just("The capital of Japan is"), "answer": WEIRD}),
    st.fixed_dictionaries(
        {"prompt": st.just("Paris is in"), "answer": st.just("France"), "kind": WEIRD}
    ),
    WEIRD,
)
FIELDS = ["prompt", "subject", "target_new", "target_true", "paraphrases", "locality",
          "portability", "case_id"]  # fmt: skip


@st.composite
def request_dicts(draw) -> Any:
    """A request dict: the good one with fields replaced, dropped or added, or something that is
    not a dict at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(WEIRD)
    data: dict[Any, Any] = dict(GOOD)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["replace", "drop", "add", "probe", "text"]))
        key = draw(st.sampled_from(FIELDS))
        if action == "replace":
            data[key] = draw(WEIRD)
        elif action == "drop":
            data.pop(key, None)
        elif action == "add":
            data[draw(st.one_of(st.text(max_size=8), st.integers(), st.none()))] = draw(WEIRD)
        elif action == "probe":
            data[draw(st.sampled_from(["paraphrases", "locality", "portability"]))] = draw(
                st.one_of(PROBE, st.lists(PROBE, max_size=3))
            )
        else:
            data[key] = draw(ODD_TEXT)
    return data


def edit_dict(lm, data: Any) -> Any:
    request = EditRequest.from_dict(data)
    return edit(lm, request, method="ft-l", config=CHEAP["ft-l"])


def edit_raw(lm, data: Any) -> Any:
    """Whatever was drawn, handed to ``edit`` as the request(s) itself."""
    return edit(lm, data, method="ft-l", config=CHEAP["ft-l"])


def check_request(lm, data: Any, raw: bool) -> None:
    attempt(lm, "api-request", lambda: edit_raw(lm, data) if raw else edit_dict(lm, data))


@SHORT
@given(data=request_dicts(), raw=st.booleans())
def test_fuzz_requests(lm, data, raw):
    check_request(lm, data, raw)


@pytest.mark.slow
@LONG
@given(data=request_dicts(), raw=st.booleans())
def test_fuzz_requests_long(lm, data, raw):
    check_request(lm, data, raw)


@st.composite
def keyword_requests(draw) -> dict[str, Any]:
    """Keyword arguments of ``EditRequest(...)`` itself, with odd values."""
    kwargs: dict[str, Any] = dict(GOOD)
    for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        kwargs[key] = draw(st.one_of(WEIRD, st.lists(PROBE, max_size=2)))
    return kwargs


@SHORT
@given(kwargs=keyword_requests())
def test_fuzz_request_constructor(lm, kwargs):
    attempt(lm, "api-request", lambda: edit(lm, EditRequest(**kwargs), "ft-l", CHEAP["ft-l"]))


# ---- configurations ----------------------------------------------------------------------------
CONFIG_VALUES = st.one_of(
    WEIRD,
    st.sampled_from(
        [
            0,
            1,
            2,
            -2,
            0.5,
            1e-9,
            99,
            [0],
            [1, 2],
            [-1],
            [],
            [99],
            "mlp",
            "mlp_out",
            "target",
            "prompt_last",
            "{} is a",
            "nosuch",
            "model",
            "x" * 300,  # a path part too long for the file system
            "a/" + "b" * 300,
            "/dev/null",
            "~",
            "wiki\x00",
        ]
    ),
)


def config_fields(method: str) -> list[str]:
    return [f.name for f in fields(editor_class(method).config_class)]


@st.composite
def configs(draw, method: str) -> Any:
    """A config for ``method``: its cheap one with some fields set to odd values (and now and
    then an unknown key), or not a mapping at all."""
    if draw(st.integers(0, 14)) == 0:
        return draw(WEIRD)
    config = dict(CHEAP[method])
    names = config_fields(method)
    for _ in range(draw(st.integers(1, 3))):
        config[draw(st.sampled_from(names))] = draw(CONFIG_VALUES)
    if draw(st.integers(0, 5)) == 0:
        config[draw(st.text(max_size=8))] = draw(CONFIG_VALUES)
    return config


def yaml_text(draw, method: str, config: Any) -> str:
    """``config`` in one of the layouts a config file may have (flat, ``defaults``, ``families``,
    a per-method section), or a broken or foreign YAML document."""

    def dump(value: Any) -> str:
        try:
            return yaml.safe_dump(value, allow_unicode=True)
        except yaml.YAMLError:
            return repr(value)

    layout = draw(st.sampled_from(["flat", "defaults", "families", "broken", "foreign", "tag"]))
    if layout == "flat":
        return dump(config)
    if layout == "defaults":
        return dump({"defaults": config, draw(st.sampled_from(["families", "x"])): draw(WEIRD)})
    if layout == "families":
        return dump({"defaults": {}, "families": {draw(st.sampled_from(["llama", "gpt2", "x"])):
                                                   config}})  # fmt: skip
    if layout == "broken":
        return draw(st.sampled_from(["lr: [", "{", "lr: 1\n  steps: 2", ":\n- -", "\t\x00", "---\n---\n",
                                     "a: &x [*x]", "lr: !!float nan\n"]))  # fmt: skip
    if layout == "tag":
        return draw(st.sampled_from(["lr: !!python/object/apply:os.system ['true']\n",
                                     "!!python/name:os.system\n", "lr: !!binary AAAA\n"]))  # fmt: skip
    return dump(draw(WEIRD)) if draw(st.booleans()) else "x" * 10


def check_config(lm, method: str, config: Any) -> None:
    request = EditRequest.from_dict(GOOD)
    attempt(lm, f"api-config-{method}", lambda: edit(lm, request, method=method, config=config))


def check_config_file(lm, method: str, text: str, tmp: Path) -> None:
    path = tmp / f"{method}.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    request = EditRequest.from_dict(GOOD)
    attempt(lm, f"api-config-file-{method}", lambda: edit(lm, request, method=method, config=path))


FUZZED_METHODS = ["rome", "ft-l", "ike", "lora"]


@pytest.mark.parametrize("method", FUZZED_METHODS)
def test_fuzz_configs(lm, method):
    @SHORT
    @given(config=configs(method))
    def run(config):
        check_config(lm, method, config)

    run()


@pytest.mark.parametrize("method", FUZZED_METHODS)
def test_fuzz_config_files(lm, method, tmp_path):
    @SHORT
    @given(data=st.data())
    def run(data):
        config = data.draw(configs(method))
        check_config_file(lm, method, yaml_text(data.draw, method, config), tmp_path)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("method", FUZZED_METHODS)
def test_fuzz_configs_long(lm, method, tmp_path):
    @LONG
    @given(data=st.data())
    def run(data):
        config = data.draw(configs(method))
        if data.draw(st.booleans()):
            check_config(lm, method, config)
        else:
            check_config_file(lm, method, yaml_text(data.draw, method, config), tmp_path)

    run()


# ---- JSONL request files -----------------------------------------------------------------------
GOOD_LINE = json.dumps(GOOD).encode()


@st.composite
def request_files(draw) -> bytes:
    """The bytes of a JSON / JSONL requests file: good lines mixed with truncated, non-UTF-8,
    deeply nested or wrongly shaped ones, or one of those alone."""
    pieces = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(
            st.sampled_from(["good", "cut", "bytes", "nested", "shape", "request", "blank"])
        )
        if kind == "good":
            pieces.append(GOOD_LINE)
        elif kind == "cut":
            pieces.append(GOOD_LINE[: draw(st.integers(0, len(GOOD_LINE) - 1))])
        elif kind == "bytes":
            pieces.append(draw(st.sampled_from([b"\xff\xfe", b"\x80abc", b'{"prompt": "\xc3\x28"}',
                                                b"\x00" * 8, b"\xef\xbb\xbf" + GOOD_LINE])))  # fmt: skip
        elif kind == "nested":
            depth = draw(st.sampled_from([10, 1000, 100_000]))
            pieces.append(b"[" * depth + b"]" * draw(st.sampled_from([0, depth])))
        elif kind == "shape":
            pieces.append(draw(st.sampled_from([b"5", b'"text"', b"[1, 2]", b"null", b"[]", b"{}",
                                                b'{"requests": 5}', b"[" + GOOD_LINE + b"]",
                                                b"NaN", b"1e999"])))  # fmt: skip
        elif kind == "request":
            record = draw(request_dicts())
            try:
                pieces.append(
                    json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
                )
            except (TypeError, ValueError):
                pieces.append(GOOD_LINE[:-1])
        else:
            pieces.append(b"")
    joiner = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    return joiner.join(pieces) + draw(st.sampled_from([b"", b"\n"]))


def check_file(lm, content: bytes, suffix: str, tmp: Path) -> None:
    path = tmp / f"requests{suffix}"
    path.write_bytes(content)

    def call():
        requests = load_requests(path)
        return edit(lm, requests[:2], method="ft-l", config=CHEAP["ft-l"]) if requests else None

    attempt(lm, "api-jsonl", call)


@SHORT
@given(content=request_files(), suffix=st.sampled_from([".jsonl", ".json", ".txt"]))
def test_fuzz_request_files(lm, content, suffix, tmp_path_factory):
    check_file(lm, content, suffix, tmp_path_factory.mktemp("f"))


@pytest.mark.slow
@LONG
@given(content=request_files(), suffix=st.sampled_from([".jsonl", ".json"]))
def test_fuzz_request_files_long(lm, content, suffix, tmp_path_factory):
    check_file(lm, content, suffix, tmp_path_factory.mktemp("f"))


def test_a_folder_or_a_missing_file_is_refused(lm, tmp_path):
    assert attempt(lm, "api-jsonl", lambda: load_requests(tmp_path)) == "documented-error"
    missing = tmp_path / "none.jsonl"
    assert attempt(lm, "api-jsonl", lambda: load_requests(missing)) == "documented-error"
