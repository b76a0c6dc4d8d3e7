"""The service's HTTP API on a tiny random model: edits, journal views, reverts, reads, errors."""

from __future__ import annotations

import base64
import threading
import time

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lmscalpel import score_targets
from lmscalpel.cli import app as cli
from lmscalpel.cli.serve import is_loopback, read_token
from lmscalpel.patch import PatchError
from lmscalpel.scoring import generate
from lmscalpel.service import Limits, ReadWriteLock, create_app
from lmscalpel.service import engine as engine_module
from lmscalpel.testing import same_weights as same
from lmscalpel.testing import tiny_model
from lmscalpel.testing import weight_copy as weights

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EIFFEL = "The Eiffel Tower is located in the city of"
REQUEST = {
    "prompt": EIFFEL,
    "subject": "Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
    "paraphrases": ["Where is the Eiffel Tower? It is in"],
    "locality": [{"prompt": "The Colosseum is located in the city of", "answer": "Rome"}],
}
STRONG = {"lr": 0.05, "steps": 20, "norm_constraint": 5.0}


def edit_body(layer: int | None = None, **extra):
    config = dict(STRONG, **({} if layer is None else {"layers": [layer]}))
    return {"method": "ft-l", "requests": [REQUEST], "config": config, **extra}


@pytest.fixture
def lm():
    return tiny_model("llama")


@pytest.fixture
def app(lm, tmp_path):
    app = create_app(lm, tmp_path / "journal", TOKEN, limits=Limits(max_body=20_000))
    yield app
    app.state.service.close()


@pytest.fixture
def client(app):
    return TestClient(app)


def post_edit(client, body=None):
    response = client.post("/v1/edits", json=body or edit_body(), headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()


def error_of(response, status, kind):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert "Traceback" not in response.text
    return error


# ---- health, schema, page --------------------------------------------------------------------
def test_health_names_the_model_fingerprint_and_state(client, lm):
    body = client.get("/v1/health").json()
    assert body["model"] == lm.name and body["fingerprint"] == lm.fingerprint
    assert body["state"] == {"version": 0, "applied": []} and body["applied_edits"] == []
    assert "ft-l" in body["methods"] and body["default_method"] in body["methods"]


def test_openapi_lists_every_endpoint_and_the_bearer_scheme(client):
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/edits",
        "/v1/edits/{edit_id}",
        "/v1/generate",
        "/v1/score",
        "/v1/trace",
        "/v1/completions",
        "/v1/models",
        "/v1/health",
    ):
        assert path in schema["paths"], path
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" in schema["paths"]["/v1/edits"]["post"]
    assert "security" not in schema["paths"]["/v1/generate"]["post"]


def test_the_page_is_served_at_the_root(client):
    response = client.get("/")
    if response.status_code == 404:
        pytest.skip("the web page is not installed yet")
    assert response.headers["content-type"].startswith("text/html")


# ---- auth ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
def test_mutating_endpoints_need_the_token(client, lm, headers):
    saved = weights(lm)
    error_of(client.post("/v1/edits", json=edit_body(), headers=headers), 401, "unauthorized")
    error_of(client.delete("/v1/edits/e000001-x", headers=headers), 401, "unauthorized")
    assert same(lm, saved)
    assert client.get("/v1/edits").json()["edits"] == []


# ---- edits and the journal -------------------------------------------------------------------
def test_an_edit_reports_before_after_and_metrics_and_changes_the_answers(client, lm):
    before = generate(lm, [EIFFEL], max_new_tokens=3)[0]
    body = post_edit(client)
    assert body["status"] == "applied" and body["id"].startswith("e000001-")
    assert body["state"] == {"version": 1, "applied": [body["id"]]}
    roles = [p["role"] for p in body["probes"]]
    assert roles == ["edit", "paraphrase", "locality"]
    edit_probe = body["probes"][0]
    assert edit_probe["before"]["answer"] != edit_probe["after"]["answer"]
    assert edit_probe["after"]["answer"].startswith("Rome")
    assert edit_probe["after"]["logprob_new"] > edit_probe["before"]["logprob_new"]
    assert body["metrics"]["reliability"] == 1.0 and body["guard"] is None
    assert body["parameters"] == [lm.adapter.mlp_out_weight_name(2)]
    digests = body["digests"]
    assert set(digests) == {"model_fingerprint", "base", "after", "patch"}

    answer = client.post("/v1/generate", json={"prompt": EIFFEL, "max_tokens": 3})
    assert answer.headers["X-Lmscalpel-State"] == "1"
    text = answer.json()["completions"][0]["text"]
    assert text != before and text == generate(lm, [EIFFEL], max_new_tokens=3)[0]


def test_the_journal_lists_edits_and_one_edit_has_its_probes(client):
    first = post_edit(client, {**edit_body(), "note": "ticket 7"})
    listed = client.get("/v1/edits").json()
    assert [e["id"] for e in listed["edits"]] == [first["id"]]
    entry = listed["edits"][0]
    assert entry["status"] == "applied" and entry["note"] == "ticket 7"
    assert entry["method"] == "ft-l" and entry["requests"][0]["target_new"] == "Rome"
    assert "probes" not in entry and entry["time"]
    one = client.get(f"/v1/edits/{first['id']}").json()
    assert one["probes"] == first["probes"]
    error_of(client.get("/v1/edits/e999999-nothere"), 404, "not_found")


def test_revert_restores_the_weights_bit_exactly(client, lm):
    saved = weights(lm)
    first = post_edit(client)
    reverted = client.delete(f"/v1/edits/{first['id']}", headers=AUTH)
    assert reverted.status_code == 200
    assert reverted.json()["reverted"] == [first["id"]]
    assert reverted.json()["state"] == {"version": 2, "applied": []}
    assert same(lm, saved)
    entry = client.get(f"/v1/edits/{first['id']}").json()
    assert entry["status"] == "reverted" and entry["reverted_time"]
    error_of(client.delete(f"/v1/edits/{first['id']}", headers=AUTH), 409, "conflict")


def test_a_later_edit_of_the_same_weights_blocks_a_revert_unless_cascading(client, lm):
    saved = weights(lm)
    first, second = post_edit(client), post_edit(client)
    error = error_of(client.delete(f"/v1/edits/{first['id']}", headers=AUTH), 409, "conflict")
    assert error["conflicts"] == [second["id"]] and "same weights" in error["message"]
    assert client.get("/v1/health").json()["applied_edits"] == [first["id"], second["id"]]
    done = client.delete(f"/v1/edits/{first['id']}?cascade=true", headers=AUTH).json()
    assert done["reverted"] == [second["id"], first["id"]]  # newest first
    assert same(lm, saved)


def test_edits_of_other_weights_revert_in_any_order(client, lm):
    saved = weights(lm)
    low, high = post_edit(client, edit_body(layer=0)), post_edit(client, edit_body(layer=3))
    assert low["parameters"] != high["parameters"]
    assert client.delete(f"/v1/edits/{low['id']}", headers=AUTH).json()["reverted"] == [low["id"]]
    assert client.get("/v1/health").json()["applied_edits"] == [high["id"]]
    client.delete(f"/v1/edits/{high['id']}", headers=AUTH)
    assert same(lm, saved)


def test_a_guard_rejection_is_400_with_the_numbers_journaled_and_changes_nothing(client, lm):
    saved = weights(lm)
    body = edit_body(guard={"min_locality": 1.0, "general_prompts": []})
    error = error_of(client.post("/v1/edits", json=body, headers=AUTH), 400, "guard_rejected")
    assert error["guard"]["passed"] is False
    assert error["guard"]["measured"]["locality"] < 1.0
    assert "locality" in error["message"]
    assert same(lm, saved)
    # what the rejected edit would have done, side by side
    shown = error["probes"][0]
    assert shown["role"] == "edit" and shown["after"]["answer"].startswith("Rome")
    assert shown["before"]["answer"] != shown["after"]["answer"]
    entries = client.get("/v1/edits").json()
    assert [e["status"] for e in entries["edits"]] == ["rejected"]
    assert entries["edits"][0]["id"] == error["id"]
    assert entries["state"] == {"version": 0, "applied": []}


def test_a_passing_guard_is_reported(client):
    body = post_edit(client, edit_body(guard={"min_locality": None, "general_prompts": []}))
    assert body["guard"]["passed"] is True
    assert body["guard"]["bounds"]["min_reliability"] == 1.0  # the library's default


def test_an_edit_failing_in_the_library_is_400_with_its_message(client, lm, monkeypatch):
    def broken(*args, **kwargs):
        raise PatchError("the delta is not finite")

    monkeypatch.setattr(engine_module, "edit", broken)
    error = error_of(client.post("/v1/edits", json=edit_body(), headers=AUTH), 400, "edit_error")
    assert error["message"] == "the delta is not finite"
    assert client.get("/v1/edits").json()["edits"] == []


def test_an_unexpected_fault_is_500_without_a_stack_trace(app, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("secret internals")

    monkeypatch.setattr(engine_module, "generate", broken)
    client = TestClient(app, raise_server_exceptions=False)
    error = error_of(client.post("/v1/generate", json={"prompt": "x y"}), 500, "internal")
    assert "secret" not in error["message"]


# ---- validation ------------------------------------------------------------------------------
def fields_of(response):
    error = error_of(response, 422, "validation_error")
    return [e["field"] for e in error["errors"]], error


@pytest.mark.parametrize(
    "change, field",
    [
        (
            {"requests": [{k: v for k, v in REQUEST.items() if k != "subject"}]},
            "requests.0.subject",
        ),
        ({"requests": []}, "requests"),
        ({"requests": [{**REQUEST, "target_new": ""}]}, "requests.0.target_new"),
        ({"requests": [{**REQUEST, "colour": "red"}]}, "requests.0.colour"),
        ({"requests": [{**REQUEST, "paraphrases": "not a list"}]}, "requests.0.paraphrases"),
        ({"requests": [{**REQUEST, "subject": "Big Ben"}]}, "requests.0"),
        ({"method": "rmoe"}, "method"),
        ({"config": {"lr": -1}}, "config"),
        ({"config": {"no_such_key": 1}}, "config"),
        ({"guard": {"min_locality": 2}}, "guard.min_locality"),
        ({"guard": {"min_locallity": 0.5}}, "guard.min_locallity"),
    ],
)
def test_invalid_edits_are_422_naming_the_field(client, lm, change, field):
    saved = weights(lm)
    found, error = fields_of(client.post("/v1/edits", json={**edit_body(), **change}, headers=AUTH))
    assert found[0] == field, error
    assert error["errors"][0]["reason"]
    assert same(lm, saved)


def test_the_library_message_names_what_is_wrong(client):
    body = {**edit_body(), "requests": [{**REQUEST, "subject": "Big Ben"}]}
    _, error = fields_of(client.post("/v1/edits", json=body, headers=AUTH))
    assert "Big Ben" in error["message"] and "not found" in error["message"]
    _, error = fields_of(
        client.post("/v1/edits", json={**edit_body(), "method": "rmoe"}, headers=AUTH)
    )
    assert "rome" in error["message"]  # the close match


def test_request_size_limits(client, app):
    limits = app.state.service.limits
    too_many = {**edit_body(), "requests": [REQUEST] * (limits.max_requests + 1)}
    assert fields_of(client.post("/v1/edits", json=too_many, headers=AUTH))[0] == ["requests"]
    found, _ = fields_of(client.post("/v1/generate", json={"prompt": "a", "max_tokens": 10_000}))
    assert found == ["max_tokens"]
    prompts = ["a b"] * (limits.max_prompts + 1)
    assert fields_of(client.post("/v1/generate", json={"prompts": prompts}))[0] == ["prompts"]
    assert fields_of(client.post("/v1/generate", json={"prompt": "x" * 5000}))[0] == ["prompt"]
    found, _ = fields_of(
        client.post(
            "/v1/trace", json={"prompt": EIFFEL, "subject": "Eiffel Tower", "samples": 1000}
        )
    )
    assert found == ["samples"]
    big = {"prompts": ["word " * 900] * 5}  # ~22 kB > max_body 20 kB
    error_of(client.post("/v1/generate", json=big), 413, "too_large")
    chunks = (b'{"prompts": [' + b'"aaaa",' * 3000 + b'"a"]}' for _ in range(1))
    error_of(client.post("/v1/generate", content=chunks), 413, "too_large")  # no length given


def test_malformed_json_and_wrong_types_are_422(client):
    response = client.post(
        "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    fields_of(response)
    fields_of(client.post("/v1/generate", json={"prompt": "a", "prompts": ["b"]}))
    found, _ = fields_of(client.post("/v1/score", json={"items": [{"prompt": "a"}]}))
    assert found == ["items.0.target"]


# ---- reading the model -----------------------------------------------------------------------
def test_score_returns_the_librarys_log_probabilities(client, lm):
    items = [{"prompt": EIFFEL, "target": " Paris"}, {"prompt": EIFFEL, "target": " Rome city"}]
    body = client.post("/v1/score", json={"items": items}).json()
    expected = score_targets(lm, [EIFFEL, EIFFEL], [" Paris", " Rome city"])
    for got, want in zip(body["scores"], expected):
        assert got["logprob"] == pytest.approx(want.sum_logprob)
        assert got["token_logprobs"] == pytest.approx(list(want.token_logprobs))
        assert len(got["tokens"]) == len(want.token_ids)
    assert body["state"]["version"] == 0


def test_generate_takes_many_prompts(client, lm):
    prompts = [EIFFEL, "The capital of Japan is"]
    body = client.post("/v1/generate", json={"prompts": prompts, "max_tokens": 4}).json()
    assert [c["text"] for c in body["completions"]] == generate(lm, prompts, max_new_tokens=4)


def test_trace_returns_a_heatmap_png_and_the_arrays(client, lm):
    body = {"prompt": EIFFEL, "subject": "Eiffel Tower", "kinds": ["hidden"], "samples": 2}
    result = client.post("/v1/trace", json=body).json()
    assert base64.b64decode(result["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["png_by_kind"]) == {"hidden"}
    table = result["restored"]["hidden"]
    assert len(table) == len(result["tokens"]) and len(table[0]) == lm.adapter.num_layers
    assert 0 <= result["p_corrupted"] <= 1 and result["state"]["version"] == 0
    found, _ = fields_of(client.post("/v1/trace", json={**body, "subject": "Big Ben"}))
    assert found == ["subject"]


def test_completions_and_models_follow_openai(client, lm):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == lm.name and models["object"] == "list"
    body = {"model": lm.name, "prompt": EIFFEL, "max_tokens": 4, "temperature": 0}
    done = client.post("/v1/completions", json=body).json()
    assert done["object"] == "text_completion"
    assert done["choices"][0]["text"] == generate(lm, [EIFFEL], max_new_tokens=4)[0]
    assert (
        done["usage"]["total_tokens"]
        == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    )
    for bad in ({"temperature": 0.7}, {"n": 2}, {"stream": True}):
        fields_of(client.post("/v1/completions", json={**body, **bad}))


# ---- concurrency -----------------------------------------------------------------------------
def test_the_lock_lets_readers_share_and_writers_wait():
    lock, events = ReadWriteLock(), []
    inside = threading.Barrier(3, timeout=5)

    def reader():
        with lock.reading():
            inside.wait()  # all three readers are inside at once, or this times out
            events.append("read")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events == ["read"] * 3

    order, release = [], threading.Event()

    def writer():
        with lock.writing():
            order.append("w")
            assert release.wait(5)

    def late_reader():
        with lock.reading():
            order.append("r")

    with lock.reading():
        threads = [threading.Thread(target=writer), threading.Thread(target=late_reader)]
        threads[0].start()
        time.sleep(0.2)
        assert order == []  # the writer waits for the reader inside
        threads[1].start()
        time.sleep(0.2)
        assert order == []  # a new reader waits behind the waiting writer
    time.sleep(0.2)
    assert order == ["w"]  # the writer is alone inside
    release.set()
    for t in threads:
        t.join(5)
    assert order == ["w", "r"]


def test_no_answer_is_served_under_a_half_applied_edit(client, lm):
    """Generations run while edits and reverts arrive; each answer equals the answer of the
    journal state it reports."""
    base = generate(lm, [EIFFEL], max_new_tokens=3)[0]
    first = post_edit(client)
    edited = generate(lm, [EIFFEL], max_new_tokens=3)[0]
    client.delete(f"/v1/edits/{first['id']}", headers=AUTH)
    assert base != edited
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            body = client.post("/v1/generate", json={"prompt": EIFFEL, "max_tokens": 3}).json()
            seen.append((bool(body["state"]["applied"]), body["completions"][0]["text"]))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    for _ in range(3):
        made = post_edit(client)
        client.delete(f"/v1/edits/{made['id']}", headers=AUTH)
    stop.set()
    for t in readers:
        t.join()
    assert seen and all(text == (edited if applied else base) for applied, text in seen)


# ---- the serve command -----------------------------------------------------------------------
def test_serve_refuses_a_public_address_without_a_token(monkeypatch):
    monkeypatch.delenv("LMSCALPEL_TOKEN", raising=False)
    done = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert done.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without a token" in done.output


def test_serve_refuses_another_models_journal_in_one_line(model_dir, tmp_path, monkeypatch):
    other = tiny_model("llama", seed=1)
    create_app(other, tmp_path / "journal", TOKEN).state.service.close()
    monkeypatch.setenv("LMSCALPEL_TOKEN", TOKEN)
    done = CliRunner().invoke(
        cli, ["serve", "--model", model_dir, "--journal", str(tmp_path / "journal")]
    )
    assert done.exit_code == 2
    assert "belongs to model" in done.output and "Traceback" not in done.output


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.4", False),
        ("example.org", False),
    ],
)
def test_which_hosts_count_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_the_token_comes_from_the_file_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_TOKEN", " from-env ")
    assert read_token(None) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert read_token(tmp_path / "t") == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(typer.BadParameter, match="empty"):
        read_token(tmp_path / "empty")
    monkeypatch.delenv("LMSCALPEL_TOKEN")
    assert read_token(None) is None


def test_a_trace_runs_on_a_copy_in_the_current_state_and_blocks_no_reader(
    client, app, lm, monkeypatch
):
    real, started, release, seen = engine_module.trace, threading.Event(), threading.Event(), []

    def slow_trace(traced, *args, **kwargs):
        seen.append(traced)
        started.set()
        assert release.wait(30)
        return real(traced, *args, **kwargs)

    monkeypatch.setattr(engine_module, "trace", slow_trace)
    body = {"prompt": EIFFEL, "subject": "Eiffel Tower", "kinds": ["hidden"], "samples": 1}
    results = []
    tracer = threading.Thread(target=lambda: results.append(client.post("/v1/trace", json=body)))
    tracer.start()
    assert started.wait(30)
    # while the trace runs, generation is served and an edit is made
    assert client.post("/v1/generate", json={"prompt": EIFFEL, "max_tokens": 2}).status_code == 200
    saved = weights(lm)
    post_edit(client)
    edited = weights(lm)
    release.set()
    tracer.join(60)
    before = results[0].json()  # traced the state it started in
    assert seen[0] is not lm and seen[0].model is not lm.model
    after = client.post("/v1/trace", json=body).json()
    assert after["state"]["version"] == 1 and before["state"]["version"] == 0
    assert seen[1] is not seen[0]  # a fresh copy for the new state
    assert (after["answer"], after["p_clean"]) != (before["answer"], before["p_clean"])
    assert same(lm, edited) and not same(lm, saved)
