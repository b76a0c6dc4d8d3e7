"""Several processes (torch.distributed, gloo, two single-threaded CPU processes): statistics shared
by the ranks equal one process's over the same tokens, a sharded evaluation's records equal one
process's run in one run folder, the sequential protocol is refused, torchrun drives the CLI.

The two-process job runs this file as a script (``python tests/test_distributed.py JOB``) in two
processes given the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); the CLI smoke test goes through torchrun itself (``python -m torch.distributed.run``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmscalpel.runtime import distributed
from lmscalpel.testing import CORPUS, tiny_model

HERE = Path(__file__).resolve()
LAYERS = (0, 2, 3)
SAMPLES = 337  # falls inside a row (and is no multiple of BATCH): the last row is cut
BATCH = 4
# ROME that really edits a tiny random model, with statistics of text the model samples itself:
# 5 000 tokens take two chunks at least, one sampled by each rank
ROME = {"layer": 1, "lr": 1.0, "max_steps": 20, "clamp_norm": 10.0, "kl_factor": 0.0,
        "weight_decay": 0.0, "stats_samples": 5000, "prefixes": 0}  # fmt: skip
FT = {"lr": 0.05, "norm_constraint": 5.0, "steps": 15}
TIMING = ("seconds", "memory", "_mb")  # record and row fields that differ between any two runs
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def options(protocol: str):
    from lmscalpel.evaluation import EvalOptions

    batch = 2 if protocol == "batch" else None
    return EvalOptions(protocol=protocol, batch_size=batch, fluency_cases=2, fluency_prompts=1,
                       fluency_tokens=8, checkpoints=(1, 3))  # fmt: skip


def method_specs(protocol: str):
    from lmscalpel.evaluation import MethodSpec

    if protocol == "single":
        return [MethodSpec("rome", ROME), MethodSpec("ft-l", FT)]
    return [MethodSpec("ft-l", FT)]


# ---- the worker: one rank of the two-process job ---------------------------------------------
def work(job: Path) -> None:
    """Statistics, then sharded single and batch evaluations, then a sequential one (refused);
    what this rank saw is written to ``job/rank-<r>.json`` and ``job/stats-<r>.safetensors``."""
    from safetensors.torch import save_file

    from lmscalpel import load_model
    from lmscalpel.evaluation import EvaluationError, compare
    from lmscalpel.mechanics.stats import input_statistics
    from test_evaluation_protocols import make_cases

    torch.set_num_threads(1)
    spec = json.loads((job / "job.json").read_text())
    lm = load_model(spec["model"])
    weights = [lm.adapter.mlp_out_weight_name(layer) for layer in LAYERS]
    found = input_statistics(lm, weights, spec["corpus"], SAMPLES, batch_size=BATCH,
                             progress=False)  # fmt: skip
    me = distributed.rank()
    report: dict = {"rank": me, "world": distributed.world_size(), "counts": {}}
    save_file({w: s.moment for w, s in found.items()}, str(job / f"stats-{me}.safetensors"))
    report["counts"] = {w: s.count for w, s in found.items()}
    for protocol in ("single", "batch"):
        summary = compare(lm, make_cases(), method_specs(protocol), options=options(protocol),
                          out=job / protocol, progress=False)  # fmt: skip
        report[protocol] = summary.rows
    try:
        compare(lm, make_cases(), method_specs("batch"), options=options("sequential"),
                out=job / "sequential", progress=False)  # fmt: skip
    except EvaluationError as error:
        report["sequential"] = str(error)
    (job / f"rank-{me}.json").write_text(json.dumps(report))


# ---- launching -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LMSCALPEL_HOME=str(home),
               TOKENIZERS_PARALLELISM="false", **extra)  # fmt: skip
    return env


def launch(job: Path, home: Path, world: int = 2, timeout: float = 240) -> None:
    """``world`` processes of :func:`work`, as torchrun would start them."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = child_env(home, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(HERE), str(job)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"


def write_corpus(folder: Path) -> Path:
    """Sixty short documents (blank lines between them), far more than SAMPLES tokens."""
    docs = [f"{CORPUS[i % 10]} {CORPUS[(3 * i + 1) % 10]} Item {i}." for i in range(60)]
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The two-process job, run once: its folder, the model folder, the corpus, the cache root."""
    root = tmp_path_factory.mktemp("distributed")
    lm = tiny_model("llama")
    model = root / "model"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    corpus = write_corpus(root)
    folder, home = root / "job", root / "home"
    folder.mkdir()
    (folder / "job.json").write_text(json.dumps({"model": str(model), "corpus": str(corpus)}))
    launch(folder, home)
    reports = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(2)]
    return {"folder": folder, "model": model, "corpus": corpus, "home": home, "reports": reports}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(got, want, where: str = "") -> None:
    """Equal JSON-like values, numbers to float tolerance; timing fields are not compared."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        keys = {k for k in want if not any(t in k for t in TIMING)}
        assert keys == {k for k in got if not any(t in k for t in TIMING)}, where
        for key in keys:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), where
    else:
        assert got == want, where


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- (a) statistics --------------------------------------------------------------------------
def test_statistics_of_two_ranks_equal_one_process_over_the_same_tokens(
    job, tmp_path, monkeypatch, one_thread
):
    from safetensors.torch import load_file

    from lmscalpel import load_model
    from lmscalpel.mechanics.stats import TextCorpus, input_statistics, planned_rows

    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "alone"))  # no cache hit
    lm = load_model(str(job["model"]))
    weights = [lm.adapter.mlp_out_weight_name(layer) for layer in LAYERS]
    alone = input_statistics(lm, weights, job["corpus"], SAMPLES, batch_size=BATCH,
                             progress=False)  # fmt: skip
    ranks = [load_file(str(job["folder"] / f"stats-{r}.safetensors")) for r in range(2)]
    for weight in weights:
        assert alone[weight].count == SAMPLES
        for r, report in enumerate(job["reports"]):
            assert report["counts"][weight] == SAMPLES, (r, weight)
            assert torch.allclose(ranks[r][weight], alone[weight].moment, rtol=1e-5, atol=1e-7)
        assert torch.equal(ranks[0][weight], ranks[1][weight])  # every rank returns the same
    # the token set is one process's: whole rows, and the last one cut inside
    rows = list(TextCorpus([job["corpus"]]).rows(lm, 128))
    plan = planned_rows(TextCorpus([job["corpus"]]), lm, SAMPLES, 128)
    assert sum(map(len, plan)) == SAMPLES
    assert plan[:-1] == rows[: len(plan) - 1] and 0 < len(plan[-1]) < len(rows[len(plan) - 1])
    # rank 0 wrote one cache file per weight, whole
    cached = sorted((job["home"] / "stats").rglob("*.safetensors"))
    names = {p.name.split(".")[0] for p in cached}
    assert all(w.split(".")[0] in names for w in weights) and not list(
        (job["home"] / "stats").rglob(".*tmp*")
    )


# ---- (b) sharded evaluation ------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["single", "batch"])
def test_a_sharded_evaluation_writes_one_run_folder_equal_to_one_process(
    job, tmp_path, monkeypatch, one_thread, protocol
):
    from lmscalpel import load_model
    from lmscalpel.evaluation import compare
    from test_evaluation_protocols import make_cases

    # the same cache: the statistics the ranks computed (checked above) and the sampled text
    monkeypatch.setenv("LMSCALPEL_HOME", str(job["home"]))
    lm = load_model(str(job["model"]))
    reference = tmp_path / "alone"
    alone = compare(lm, make_cases(), method_specs(protocol), options=options(protocol),
                    out=reference, progress=False)  # fmt: skip
    sharded = job["folder"] / protocol

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    assert files(sharded) == files(reference)  # the same layout, nothing from rank 1
    for spec in method_specs(protocol):
        got, want = lines(sharded / spec.name / "cases.jsonl"), lines(reference / spec.name /
                                                                       "cases.jsonl")  # fmt: skip
        assert [r["key"] for r in got] == [r["key"] for r in want]  # the same order
        assert_close(got, want, f"{protocol}/{spec.name}")
    assert_close(lines(sharded / "baseline.jsonl"), lines(reference / "baseline.jsonl"))
    if protocol == "batch":
        assert [r["batch"] for r in lines(sharded / "ft-l" / "cases.jsonl")] == [0, 0, 1, 1, 2]
    for report in job["reports"]:  # both ranks return rank 0's summary
        assert_close(report[protocol], alone.rows, protocol)
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["info"]["processes"] == 2 and summary["rows"]["ft-l"]["n_cases"] == 5


def test_a_sharded_run_resumes_in_one_process_without_redoing_cases(job, tmp_path, monkeypatch):
    """The folder of a finished sharded run is a lone process's: started again, it edits
    nothing and rewrites only the summary."""
    import shutil

    from lmscalpel import load_model
    from lmscalpel.evaluation import compare
    from lmscalpel.methods import base
    from test_evaluation_protocols import make_cases

    monkeypatch.setenv("LMSCALPEL_HOME", str(job["home"]))
    folder = tmp_path / "run"
    shutil.copytree(job["folder"] / "batch", folder)
    calls = []
    cls = base.editor_class("ft-l")
    real = cls.compute
    monkeypatch.setattr(cls, "compute", lambda *a: calls.append(1) or real(*a))
    lm = load_model(str(job["model"]))
    compare(lm, make_cases(), method_specs("batch"), options=options("batch"), out=folder,
            progress=False)  # fmt: skip
    assert calls == []
    assert len(lines(folder / "ft-l" / "cases.jsonl")) == 5


# ---- (c) one process, nothing launched -------------------------------------------------------
def test_an_unlaunched_process_is_rank_zero_of_one(monkeypatch):
    for name in LAUNCH:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_from_env() is None
    assert distributed.join("cpu") == 1 and not distributed.is_initialised()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.is_rank_zero() and not distributed.lockstep()
    assert distributed.shard(list(range(5))) == [0, 1, 2, 3, 4]
    tensor = torch.ones(3)
    assert distributed.all_reduce_sum(tensor) is tensor and torch.equal(tensor, torch.ones(3))
    assert distributed.gather_to_rank_zero("x") == ["x"] and distributed.all_gather(1) == [1]
    assert distributed.broadcast_from_rank_zero({"a": 1}) == {"a": 1}
    assert distributed.together(lambda: 7) == 7 and distributed.on_rank_zero(lambda: 8) == 8
    with pytest.raises(ZeroDivisionError):
        distributed.on_rank_zero(lambda: 1 / 0)
    distributed.barrier()
    assert distributed.rank_device("cpu") == "cpu" and distributed.rank_device("auto") == "auto"


def test_shards_are_disjoint_cover_everything_and_balance():
    items = list(range(11))
    for world in (1, 2, 3, 4):
        shares = [distributed.shard_of(items, r, world) for r in range(world)]
        assert sorted(x for s in shares for x in s) == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(distributed.DistributedError):
        distributed.shard_of(items, 2, 2)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RANK": "0"}, "lacks WORLD_SIZE"),
        ({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be integers"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent launch"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR, MASTER_PORT"),
    ],
)
def test_an_inconsistent_launch_environment_is_a_clear_error(environ, message):
    from lmscalpel.core.config import ConfigError

    with pytest.raises(distributed.DistributedError, match=message) as caught:
        distributed.launch_from_env(environ)
    assert isinstance(caught.value, ConfigError)  # the CLI reports it as one line


def test_a_launch_is_read_like_torchrun_writes_it(monkeypatch):
    env = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert distributed.launch_from_env(env) == distributed.Launch(3, 4, 3)  # LOCAL_RANK: RANK
    assert distributed._backend_for("cpu", None) == "gloo"
    monkeypatch.setenv(distributed.BACKEND_VARIABLE, "GLOO")
    assert distributed._backend_for("cpu", None) == "gloo"
    with pytest.raises(distributed.DistributedError, match="unknown"):
        distributed._backend_for("cpu", "carrier-pigeon")


# ---- (d) the sequential protocol -------------------------------------------------------------
def test_the_sequential_protocol_is_refused_under_several_processes(job, monkeypatch, tmp_path):
    from lmscalpel.evaluation import EvaluationError, compare
    from test_evaluation_protocols import make_cases

    for report in job["reports"]:  # the real launch: every rank refused, before any file
        assert "sequential protocol cannot be split" in report["sequential"]
    assert not (job["folder"] / "sequential").exists()
    monkeypatch.setattr(distributed, "lockstep", lambda: True)  # and the check itself
    with pytest.raises(EvaluationError, match="without torchrun"):
        compare(tiny_model("llama"), make_cases(2), ["ft-l"], protocol="sequential",
                out=tmp_path / "run", progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


# ---- (e) the CLI through torchrun ------------------------------------------------------------
def test_torchrun_drives_the_stats_command_and_only_rank_zero_prints(job, tmp_path):
    home = tmp_path / "home"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "lmscalpel", "stats", "--model", str(job["model"]),
               "--layer", "1", "--corpus", str(job["corpus"]), "--samples", "300"]  # fmt: skip
    done = subprocess.run(command, env=child_env(home), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("layer 1: C = E") == 1, done.stdout
    assert "over 300 tokens" in done.stdout
    assert len(list((home / "stats").rglob("*.safetensors"))) == 1


@pytest.mark.slow
def test_torchrun_drives_the_eval_command_into_one_run_folder(job, tmp_path):
    from lmscalpel import save_requests
    from test_evaluation_protocols import make_cases

    data = tmp_path / "requests.json"
    save_requests([r for c in make_cases(3) for r in c.requests], data)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "lmscalpel", "eval", "--method", "ft-l",
               "--data", str(data), "--model", str(job["model"]), "--out", str(out),
               "--fluency-cases", "0", "--no-exact-match"]  # fmt: skip
    done = subprocess.run(command, env=child_env(tmp_path / "home"), capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("evaluating ft-l on 3") == 1, done.stdout
    assert done.stdout.count("wrote ") == 1
    assert [r["key"] for r in lines(out / "ft-l" / "cases.jsonl")] == [
        r["key"] for r in lines(out / "baseline.jsonl")
    ]
    assert len(lines(out / "ft-l" / "cases.jsonl")) == 3
    assert json.loads((out / "summary.json").read_text())["info"]["processes"] == 2


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    work(Path(sys.argv[1]))
