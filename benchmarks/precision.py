"""ROME in half precision: the embedded model held in bfloat16 against float32 (issue 13).

The first ``--n`` (200) cases of ``../shared/data/counterfact/edit.json``, single protocol (each
case edited on the pristine model, measured, reverted), through :mod:`lmscalpel.evaluation`, once
per dtype in one benchmark run. The model is held in the dtype; every edit computes in float32
(keys, values, statistics, solves) and stores its delta in the parameter's dtype. Each dtype runs
in its own process, so that its memory is its own; the statistics and context prefixes are
prepared before the clock starts (a bf16 model has its own fingerprint, hence its own statistics
over the text it samples itself).

Memory columns, from ``--probe`` (20) edits made and reverted before the evaluation, in a process
that has done nothing else since loading: the weights' bytes; the process's peak resident memory
while editing; and that peak above the resident memory before the model was loaded (the model
plus what editing allocates, without the Python and torch runtime that every process carries).
The peak resident memory during the evaluation is in the JSON too, but it measures the
evaluation's scoring more than the edits: memory that scoring frees stays with the process's
allocator, so it creeps up over a run (float32 1072 → 1105 MiB, bfloat16 871 → 1079 MiB over
200 cases).

Targets: bfloat16's ES / PS / NS within 2 points of float32's; peak memory about half.

    nice -n 10 .venv/bin/python benchmarks/precision.py --threads 1
    .venv/bin/python benchmarks/precision.py --n 5 --runs runs/smoke-precision --out /tmp/p.json

Prints a table and writes JSON (default ``benchmarks/results/precision.json``) and markdown beside
it; the per-case records stay in ``--runs`` (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "edit.json"
METHOD = "rome"
METRICS = ("ES", "PS", "NS")
TOLERANCE = 0.02  # two points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="CounterFact evaluation file")
    parser.add_argument("--n", type=int, default=200, help="first cases of the file")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="dtypes, the reference first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument(
        "--probe",
        type=int,
        default=20,
        help="cases edited (and reverted) alone first, for the memory columns",
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "precision")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/precision.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_worker(args: argparse.Namespace, dtype: str) -> None:
    """One dtype, in this process: load, prepare, evaluate, and write ``memory.json``."""
    import torch

    import lmscalpel as ls
    from lmscalpel.evaluation import EvalOptions, evaluate, load_cases
    from lmscalpel.evaluation.resources import ResourceMeter, rss_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    before_model = rss_bytes()
    lm = ls.load_model(dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    editor = ls.get_editor(METHOD)
    config = editor.config_for(lm)
    started = time.perf_counter()
    editor.prepare(lm, config)
    prepared = time.perf_counter() - started
    folder = args.runs / f"{METHOD}-{dtype}-n{args.n}"
    cases = load_cases(args.data, args.n)
    # editing alone, before anything else has run in this process: the resident memory of a
    # process that also evaluated holds what the evaluation's scoring freed but the allocator
    # kept, which says nothing about the dtype
    with ResourceMeter(lm.device) as meter:
        for case in cases[: args.probe]:
            patch = ls.edit(lm, list(case.requests), method=METHOD, config=config, apply=False)
            patch.apply(lm)
            patch.revert()
    options = EvalOptions(protocol="single", fluency_cases=0, exact_match=False)
    summary = evaluate(lm, cases, METHOD, config, options=options, out=folder, progress=False)
    row = summary.rows[METHOD]
    memory = {
        "dtype": str(lm.dtype).removeprefix("torch."),
        "weights_mb": weights / 2**20,
        "rss_before_model_mb": before_model / 2**20,
        "probe_edits": min(args.probe, len(cases)),
        "probe_seconds_per_edit": meter.usage.seconds / max(1, min(args.probe, len(cases))),
        "peak_editing_mb": meter.usage.peak_mb,
        "model_and_editing_mb": meter.usage.peak_mb - before_model / 2**20,
        "peak_during_evaluation_mb": row.get("peak_memory_mb"),
        "prepare_seconds": prepared,
        "torch_threads": torch.get_num_threads(),
        "fingerprint": lm.fingerprint,
    }
    (folder / "memory.json").write_text(json.dumps(memory, indent=1) + "\n")


def measure(args: argparse.Namespace, dtype: str) -> dict:
    """Run one dtype's worker (a fresh process) and read back its summary and memory."""
    folder = args.runs / f"{METHOD}-{dtype}-n{args.n}"
    args.runs.mkdir(parents=True, exist_ok=True)
    log = args.runs / f"{METHOD}-{dtype}-n{args.n}.log"
    command = [sys.executable, __file__, *args.argv, "--worker", dtype]
    started = time.perf_counter()
    with log.open("a") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{dtype}: worker failed with exit status {code}, see {log}")
    summary = json.loads((folder / "summary.json").read_text())
    memory = json.loads((folder / "memory.json").read_text())
    print(f"{time.strftime('%H:%M:%S')} {dtype}: done in {time.perf_counter() - started:.0f} s")
    return {"summary": summary, "memory": memory}


def checks(results: dict[str, dict], reference: str) -> list[dict]:
    """Each target against the reference dtype: metric within two points, memory about half."""
    out = []
    ref = results[reference]
    for dtype, found in results.items():
        if dtype == reference:
            continue
        for metric in METRICS:
            a = found["summary"]["rows"][METHOD][metric]
            b = ref["summary"]["rows"][METHOD][metric]
            out.append({
                "target": f"{dtype} ROME {metric} within 2 points of {reference}",
                "measured": f"{100 * a:.1f} vs {100 * b:.1f} ({100 * (a - b):+.1f})",
                "met": abs(a - b) <= TOLERANCE + 1e-9,
            })  # fmt: skip
        ratio = found["memory"]["model_and_editing_mb"] / ref["memory"]["model_and_editing_mb"]
        out.append({
            "target": f"{dtype} peak memory about half of {reference}'s (model and editing)",
            "measured": f"{found['memory']['model_and_editing_mb']:.0f} vs "
                        f"{ref['memory']['model_and_editing_mb']:.0f} MiB ({ratio:.2f}x)",
            "met": ratio <= 0.6,
        })  # fmt: skip
    return out


def report(args: argparse.Namespace, results: dict[str, dict]) -> str:
    """The markdown table of every dtype, then the targets."""
    lines = [
        f"# ROME by dtype: first {args.n} CounterFact cases (`{args.data.name}`), single protocol",
        "",
        "Written by `benchmarks/precision.py`; rates in %, memory in MiB.",
        "",
        "| dtype | unedited ES | unedited PS | unedited NS | ES | PS | NS | s/edit | weights "
        "| peak while editing | model + editing |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, found in results.items():
        rows, memory = found["summary"]["rows"], found["memory"]
        base, row = rows["unedited"], rows[METHOD]
        cells = [f"{100 * base[m]:.1f}" for m in METRICS] + [f"{100 * row[m]:.1f}" for m in METRICS]
        cells += [
            f"{row.get('seconds_per_edit', float('nan')):.2f}",
            f"{memory['weights_mb']:.0f}",
            f"{memory['peak_editing_mb']:.0f}",
            f"{memory['model_and_editing_mb']:.0f}",
        ]
        lines.append(f"| {dtype} | " + " | ".join(cells) + " |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for check in checks(results, next(iter(results))):
        lines.append(f"| {check['target']} | {check['measured']} | {'met' if check['met'] else 'not met'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.worker:
        run_worker(args, args.worker)
        return
    from records import require_data

    require_data(args.data)
    from lmscalpel.core.clock import utc_now
    from records import machine

    load_before = os.getloadavg()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    results = {dtype: measure(args, dtype) for dtype in dtypes}
    text = report(args, results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    data = {
        "benchmark": "precision",
        "date": utc_now(),
        "data": args.data.name,
        "n_cases": args.n,
        "method": METHOD,
        "protocol": "single",
        "dtypes": {
            dtype: {
                "rows": found["summary"]["rows"],
                "memory": found["memory"],
                "config": found["summary"]["info"]["methods"],
                "wall_seconds": found["summary"]["info"].get("wall_seconds"),
            }
            for dtype, found in results.items()
        },
        "targets": checks(results, dtypes[0]),
        "machine": {**machine(load_before), "torch_threads": args.threads},
    }
    args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
