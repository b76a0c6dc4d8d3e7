"""``kill -9`` of a real ``lmscalpel serve`` at random moments while edits and reverts arrive:
after a restart no acknowledged edit or revert is lost and nothing is half-applied.

Each round starts the server on the same journal, sends edits (and cascading reverts) until a
timer kills the process with SIGKILL, and restarts it: the journal must hold every acknowledged
operation, the server's state must equal the journal's, no leftover of the killed writer may
remain, and the model must answer exactly as a fresh model replaying the journal in-process.
The default suite kills twice; the slow suite many times.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmscalpel.models import load_model
from lmscalpel.scoring import generate
from lmscalpel.service import EditingService

TOKEN = "kill-test-token"
CITIES = ["Rome", "Paris", "Tokyo", "Berlin", "Madrid", "Vienna", "Lisbon", "Athens", "London"]
FACTS = [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("The Colosseum is located in the city of", "Colosseum"),
    ("The capital of Japan is", "Japan"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
]
PROBES = [prompt for prompt, _ in FACTS] + ["Apple was founded by"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", body: dict | None = None, timeout: float = 60):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Server:
    def __init__(self, model_dir: str, journal: Path, token_file: Path, log: Path) -> None:
        self.lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-c",
            "from lmscalpel.cli import main; main()",
            "serve",
            "--model",
            model_dir,
            "--journal",
            str(journal),
            "--port",
            str(self.port),
            "--token-file",
            str(token_file),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(log, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if call(f"{self.url}/v1/health", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server (idempotent: the timer thread and the test may both call it)."""
        with self.lock:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
            self.log.close()


def run_until_killed(server: Server, rng: random.Random, kill_after: float):
    """Send edits and reverts until the server dies; returns (acknowledged edits, acknowledged
    reverts as lists of reverted ids, ids a revert may have touched when the server died)."""
    acked_edits: list[str] = []
    acked_reverts: list[list[str]] = []
    applied: list[str] = call(f"{server.url}/v1/health")[1]["applied_edits"]
    timer = threading.Timer(kill_after, server.kill)
    timer.start()
    in_doubt: list[str] = []
    try:
        while True:
            in_doubt = []
            try:
                if applied and rng.random() < 0.3:
                    target = rng.choice(applied)
                    in_doubt = list(applied)  # a cascade may revert any later one
                    status, body = call(
                        f"{server.url}/v1/edits/{target}?cascade=true", method="DELETE"
                    )
                    assert status == 200, body
                    acked_reverts.append(body["reverted"])
                    applied = body["state"]["applied"]
                else:
                    prompt, subject = rng.choice(FACTS)
                    request = {
                        "prompt": prompt,
                        "subject": subject,
                        "target_new": rng.choice(CITIES),
                    }
                    config = {"lr": 0.05, "steps": 5, "layers": [rng.randrange(4)]}
                    body = {"method": "ft-l", "requests": [request], "config": config}
                    status, body = call(f"{server.url}/v1/edits", method="POST", body=body)
                    assert status == 201, body
                    acked_edits.append(body["id"])
                    applied = body["state"]["applied"]
            except (OSError, http.client.HTTPException, json.JSONDecodeError):  # the server died
                break
    finally:
        timer.cancel()
        server.kill()
    return acked_edits, acked_reverts, in_doubt


def check_after_restart(server: Server, journal: Path, acked_edits, acked_reverts, in_doubt):
    status, listed = call(f"{server.url}/v1/edits")
    assert status == 200
    by_id = {e["id"]: e for e in listed["edits"]}
    reverted = {i for ids in acked_reverts for i in ids}
    for edit_id in acked_edits:
        assert edit_id in by_id, f"acknowledged edit {edit_id} was lost"
        wanted = "reverted" if edit_id in reverted else "applied"
        if edit_id not in reverted and edit_id in in_doubt:
            assert by_id[edit_id]["status"] in ("applied", "reverted")
        else:
            assert by_id[edit_id]["status"] == wanted, (edit_id, by_id[edit_id]["status"])
    health = call(f"{server.url}/v1/health")[1]
    assert health["applied_edits"] == [e["id"] for e in listed["edits"] if e["status"] == "applied"]
    # nothing half-written is left: one patch folder per applied or reverted edit, no temp files
    kept = {e["id"] for e in listed["edits"] if e["status"] in ("applied", "reverted")}
    assert {p.name for p in (journal / "patches").iterdir()} == kept
    assert not [p for p in (journal / "entries").iterdir() if p.name.startswith(".")]


def answers(server: Server) -> list[str]:
    body = {"prompts": PROBES, "max_tokens": 4}
    return [c["text"] for c in call(f"{server.url}/v1/generate", "POST", body)[1]["completions"]]


def leftovers(journal: Path) -> dict[str, int]:
    """What a killed server left behind: patch folders without an entry, temporary files."""
    ids = {json.loads(p.read_text()).get("id") for p in (journal / "entries").glob("[0-9]*.json")}
    ids.discard(None)
    patches = list((journal / "patches").iterdir())
    return {
        "orphan_patches": sum(1 for p in patches if p.name[0] != "." and p.name not in ids),
        "temporary_files": sum(1 for p in (journal / "entries").iterdir() if p.name[0] == ".")
        + sum(1 for p in patches if p.name[0] == "."),
    }


def campaign(tmp_path: Path, model_dir: str, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    journal, token_file, log = tmp_path / "journal", tmp_path / "token", tmp_path / "server.log"
    token_file.write_text(TOKEN + "\n")
    stats = {
        "kills": 0,
        "acked_edits": 0,
        "acked_reverts": 0,
        "orphan_patches": 0,
        "temporary_files": 0,
    }
    server = Server(model_dir, journal, token_file, log)
    for _ in range(kills):
        done = run_until_killed(server, rng, kill_after=rng.uniform(0.3, 4.0))
        stats["kills"] += 1
        stats["acked_edits"] += len(done[0])
        stats["acked_reverts"] += len(done[1])
        for key, value in leftovers(journal).items():
            stats[key] += value
        server = Server(model_dir, journal, token_file, log)
        check_after_restart(server, journal, *done)
    served = answers(server)
    server.kill()
    # the same journal replayed in-process onto a freshly loaded model answers the same
    copy = tmp_path / "copy"
    shutil.copytree(journal, copy, ignore=shutil.ignore_patterns("lock"))
    service = EditingService(load_model(model_dir), copy)
    assert generate(service.lm, PROBES, max_new_tokens=4) == served
    service.close()
    return stats


def test_kill_9_during_edits_loses_nothing_acknowledged(tmp_path, model_dir):
    stats = campaign(tmp_path, model_dir, kills=2, seed=int(time.time()) % 1000)
    assert stats["acked_edits"] >= 1  # something was acknowledged before the kills


@pytest.mark.slow
def test_many_kills_during_edits_lose_nothing_acknowledged(tmp_path, model_dir, record_property):
    seed = int(time.time()) % 1000
    stats = campaign(tmp_path, model_dir, kills=20, seed=seed)
    record_property("kill_campaign", json.dumps({"seed": seed, **stats}))
    print("kill campaign:", json.dumps({"seed": seed, **stats}))
    assert stats["acked_edits"] >= 20, (seed, stats)
