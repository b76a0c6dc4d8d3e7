"""A killed evaluation resumes correctly, proven with ``kill -9``: a run (single and sequential
protocols, FT-L on a tiny model) is SIGKILLed at a random moment, then started again with the same
output folder; it must finish with the numbers of an uninterrupted run, keep the records finished
before the kill (no case edited twice), and leave no temporary file behind.

The library runs are forked children of the test process (cheap); the slow suite also kills the
real ``lmscalpel eval`` command, a separate Python process, at random moments. With
``$LMSCALPEL_RELIABILITY_OUT`` set, the slow suite writes its figures to ``kill_eval.json`` there.

Then what a resumed run reads back (issue 15): a damaged line in the middle of ``cases.jsonl``
costs only its own record (the intact ones after it are kept, not recomputed); a run folder that
holds only a killed writer's temporary file resumes; a damaged ``run.json`` is one clear error.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmscalpel import save_requests
from lmscalpel.core import files
from lmscalpel.core.files import atomic_path, atomic_write_json
from lmscalpel.evaluation import EvaluationError, evaluate
from lmscalpel.evaluation.store import JsonLines, RunStore
from lmscalpel.methods import base
from lmscalpel.testing import tiny_model
from test_evaluation_protocols import FAST, STRONG, make_cases, one_thread  # noqa: F401
from test_kill_saves import hidden, own_progress_bar_lock

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

METRICS = ("ES", "PS", "NS", "edit_acc", "locality_unchanged", "fluency")
SLOW_TRIALS = int(os.environ.get("LMSCALPEL_KILL_TRIALS", "30"))


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))


def metrics(rows: dict) -> dict:
    return {label: {k: row.get(k) for k in METRICS} for label, row in rows.items()}


def same(a: dict, b: dict) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and abs(x - y) < 1e-9)
        for label in a
        for x, y in ((a[label][k], b[label][k]) for k in METRICS)
    )


def kill_and_resume(tmp_path: Path, protocol: str, trials: int, seed: int) -> dict:
    lm = tiny_model("llama")
    cases = make_cases()
    run = dict(options=FAST, protocol=protocol, progress=False)
    start = time.perf_counter()
    clean = evaluate(lm, cases, "ft-l", STRONG, out=tmp_path / "clean", **run)
    full = time.perf_counter() - start
    rng = random.Random(seed)
    tally = {"trials": 0, "killed_mid_run": 0, "records_kept": 0, "wrong_results": 0,
             "torn_records": 0, "leftover_temporaries": 0}  # fmt: skip
    for trial in range(trials):
        out = tmp_path / f"run-{trial}"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                torch.set_num_threads(1)
                own_progress_bar_lock()
                evaluate(lm, cases, "ft-l", STRONG, out=out, **run)
                code = 0
            finally:
                os._exit(code)
        time.sleep(rng.uniform(0.0, 1.2 * full))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code in (0, -signal.SIGKILL), f"the run failed by itself (exit {code})"
        tally["trials"] += 1
        tally["killed_mid_run"] += code != 0
        sink = RunStore(out).cases("ft-l")  # a last line cut short is dropped, by design
        tally["records_kept"] += len(sink.read())
        resumed = evaluate(lm, cases, "ft-l", STRONG, out=out, **run)
        if not same(metrics(resumed.rows), metrics(clean.rows)):
            tally["wrong_results"] += 1
        records = sink.read()
        if sorted(r["case_id"] for r in records) != list(range(len(cases))):
            tally["torn_records"] += 1
        tally["leftover_temporaries"] += len(hidden(out))
    return tally


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_a_run_killed_at_a_random_moment_resumes_to_the_same_numbers(tmp_path, protocol):
    tally = kill_and_resume(tmp_path, protocol, trials=1, seed=3)
    assert (tally["wrong_results"], tally["torn_records"], tally["leftover_temporaries"]) == (
        0,
        0,
        0,
    ), tally


def _record(name: str, tally: dict) -> None:
    out = os.environ.get("LMSCALPEL_RELIABILITY_OUT")
    if not out:
        return
    path = Path(out) / "kill_eval.json"
    data = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    data["runs"][name] = tally
    data["measured"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(path, data)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_many_killed_runs_resume_to_the_same_numbers(tmp_path, protocol):
    tally = kill_and_resume(tmp_path, protocol, trials=SLOW_TRIALS, seed=11)
    assert (tally["wrong_results"], tally["torn_records"], tally["leftover_temporaries"]) == (
        0,
        0,
        0,
    ), tally
    assert tally["killed_mid_run"] > tally["trials"] // 2  # the kills really cut runs short
    _record(f"library-{protocol}", tally)


# ---- the real command ------------------------------------------------------------------------
def cli(*args: str) -> list[str]:
    code = (
        "import sys; from lmscalpel.cli import app; sys.argv = ['lmscalpel', *sys.argv[1:]]; app()"
    )
    return [sys.executable, "-c", code, *args]


def evaluating(child: subprocess.Popen, out: Path) -> tuple[float, float]:
    """Wait for ``child`` (an ``lmscalpel eval`` writing to ``out``) to end; when its evaluation
    started (``run.json`` appeared) and when it ended."""
    while not (out / "run.json").exists() and child.poll() is None:
        time.sleep(0.01)
    started = time.perf_counter()
    assert child.wait() == 0, "the uninterrupted run failed"
    return started, time.perf_counter()


@pytest.mark.slow
def test_the_eval_command_killed_at_random_moments_resumes(tmp_path, model_dir):
    data = tmp_path / "requests.jsonl"
    save_requests([r for c in make_cases(3) for r in c.requests], data)
    args = ["eval", "--method", "ft-l", "--data", str(data), "--model", model_dir,
            "--set", "lr=0.05", "--set", "steps=10", "--fluency-cases", "1",
            "--fluency-tokens", "6", "--fluency-prompts", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMSCALPEL_HOME": str(tmp_path / "home")}
    warm = subprocess.run(cli(*args, "--out", str(tmp_path / "warm")), env=env, capture_output=True)
    assert warm.returncode == 0, warm.stderr.decode()[-2000:]  # the caches filled, as for the runs
    clean_out = tmp_path / "clean"
    started, finished = evaluating(subprocess.Popen(cli(*args, "--out", str(clean_out)), env=env,
                                                   stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL), clean_out)  # fmt: skip
    clean = json.loads((clean_out / "summary.json").read_text())["rows"]
    rng = random.Random(5)
    tally = {"trials": 0, "killed_mid_run": 0, "wrong_results": 0, "leftover_temporaries": 0}
    for trial in range(5):
        out = tmp_path / f"run-{trial}"
        child = subprocess.Popen(cli(*args, "--out", str(out)), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        while not (out / "run.json").exists() and child.poll() is None:  # past the imports
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, finished - started))  # into the evaluation
        child.send_signal(signal.SIGKILL)
        tally["trials"] += 1
        tally["killed_mid_run"] += child.wait() != 0
        done = subprocess.run(cli(*args, "--out", str(out)), env=env, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        rows = json.loads((out / "summary.json").read_text())["rows"]
        tally["wrong_results"] += not same(metrics(rows), metrics(clean))
        tally["leftover_temporaries"] += len(hidden(out))
    assert (tally["wrong_results"], tally["leftover_temporaries"]) == (0, 0), tally
    assert tally["killed_mid_run"] >= 3, tally  # the kills really cut the runs short
    _record("cli-eval", tally)


# ---- what a resumed run reads back -----------------------------------------------------------
class Counting:
    """ft-l's compute, recording the case ids it is asked to edit."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list = []
        cls = base.editor_class("ft-l")
        real = cls.compute

        def compute(editor, lm, requests, config):
            self.calls.append(requests[0].case_id)
            return real(editor, lm, requests, config)

        monkeypatch.setattr(cls, "compute", compute)


def test_a_damaged_line_costs_only_its_own_record(tmp_path, caplog):
    path = tmp_path / "cases.jsonl"
    good = [json.dumps({"key": str(i), "n": i}).encode() + b"\n" for i in range(4)]
    path.write_bytes(good[0] + b'{"key": "1", "n": \xff\xfe broken\n' + good[2] + b"5\n" + b"[1]\n"
                     + good[3] + b'{"key": "4", "n"')  # fmt: skip
    records = JsonLines(path).read()
    assert [r["n"] for r in records] == [0, 2, 3]
    assert path.read_bytes() == good[0] + good[2] + good[3]  # repaired, the intact records kept
    assert "3 damaged line(s)" in caplog.text and "cut short" in caplog.text
    assert JsonLines(path).read() == records and hidden(tmp_path) == []


def test_a_damaged_record_in_the_middle_of_cases_is_redone_alone(monkeypatch, tmp_path):
    lm = tiny_model("llama")
    cases = make_cases()
    run = dict(options=FAST, out=tmp_path / "run", progress=False)
    first = evaluate(lm, cases, "ft-l", STRONG, **run)
    sink = RunStore(tmp_path / "run").cases("ft-l")
    lines = sink.path.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(cases) >= 4
    lines[1] = lines[1][:20] + b"\x00\xff garbage" + lines[1][-30:]  # damaged, still one line
    sink.path.write_bytes(b"".join(lines))
    counting = Counting(monkeypatch)
    again = evaluate(lm, cases, "ft-l", STRONG, **run)
    assert counting.calls == [1]  # only the damaged case is edited again
    assert sorted(r["case_id"] for r in sink.read()) == list(range(len(cases)))
    assert same(metrics(again.rows), metrics(first.rows))


def killed_while_writing(path: Path) -> None:
    """A real writer of ``path`` (``atomic_write_json``'s temporary file) killed mid-write."""
    pid = os.fork()
    if pid == 0:
        try:
            with atomic_path(path) as tmp:
                tmp.write_text('{"format": "lmscal')
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL


def test_a_run_folder_holding_only_a_leftover_temporary_file_resumes(tmp_path):
    out = tmp_path / "run"
    killed_while_writing(out / "run.json")
    assert [p.name.startswith(".run.json.tmp-") for p in out.iterdir()] == [True]
    lm = tiny_model("llama")
    summary = evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=out, progress=False)
    assert summary.n_cases == 2 and hidden(out) == []


def test_leftovers_beside_a_run_s_files_are_removed_and_a_live_writer_s_kept(tmp_path):
    lm = tiny_model("llama")
    out = tmp_path / "run"
    evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=out, progress=False)
    killed_while_writing(out / "summary.json")
    killed_while_writing(out / "ft-l" / "checkpoints.jsonl")
    alive = out / f".table.md.tmp-{'0' * 16}-{files._HOST}-{os.getpid()}-abcdef"
    alive.write_text("mine")  # this process's own: a writer still at work
    assert len(hidden(out)) == 3
    RunStore(out)
    assert hidden(out) == [alive.name]


def test_a_damaged_manifest_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_bytes(b'{"format": "lmscalpel-evaluation", "cases": [\xff')
    lm = tiny_model("llama")
    with pytest.raises(EvaluationError, match="run.json is damaged"):
        evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=out, progress=False)
    (out / "run.json").write_text("[1, 2]")
    with pytest.raises(EvaluationError, match="holds no run description"):
        evaluate(lm, make_cases(2), "ft-l", STRONG, options=FAST, out=out, progress=False)
