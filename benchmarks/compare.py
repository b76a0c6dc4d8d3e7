"""Fine-tuning baselines against in-context editing (and ROME): reliability, generalization,
locality, fluency and cost, in one run on the embedded model.

The first 200 cases of CounterFact's evaluation split (``../shared/data/counterfact/edit.json``),
the single protocol (each case edited on the pristine model, measured, reverted), every method
with its default configuration:

    unedited · ft · ft-l · ft-m · lora · ike-plain · ike · rome (when registered)

Columns: ES / PS / NS (efficacy, paraphrase and neighbourhood success), exact match (greedy
continuation of the edit prompt starts with the new target), fluency (ROME's n-gram entropy of
long generations, first ``--fluency-cases`` cases), seconds per edit and peak memory while
editing. Everything is measured by :mod:`lmscalpel.evaluation`.

Each method runs in its own process (so its peak memory is its own; ``--jobs 2`` runs two at
once) into ``runs/compare/<method>/``; a killed run started again resumes there. The table is then
assembled into ``benchmarks/results/compare.md``, ``compare.json`` and ``compare.png``.

    nice -n 10 .venv/bin/python benchmarks/compare.py            # hours on a 2-core CPU
    .venv/bin/python benchmarks/compare.py --n 5 --runs runs/smoke --results runs/smoke  # a smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "edit.json"
METHODS = ("ft", "ft-l", "ft-m", "lora", "ike-plain", "ike", "rome")
COLUMNS = (
    "ES",
    "PS",
    "NS",
    "score",
    "exact_match",
    "fluency",
    "seconds_per_edit",
    "peak_memory_mb",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="CounterFact evaluation file")
    parser.add_argument("--n", type=int, default=200, help="number of cases, from the first")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods")
    parser.add_argument("--fluency-cases", type=int, default=10, help="cases measured for fluency")
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per method")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def options(args: argparse.Namespace):
    from lmscalpel.evaluation import EvalOptions

    return EvalOptions(protocol="single", fluency_cases=args.fluency_cases)


def run_method(args: argparse.Namespace, method: str) -> None:
    """Evaluate one method (in this process) into ``args.runs / method``."""
    import torch

    import lmscalpel as ls
    from lmscalpel.evaluation import evaluate, load_cases

    logging.basicConfig(level=logging.WARNING, format=f"[{method}] %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = ls.load_model()
    cases = load_cases(args.data, n=args.n)
    evaluate(
        lm,
        cases,
        method,
        options=options(args),
        out=args.runs / method,
        info={"data": str(args.data), "first_cases": args.n},
    )


def launch(args: argparse.Namespace, methods: list[str]) -> None:
    """Run every method in a subprocess, ``args.jobs`` at a time; fail if any fails."""
    pending, running, failed = list(methods), {}, []
    base = [sys.executable, __file__, "--data", str(args.data), "--n", str(args.n)]
    base += ["--fluency-cases", str(args.fluency_cases), "--runs", str(args.runs)]
    base += ["--threads", str(args.threads)] if args.threads else []
    args.runs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < args.jobs:
            method = pending.pop(0)
            log = (args.runs / f"{method}.log").open("a")
            print(f"{time.strftime('%H:%M:%S')} start {method} (log: {log.name})", flush=True)
            running[method] = subprocess.Popen(
                [*base, "--worker", method], stdout=log, stderr=subprocess.STDOUT
            )
        time.sleep(2)
        for method, proc in list(running.items()):
            if proc.poll() is not None:
                del running[method]
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                print(f"{time.strftime('%H:%M:%S')} {status} {method}", flush=True)
                if proc.returncode:
                    failed.append(method)
    if failed:
        raise SystemExit(f"methods failed: {failed}; see {args.runs}/<method>.log")


def assemble(args: argparse.Namespace, methods: list[str]):
    """One summary from the methods' run folders (the unedited row is the same in each)."""
    from lmscalpel.evaluation import BASELINE, Summary

    rows, infos = {}, {}
    for method in methods:
        data = json.loads((args.runs / method / "summary.json").read_text())
        rows.setdefault(BASELINE, data["rows"][BASELINE])
        rows[method] = data["rows"][method]
        infos[method] = data["info"]
    first = infos[methods[0]]
    return Summary(
        rows=rows,
        protocol="single",
        n_cases=rows[BASELINE]["n_cases"],
        info={
            "data": str(args.data.name),
            "first_cases": args.n,
            "model": first["model"],
            "model_fingerprint": first["model_fingerprint"],
            "options": first["options"],
            "methods": {m: infos[m]["methods"][m] for m in methods},
            "left_out_cases": first["left_out_cases"],
            "wall_seconds": {m: round(infos[m]["wall_seconds"]) for m in methods},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.jobs} method(s) at "
            f"once, torch threads {args.threads or 'default'}",
            "date": dt.date.today().isoformat(),
        },
    )


def focused_table(summary) -> str:
    from lmscalpel.evaluation.report import columns, fmt, header

    keys = columns(summary, COLUMNS)
    lines = [
        "| method | " + " | ".join(header(k) for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, row in summary.rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(k, row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_results(args: argparse.Namespace, summary) -> None:
    from lmscalpel.evaluation.plots import plot_metrics

    args.results.mkdir(parents=True, exist_ok=True)
    info = summary.info
    text = (
        "# Fine-tuning baselines and in-context editing on the embedded model\n\n"
        f"{summary.protocol} protocol, the first {info['first_cases']} cases of CounterFact "
        f"`{info['data']}` ({summary.n_cases} usable), model {info['model']} "
        f"(`{info['model_fingerprint']}`), default configuration of every method, one run "
        f"({info['date']}, {info['machine']}). Rates in %, fluency in bits (first "
        f"{info['options']['fluency_cases']} cases), seconds per edit, peak resident memory "
        "while editing in MiB. Written by `benchmarks/compare.py`.\n\n"
        + focused_table(summary)
        + "\nAll columns:\n\n"
        + summary.markdown()
    )
    (args.results / "compare.md").write_text(text)
    (args.results / "compare.json").write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
    plot_metrics(summary, args.results / "compare.png")
    print(text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_method(args, args.worker)
        return
    from records import require_data

    require_data(args.data)
    from lmscalpel import available_methods

    methods = [m for m in (args.methods or METHODS) if m in available_methods()]
    skipped = sorted(set(args.methods or METHODS) - set(methods))
    if skipped:
        print(f"not registered, skipped: {', '.join(skipped)}")
    launch(args, methods)
    write_results(args, assemble(args, methods))


if __name__ == "__main__":
    main()
