"""Load test of the live editing service (issue 14, item 6): generation latency while edits land.

A real ``lmscalpel serve`` (a subprocess on a free loopback port, journal in a temporary folder)
on the embedded SmolLM2-135M by default. ``--clients`` (8) clients each send greedy
``POST /v1/generate`` requests back to back (one prompt each, ``--max-tokens`` new tokens), first
alone (``--quiet-requests`` per client: latency without edits), then while one editor sends
``--edits`` (20) ROME edits of CounterFact cases and ``--reverts`` (10) reverts (latency with
concurrent edits). The edits and reverts alternate as edit, edit, revert; a revert takes back the
newest applied edit (ROME edits of one layer touch the same matrix, so the service refuses to
revert an older one under a newer: that is a 409, counted as an error here).

Every generate response names the journal state it was served under (``state.version`` and the
applied edit ids). After the server stops, the journal is replayed in this process on a freshly
loaded model: at each version the answers to the prompts served under it are recomputed, and
every served answer must equal its version's recomputed one (and the applied ids must be those
of the journal at that version).

Bounded: the edit phase stops sending mutations after ``--time-limit`` seconds (what was sent is
reported); the clients stop when the editor is done. Loopback only.

    nice -n 10 .venv/bin/python benchmarks/service_load.py
    .venv/bin/python benchmarks/service_load.py --model tiny --out /tmp/load.json   # smoke run

``--model tiny`` serves a tiny random Llama (saved as a Hugging Face folder) and edits it with FT-L:
the mechanics in seconds, no meaning.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lmscalpel as ls
from lmscalpel.patch import Patch
from lmscalpel.service.journal import Journal
from lmscalpel.testing import tiny_model
from records import machine, run_header

ROOT = Path(__file__).resolve().parents[1]
SERVE = "from lmscalpel.cli import main; main()"  # `lmscalpel` of this interpreter
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "edit.json"
GENERAL_PROMPTS = ("The capital of France is", "The largest planet in the solar system is")
"""Asked besides the edited prompts (whose answers change from state to state)."""


# ---------------------------------------------------------------------------------- HTTP


class Client:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int, token: str | None = None, timeout: float = 600) -> None:
        self.port, self.token, self.timeout = port, token, timeout
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        payload = None if body is None else json.dumps(body)
        for attempt in range(2):  # a keep-alive connection the server closed: reconnect once
            try:
                self.connection.request(method, path, body=payload, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
                return response.status, json.loads(data) if data else {}
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                self.connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=self.timeout
                )
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connection.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, folder: Path, token: str) -> tuple[subprocess.Popen, int]:
    token_file = folder / "token"
    token_file.write_text(token + "\n")
    port = free_port()
    command = [sys.executable, "-c", SERVE, "serve", "--port", str(port)]
    command += ["--journal", str(folder / "journal"), "--token-file", str(token_file)]
    if model:
        command += ["--model", model]
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{(folder / 'server.log').read_text()}")
        try:
            status, _ = Client(port, timeout=5).call("GET", "/v1/health")
            if status == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start within 600 s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------- load


@dataclass
class Sample:
    """One generate request as a client saw it."""

    phase: str
    client: int
    prompt: str
    started: float
    seconds: float
    status: int
    text: str | None = None
    version: int | None = None
    applied: tuple[str, ...] | None = None
    error: str | None = None


@dataclass
class Mutation:
    kind: str  # "edit" or "revert"
    started: float
    seconds: float
    status: int
    edit_id: str | None = None
    error: str | None = None


@dataclass
class Log:
    samples: list[Sample] = field(default_factory=list)
    mutations: list[Mutation] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, item: Sample | Mutation) -> None:
        with self.lock:
            (self.samples if isinstance(item, Sample) else self.mutations).append(item)


def generate_once(client: Client, phase: str, index: int, prompt: str, max_tokens: int) -> Sample:
    started = time.perf_counter()
    try:
        status, body = client.call(
            "POST", "/v1/generate", {"prompts": [prompt], "max_tokens": max_tokens}
        )
    except OSError as error:
        return Sample(
            phase, index, prompt, started, time.perf_counter() - started, 0, error=repr(error)
        )
    seconds = time.perf_counter() - started
    if status != 200:
        return Sample(phase, index, prompt, started, seconds, status, error=json.dumps(body)[:300])
    state = body.get("state") or {}
    return Sample(
        phase,
        index,
        prompt,
        started,
        seconds,
        status,
        text=body["completions"][0]["text"],
        version=state.get("version"),
        applied=tuple(state.get("applied") or ()),
    )


def generator(
    port: int,
    index: int,
    prompts: list[str],
    phase: str,
    log: Log,
    args,
    count: int | None,
    stop: threading.Event | None,
) -> None:
    """Send generate requests back to back: ``count`` of them, or until ``stop`` is set."""
    client = Client(port)
    i = index
    try:
        while (count is None or i - index < count) and not (stop and stop.is_set()):
            log.add(generate_once(client, phase, index, prompts[i % len(prompts)], args.max_tokens))
            i += 1
    finally:
        client.close()


def edit_body(case: dict, method: str) -> dict:
    return {
        "method": method,
        "requests": [
            {
                "prompt": case["prompt"],
                "subject": case["subject"],
                "target_new": case["target_new"],
                "target_true": case["ground_truth"],
            }
        ],
        "note": f"load test, CounterFact case {case['case_id']}",
    }


def editor(port: int, token: str, cases: list[dict], log: Log, args, deadline: float) -> None:
    """Edits and reverts (edit, edit, revert, ...; a revert takes back the newest applied edit)."""
    client = Client(port, token)
    applied: list[str] = []
    edits = reverts = 0
    try:
        while (edits < args.edits or reverts < args.reverts) and time.perf_counter() < deadline:
            revert = applied and reverts < args.reverts and (edits % 2 == 0 or edits >= args.edits)
            started = time.perf_counter()
            if revert:
                edit_id = applied.pop()
                status, body = client.call("DELETE", f"/v1/edits/{edit_id}")
                reverts += 1
                kind = "revert"
            else:
                status, body = client.call(
                    "POST", "/v1/edits", edit_body(cases[edits], args.method)
                )
                edit_id = body.get("id")
                if status == 201:
                    applied.append(edit_id)
                edits += 1
                kind = "edit"
            error = None if status in (200, 201) else json.dumps(body)[:300]
            log.add(Mutation(kind, started, time.perf_counter() - started, status, edit_id, error))
            time.sleep(args.gap)
    finally:
        client.close()


def run_load(port: int, token: str, cases: list[dict], args) -> tuple[Log, dict[str, float]]:
    log = Log()
    prompts = [c["prompt"] for c in cases] + list(GENERAL_PROMPTS)
    # warm-up (not measured): the first requests of a fresh server are slower
    warm = Client(port)
    for prompt in prompts[:2]:
        generate_once(warm, "warmup", -1, prompt, args.max_tokens)
    warm.close()

    times = {"quiet_start": time.perf_counter()}
    threads = [
        threading.Thread(
            target=generator, args=(port, i, prompts, "quiet", log, args, args.quiet_requests, None)
        )
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times["quiet_end"] = times["edits_start"] = time.perf_counter()

    stop = threading.Event()
    threads = [
        threading.Thread(target=generator, args=(port, i, prompts, "edits", log, args, None, stop))
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    editor(port, token, cases, log, args, deadline=time.perf_counter() + args.time_limit)
    stop.set()
    for t in threads:
        t.join()
    times["edits_end"] = time.perf_counter()
    return log, times


# ---------------------------------------------------------------------------------- check


def reference_answers(
    lm, journal_dir: Path, wanted: dict[int, set[str]], max_tokens: int
) -> tuple[dict[tuple[int, str], str], dict[int, tuple[str, ...]]]:
    """Replay the journal on the fresh base model ``lm`` entry by entry; at each version the
    answers to the prompts in ``wanted[version]``, and the ids applied at each version."""
    journal = Journal(journal_dir, lm.name, lm.fingerprint)
    answers: dict[tuple[int, str], str] = {}
    applied_at: dict[int, tuple[str, ...]] = {}
    patches: dict[str, Patch] = {}

    def measure(version: int) -> None:
        applied_at[version] = tuple(patches)
        for prompt in sorted(wanted.get(version, ())):
            answers[version, prompt] = ls.generate(lm, [prompt], max_new_tokens=max_tokens)[0]

    try:
        version = 0
        measure(version)
        for entry in journal.entries:
            if entry["op"] == "edit" and entry.get("status") == "applied":
                patch = Patch.load(journal.patch_folder(entry["id"]))
                patch.apply(lm)
                patches[entry["id"]] = patch
            elif entry["op"] == "revert":
                for edit_id in entry["ids"]:
                    patches.pop(edit_id).revert()
            else:
                continue
            version += 1
            measure(version)
    finally:
        journal.close()
    return answers, applied_at


# ---------------------------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def latency_row(samples: list[Sample], seconds: float) -> dict:
    ok = [s.seconds for s in samples if s.error is None]
    return {
        "requests": len(samples),
        "errors": sum(1 for s in samples if s.error is not None),
        "p50_s": percentile(ok, 0.50),
        "p99_s": percentile(ok, 0.99),
        "max_s": max(ok) if ok else None,
        "mean_s": statistics.mean(ok) if ok else None,
        "throughput_per_s": len(ok) / seconds if seconds > 0 else None,
        "wall_s": seconds,
    }


def mutation_row(mutations: list[Mutation], kind: str) -> dict:
    chosen = [m for m in mutations if m.kind == kind]
    ok = [m.seconds for m in chosen if m.error is None]
    return {
        "sent": len(chosen),
        "errors": sum(1 for m in chosen if m.error is not None),
        "p50_s": percentile(ok, 0.5),
        "max_s": max(ok) if ok else None,
        "error_examples": [m.error for m in chosen if m.error][:3],
    }


def fmt(x: float | None, unit: str = "s") -> str:
    return "–" if x is None else f"{x:.3f} {unit}" if unit else f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: embedded); 'tiny'")
    parser.add_argument("--method", default=None, help="edit method (rome; ft-l for --model tiny)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--reverts", type=int, default=10)
    parser.add_argument("--quiet-requests", type=int, default=8, help="per client, without edits")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between mutations")
    parser.add_argument("--time-limit", type=float, default=240, help="of the edit phase (s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/service_load.json")
    args = parser.parse_args()
    if args.reverts > args.edits:
        parser.error("--reverts must be at most --edits")
    load_before = os.getloadavg()
    cases = json.loads(DATA.read_text())[: args.edits]

    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        folder = Path(tmp)
        if args.model == "tiny":
            tiny = tiny_model("llama")
            tiny.model.save_pretrained(folder / "tiny")
            tiny.tokenizer.save_pretrained(folder / "tiny")
            served, method = str(folder / "tiny"), args.method or "ft-l"
        else:
            served, method = args.model, args.method or "rome"
        args.method = method
        token = secrets.token_urlsafe(16)
        started = time.perf_counter()
        process, port = start_server(served, folder, token)
        print(f"server up on 127.0.0.1:{port} in {time.perf_counter() - started:.0f} s")
        try:
            log, times = run_load(port, token, cases, args)
        finally:
            stop_server(process)

        # the reference: the journal replayed in this process, version by version
        lm = ls.load_model(served)
        wanted: dict[int, set[str]] = {}
        for s in log.samples:
            if s.error is None and s.phase != "warmup":
                wanted.setdefault(s.version, set()).add(s.prompt)
        started = time.perf_counter()
        answers, applied_at = reference_answers(lm, folder / "journal", wanted, args.max_tokens)
        reference_seconds = time.perf_counter() - started

    measured = [s for s in log.samples if s.phase != "warmup"]
    checked = [s for s in measured if s.error is None]
    wrong_answer = [s for s in checked if answers.get((s.version, s.prompt)) != s.text]
    wrong_state = [s for s in checked if applied_at.get(s.version) != s.applied]
    quiet = [s for s in measured if s.phase == "quiet"]
    loaded = [s for s in measured if s.phase == "edits"]
    # "during edits": requests that overlapped an edit or revert in flight
    spans = [(m.started, m.started + m.seconds) for m in log.mutations]
    overlapping = [
        s for s in loaded if any(a < s.started + s.seconds and s.started < b for a, b in spans)
    ]
    rows = {
        "without_edits": latency_row(quiet, times["quiet_end"] - times["quiet_start"]),
        "with_edits": latency_row(loaded, times["edits_end"] - times["edits_start"]),
        "overlapping_a_mutation": latency_row(
            overlapping, times["edits_end"] - times["edits_start"]
        ),
    }
    versions = sorted({s.version for s in checked})
    # the check's teeth: prompts whose answer differs between states, and how many served answers
    # would fail if each had been labelled with the state before its own
    by_prompt: dict[str, set[str]] = {}
    for (_, prompt), text in answers.items():
        by_prompt.setdefault(prompt, set()).add(text)
    changing = sorted(p for p, texts in by_prompt.items() if len(texts) > 1)
    shifted = [s for s in checked if (s.version - 1, s.prompt) in answers]
    shifted_wrong = sum(1 for s in shifted if answers[s.version - 1, s.prompt] != s.text)
    result = run_header(
        "service_load",
        DATA,
        len(cases),
        lm.name,
        lm.fingerprint,
        ls.get_editor(method).config_for(lm).to_dict(),
        protocol="service",
    )
    result.update(
        protocol="service load (loopback)",
        method=method,
        model_kind="tiny random llama" if args.model == "tiny" else "embedded SmolLM2-135M",
        settings={
            "clients": args.clients,
            "edits": args.edits,
            "reverts": args.reverts,
            "quiet_requests_per_client": args.quiet_requests,
            "max_tokens": args.max_tokens,
            "gap_s": args.gap,
            "time_limit_s": args.time_limit,
        },
        generation=rows,
        edits=mutation_row(log.mutations, "edit"),
        reverts=mutation_row(log.mutations, "revert"),
        consistency={
            "answers_checked": len(checked),
            "states_seen": len(versions),
            "answers_differing_from_their_state": len(wrong_answer),
            "answers_with_wrong_applied_ids": len(wrong_state),
            "examples": [
                {
                    "version": s.version,
                    "prompt": s.prompt,
                    "served": s.text,
                    "reference": answers.get((s.version, s.prompt)),
                }
                for s in wrong_answer[:5]
            ],
            "prompts_whose_answer_changes_across_states": len(changing),
            "prompts": len(by_prompt),
            "control_labelled_one_state_earlier": {
                "answers": len(shifted),
                "would_differ": shifted_wrong,
            },
            "reference_seconds": reference_seconds,
        },
        errors_total=rows["without_edits"]["errors"]
        + rows["with_edits"]["errors"]
        + sum(1 for m in log.mutations if m.error is not None),
        machine=machine(load_before),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),  # the server inherits it
        this_process_torch_threads=torch.get_num_threads(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    print(
        f"\n{result['model_kind']} · {method} · {args.clients} clients · {args.max_tokens} new tokens"
    )
    print(
        f"{'generation':<26}{'requests':>9}{'errors':>8}{'p50':>10}{'p99':>10}{'max':>10}{'req/s':>8}"
    )
    for name, row in rows.items():
        print(
            f"{name.replace('_', ' '):<26}{row['requests']:>9}{row['errors']:>8}"
            f"{fmt(row['p50_s']):>10}{fmt(row['p99_s']):>10}{fmt(row['max_s']):>10}"
            f"{fmt(row['throughput_per_s'], ''):>8}"
        )
    for kind in ("edits", "reverts"):
        row = result[kind]
        print(
            f"{kind:<26}{row['sent']:>9}{row['errors']:>8}{fmt(row['p50_s']):>10}{'':>10}{fmt(row['max_s']):>10}"
        )
    c = result["consistency"]
    print(
        f"consistency: {c['answers_checked']} answers over {c['states_seen']} journal states; "
        f"{c['answers_differing_from_their_state']} differ from their state's answer, "
        f"{c['answers_with_wrong_applied_ids']} name the wrong applied edits"
    )
    control = c["control_labelled_one_state_earlier"]
    print(
        f"  (the answers to {c['prompts_whose_answer_changes_across_states']} of {c['prompts']} "
        f"prompts change across states; labelled one state earlier, {control['would_differ']} "
        f"of {control['answers']} answers would differ)"
    )
    print(f"errors in total: {result['errors_total']} (target 0) -> {args.out}")


if __name__ == "__main__":
    main()
