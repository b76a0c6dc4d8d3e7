"""Key statistics shared by two processes (torch.distributed, gloo) against one process.

Issue 13's target: two single-threaded processes take at most 0.65 of the wall time of one
single-threaded process computing the same statistics. On the embedded model, from scratch (each
run in a cache root of its own, so nothing is a cache hit), over the same tokens of a text corpus
(CounterFact *train* prompts with their true answers, written to a temporary file at run time, so
that no sampling cost dominates), of ROME's layer by default (``--layers 4,5,6`` for several):

* ``1 process`` — one single-threaded process, :func:`lmscalpel.mechanics.stats.input_statistics`;
* ``N processes`` — ``--world`` single-threaded processes started as torchrun starts them (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the same call sharing the pass.

Each process loads the model first (not timed); the clock runs from a barrier that every rank
passes to the return of the statistics call (rank 0 has written the cache by then), and a run's
time is its slowest rank's. Also reported: the largest absolute difference between the two
moments and their token counts. Prints a table, writes JSON (default
benchmarks/results/distributed_stats.json). Run it on an otherwise idle machine (at least
``--world`` free cores)::

    .venv/bin/python benchmarks/distributed_stats.py
    .venv/bin/python benchmarks/distributed_stats.py --samples 300   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpora import TRAIN, counterfact_corpus
from lmscalpel.core.clock import utc_now

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---- one process of a run --------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """Load the model, wait for the other ranks, time the statistics; rank 0 writes the result."""
    import torch
    from safetensors.torch import save_file

    import lmscalpel as ls
    from lmscalpel.mechanics.stats import input_statistics
    from lmscalpel.methods.rome import ROMEConfig
    from lmscalpel.runtime import distributed

    torch.set_num_threads(1)
    lm = ls.load_model()  # from the usual cache root (the converted model)
    config = ROMEConfig.for_model(lm.model_type)
    layers = args.layers or [config.edit_layer(lm.adapter.num_layers, lm.fingerprint)]
    weights = [lm.adapter.mlp_out_weight_name(layer) for layer in layers]
    distributed.join(lm.device)
    os.environ["LMSCALPEL_HOME"] = str(args.home)  # statistics from scratch, in this run's root
    distributed.barrier()
    start = time.perf_counter()
    found = input_statistics(lm, weights, args.corpus, args.samples, batch_size=args.batch_size,
                             max_length=args.max_length, progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    by_rank = distributed.all_gather(seconds)  # (collective: every rank takes part)
    if distributed.rank() == 0:
        save_file({w: s.moment for w, s in found.items()}, str(args.result / "moments.safetensors"))
        report = {
            "seconds": max(by_rank),
            "seconds_by_rank": by_rank,
            "layers": layers,
            "weights": weights,
            "counts": {w: s.count for w, s in found.items()},
            "processes": distributed.world_size(),
            "torch_threads": torch.get_num_threads(),
            "model": lm.name,
            "model_fingerprint": lm.fingerprint,
        }
        (args.result / "report.json").write_text(json.dumps(report))


# ---- the runs --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world: int, args: argparse.Namespace, scratch: Path, corpus: Path) -> dict:
    """One run of ``world`` processes; its report, with the wall time of the whole launch."""
    result = scratch / f"world-{world}"
    result.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH}
    base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--corpus", str(corpus),
               "--home", str(result / "home"), "--result", str(result),
               "--samples", str(args.samples), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length)]  # fmt: skip
    if args.layers:
        command += ["--layers", ",".join(map(str, args.layers))]
    port = str(free_port())
    started = time.perf_counter()
    procs = []
    for rank in range(world):
        env = dict(base)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        procs.append(subprocess.Popen(command, env=env))
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise SystemExit(f"a run of {world} process(es) failed: exit codes {codes}")
    report = json.loads((result / "report.json").read_text())
    report["launch_seconds"] = time.perf_counter() - started
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000, help="tokens (ROME's default)")
    parser.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated layers (default: ROME's layer)")  # fmt: skip
    parser.add_argument("--world", type=int, default=2, help="processes of the shared run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.65)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed_stats.json"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    import torch
    from safetensors.torch import load_file

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lmscalpel-distributed-stats-") as folder:
        scratch = Path(folder)
        corpus = counterfact_corpus(scratch)
        alone = run(1, args, scratch, corpus)
        shared = run(args.world, args, scratch, corpus)
        one = load_file(str(scratch / "world-1" / "moments.safetensors"))
        many = load_file(str(scratch / f"world-{args.world}" / "moments.safetensors"))
        difference = max(float((one[w].double() - many[w].double()).abs().max()) for w in one)
        scale = max(float(one[w].abs().max()) for w in one)
    ratio = shared["seconds"] / alone["seconds"]
    rows = [("1 process", alone), (f"{args.world} processes", shared)]
    print(f"{'run':<14} {'statistics s':>13} {'launch s':>9} {'tokens':>8}")
    for name, report in rows:
        tokens = ", ".join(str(c) for c in report["counts"].values())
        print(f"{name:<14} {report['seconds']:>13.2f} {report['launch_seconds']:>9.1f} {tokens:>8}")
    met = ratio <= args.target
    print(f"ratio {ratio:.3f} (target <= {args.target}: {'met' if met else 'not met'}); "
          f"max |C_1 - C_{args.world}| = {difference:.3g} (max |C| = {scale:.3g})")  # fmt: skip
    result = {
        "benchmark": "distributed_stats",
        "date": utc_now(),
        "data": TRAIN.name,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "backend": "gloo",
        "one_process": alone,
        "shared": shared,
        "ratio": ratio,
        "target": args.target,
        "met": met,
        "max_abs_difference": difference,
        "max_abs_moment": scale,
        "counts_equal": alone["counts"] == shared["counts"],
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_at_end": os.getloadavg(),
            "torch": torch.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
