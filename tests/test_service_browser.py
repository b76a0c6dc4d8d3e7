"""The service's web page end to end in headless Chromium (issue 14, item 5).

A real ``lmscalpel serve`` on the embedded SmolLM2 (a subprocess on a free loopback port, with a
journal in a temporary folder), driven by Playwright: load the page, ask the model, make the edit
"The Eiffel Tower is located in the city of" -> " Rome" with ROME, see the new answer, revert it
from the journal, see the old answer again; a causal trace is drawn as a heatmap. Screenshots go
to ``$LMSCALPEL_ARTIFACTS/browser`` (default: a pytest temporary folder); the path is printed.

Needs Debian's Chromium at /usr/bin/chromium (``.ci/run`` installs it) and the ``playwright``
Python package (its own browser download is not used).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real]

SERVE = "from lmscalpel.cli import main; main()"  # `lmscalpel` of this interpreter

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EIFFEL = "The Eiffel Tower is located in the city of"
START_SECONDS = 300  # the first start converts the embedded model (about a minute)
EDIT_MS = 180_000  # ROME's statistics are computed once per model, then cached
TRACE_MS = 240_000

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed (.ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_until_up(process: subprocess.Popen, url: str, log: Path) -> dict:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"lmscalpel serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            return get_json(f"{url}/v1/health")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"lmscalpel serve did not answer within {START_SECONDS} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("LMSCALPEL_ARTIFACTS")
    folder = Path(root) / "browser" if root else tmp_path_factory.mktemp("browser")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser test screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifacts):
    """(base URL, token) of a real ``lmscalpel serve`` on the embedded model."""
    folder = tmp_path_factory.mktemp("serve")
    token = secrets.token_urlsafe(16)
    token_file = folder / "token"
    token_file.write_text(token + "\n")
    port = free_port()
    log = artifacts / "server.log"
    command = [sys.executable, "-c", SERVE, "serve", "--port", str(port)]
    command += ["--journal", str(folder / "journal"), "--token-file", str(token_file)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url, log)
        yield url, token
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request):
    """A fresh page (own session storage) that fails the test on any script error (HTTP error
    statuses, which the tests provoke, are the page's to show, not script errors)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if message.type == "error" and "Failed to load resource" not in message.text
            else None
        ),
    )
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def open_page(page, url: str, token: str | None = None) -> None:
    page.goto(f"{url}/" + (f"#token={token}" if token else ""))
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)


def ask(page, prompt: str) -> str:
    """Generate from the page's "Ask" form; the answer shown."""
    answers = int(page.locator("#ask-answer").get_attribute("data-count") or 0)
    page.fill("#ask-prompt", prompt)
    page.click("#ask-submit")
    expect(page.locator("#ask-answer")).to_have_attribute(
        "data-count", str(answers + 1), timeout=60_000
    )
    return page.inner_text("#ask-answer-text")


def test_page_edits_and_reverts(server, page, artifacts):
    url, token = server
    open_page(page, url, token)
    expect(page.locator("#health-model")).not_to_be_empty()
    assert "#token" not in page.url  # the token leaves the address bar
    before = ask(page, EIFFEL)
    assert "Paris" in before
    page.screenshot(path=artifacts / "01-before.png", full_page=True)

    # the form starts with the demo edit: Eiffel Tower -> Rome, with a paraphrase and a neighbour
    page.select_option("#edit-method", "rome")
    page.fill("#edit-note", "browser test")
    page.click("#edit-submit")
    expect(page.locator("#result-status")).to_have_text("applied", timeout=EDIT_MS)
    edit_row = page.locator('#result-table tbody tr[data-role="edit"]')
    expect(edit_row.locator('td[data-col="before"]')).to_contain_text("Paris")
    expect(edit_row.locator('td[data-col="after"]')).to_contain_text("Rome")
    expect(page.locator('[data-metric="reliability"]')).to_have_text("1.000")
    edit_id = page.inner_text("#result-id")
    expect(page.locator("#health-applied")).to_have_text("1")
    page.screenshot(path=artifacts / "02-edited.png", full_page=True)

    after = ask(page, EIFFEL)
    assert "Rome" in after
    assert page.inner_text("#ask-state").startswith("answered under journal state")
    page.screenshot(path=artifacts / "03-after.png", full_page=True)

    row = page.locator(f'#journal-table tr[data-edit-id="{edit_id}"]')
    expect(row).to_have_attribute("data-status", "applied")
    page.get_by_role("button", name=f"Revert edit {edit_id}").click()
    expect(row).to_have_attribute("data-status", "reverted", timeout=60_000)
    expect(page.locator("#health-applied")).to_have_text("0")
    page.screenshot(path=artifacts / "04-reverted.png", full_page=True)

    page.click(f"#view-{edit_id}")  # the journal keeps the edit's before/after and digests
    expect(page.locator("#result-status")).to_have_text("reverted")
    expect(page.locator("#result-digests")).to_contain_text("weight matrix")
    assert ask(page, EIFFEL) == before  # the weights are restored bit-exactly
    page.screenshot(path=artifacts / "05-old-answer.png", full_page=True)


def test_guard_rolls_back_a_weak_edit(server, page, artifacts):
    """One step of FT-L does not make the model say the new target: the guard (on in the form)
    rolls the edit back, the page says why, the journal records it as rejected."""
    url, token = server
    open_page(page, url, token)
    before = ask(page, "The Colosseum is located in the city of")
    page.fill("#edit-prompt", "The Colosseum is located in the city of")
    page.fill("#edit-subject", "Colosseum")
    page.fill("#edit-target-new", "London")
    page.fill("#edit-target-true", "")
    page.fill("#edit-paraphrases", "")
    page.fill("#edit-locality", "")
    page.select_option("#edit-method", "ft-l")
    page.fill("#edit-config", '{"steps": 1}')
    page.select_option("#edit-guard", "on")
    page.click("#edit-submit")
    expect(page.locator("#result-status")).to_have_text("rejected", timeout=EDIT_MS)
    expect(page.locator("#result-guard")).to_contain_text("reliability")
    expect(page.locator("#edit-status")).to_have_class("status error")
    expect(page.locator("#journal-table tbody tr").last).to_have_attribute(
        "data-status", "rejected"
    )
    page.screenshot(path=artifacts / "07-guard-rejected.png", full_page=True)
    assert ask(page, "The Colosseum is located in the city of") == before


def test_edit_without_token_is_refused(server, page):
    url, _ = server
    open_page(page, url)
    page.click("#edit-submit")
    expect(page.locator("#edit-status")).to_have_class("status error", timeout=30_000)
    expect(page.locator("#edit-status")).to_contain_text("token")
    health = get_json(f"{url}/v1/health")
    assert health["state"]["applied"] == []  # nothing was applied


def test_page_draws_a_causal_trace(server, page, artifacts):
    url, _ = server
    open_page(page, url)
    page.select_option("#trace-kind", "hidden")
    page.fill("#trace-samples", "2")
    page.click("#trace-submit")
    expect(page.locator("#trace-answer")).to_contain_text("Paris", timeout=TRACE_MS)
    canvas = page.locator("#trace-canvas")
    assert int(canvas.get_attribute("data-rows")) >= 8  # one row per prompt token
    assert int(canvas.get_attribute("data-cols")) == 30  # SmolLM2-135M's layers
    expect(canvas).to_have_attribute(
        "aria-label", re.compile(r"^Causal trace heatmap of \d+ tokens")
    )
    page.screenshot(path=artifacts / "06-trace.png", full_page=True)
