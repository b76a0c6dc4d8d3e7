"""The unmodified ``openai`` client talks to a real uvicorn server of the service, and sees edits."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import openai
import pytest
import uvicorn

from lmscalpel.scoring import generate
from lmscalpel.service import create_app
from lmscalpel.testing import tiny_model

TOKEN = "openai-test-token"
EIFFEL = "The Eiffel Tower is located in the city of"


def post(url: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    lm = tiny_model("llama")
    app = create_app(lm, tmp_path / "journal", TOKEN)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield lm, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    app.state.service.close()


def test_the_openai_client_lists_models_and_completes_greedily(served):
    lm, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list()] == [lm.name]
    done = client.completions.create(model=lm.name, prompt=EIFFEL, max_tokens=4, temperature=0)
    assert done.choices[0].text == generate(lm, [EIFFEL], max_new_tokens=4)[0]
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens >= 1
    before = done.choices[0].text

    request = {"prompt": EIFFEL, "subject": "Eiffel Tower", "target_new": "Rome"}
    body = {
        "method": "ft-l",
        "requests": [request],
        "config": {"lr": 0.05, "steps": 20, "norm_constraint": 5.0},
    }
    status, _ = post(f"{url}/v1/edits", body)
    assert status == 201
    after = client.completions.create(model=lm.name, prompt=EIFFEL, max_tokens=4, temperature=0)
    assert after.choices[0].text != before and after.choices[0].text.startswith(" Rome")

    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=lm.name, prompt=EIFFEL, max_tokens=4, temperature=0.8)
