"""When should ROME's value optimisation stop? Decides the ``stop_nll`` default by measurement.

ROME optimises the value δ (:func:`lmscalpel.mechanics.keys_values.optimise_value`) until the mean
negative log-likelihood of the new target is at most ``stop_nll`` (or ``max_steps`` ran out).
A low threshold buys a more certain target with more steps (and a larger δ, which may cost
locality); a high one is fast but may leave the new target short of being the answer. This runs
ROME with its defaults except ``stop_nll`` on the same CounterFact *training* cases
(``train.json[:n]``; never ``edit.json``, which the ROME benchmark uses), the embedded model,
single protocol, through :mod:`lmscalpel.evaluation`, for each threshold in ``--values``
(default 0.05, 0.5 and 1.0, i.e. a target probability of about 0.95, 0.61 and 0.37).

Per threshold: ES / PS / NS, exact match, score, NM (neighbourhood margin); from the patches'
per-request records (``patch.info["requests"]``): mean and median optimisation steps, the share of
edits that reached the threshold before ``max_steps``, the mean final NLL, mean ‖δ‖ and the mean
seconds of one request's edit. Prints a table and writes JSON (default
benchmarks/results/value_stop.json). The one-time work (context prefixes, key statistics) is done
before the clock starts; it does not depend on ``stop_nll``.

    nice -n 10 .venv/bin/python benchmarks/value_stop.py              # --n 40
    .venv/bin/python benchmarks/value_stop.py --n 2 --out /tmp/value_stop.json   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

import lmscalpel as ls
from lmscalpel.core.requests import EditRequest
from lmscalpel.data.shared import shared_data_file
from lmscalpel.evaluation import EvalOptions, MethodSpec, compare, load_cases
from lmscalpel.mechanics.keys_values import ValueOptions
from lmscalpel.methods import get_editor, register
from lmscalpel.methods.rome import ROME, ROMEConfig
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch
from records import header_of, machine

ROOT = Path(__file__).resolve().parents[1]
TRAIN = shared_data_file("counterfact/train.json")
VALUES = (0.05, 0.5, 1.0)
METHOD = "rome-value-stop"
COLUMNS = ("ES", "PS", "NS", "exact_match", "score", "NM", "seconds_per_edit")


@register
class RecordingROME(ROME):
    """ROME unchanged, keeping each patch's per-request records (steps, NLL, seconds) by
    ``stop_nll``, which the evaluation's case records do not hold."""

    name: ClassVar[str] = METHOD
    records: ClassVar[dict[float, list[dict[str, Any]]]] = defaultdict(list)

    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: ROMEConfig
    ) -> Patch:
        patch = super().compute(lm, requests, config)
        self.records[config.stop_nll].extend(patch.info["requests"])
        return patch


def label(value: float) -> str:
    return f"stop_nll={value:g}"


def optimisation_summary(records: list[dict[str, Any]], value: float, max_steps: int) -> dict:
    """Steps, reached share, final NLL, ‖δ‖ and seconds over one threshold's request records."""
    steps = [r["steps"] for r in records]
    final = [r["nll"][-1] for r in records]
    return {
        "edits": len(records),
        "mean_steps": statistics.mean(steps),
        "median_steps": statistics.median(steps),
        "max_steps_used": max(steps),
        "reached": sum(nll <= value for nll in final) / len(final),
        "at_max_steps": sum(s >= max_steps for s in steps) / len(steps),
        "mean_final_nll": statistics.mean(final),
        "mean_delta_norm": statistics.mean(r["delta_norm"] for r in records),
        "mean_seconds": statistics.mean(r["seconds"] for r in records),
        "median_seconds": statistics.median(r["seconds"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=TRAIN, help="CounterFact training file")
    parser.add_argument("--n", type=int, default=40, help="number of cases, from the first")
    parser.add_argument(
        "--values", type=float, nargs="+", default=list(VALUES), help="stop_nll thresholds"
    )
    parser.add_argument(
        "--fluency-cases", type=int, default=0, help="cases measured for fluency (~12 s each)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "value_stop.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(set(args.values)) != len(args.values):
        parser.error(f"--values repeats a threshold: {args.values}")

    lm = ls.load_model()
    specs = [MethodSpec(METHOD, {"stop_nll": v}, label=label(v)) for v in args.values]
    editor = get_editor(METHOD)
    config = editor.config_for(lm)
    start = time.perf_counter()
    editor.prepare(lm, config)  # prefixes and statistics: the same for every threshold, cached
    prepare_seconds = time.perf_counter() - start

    load_before = os.getloadavg()
    cases = load_cases(args.data, args.n)
    options = EvalOptions(protocol="single", fluency_cases=args.fluency_cases)
    started = time.perf_counter()
    summary = compare(lm, cases, specs, options=options, progress=True)
    wall = time.perf_counter() - started
    optimisation = {
        label(v): optimisation_summary(RecordingROME.records[v], v, config.max_steps)
        for v in args.values
    }

    print(
        f"ROME's stop_nll on {summary.n_cases} CounterFact train cases ({args.data.name}), "
        f"layer {config.layer}, max_steps {config.max_steps}, single protocol"
    )
    extra = ("mean_steps", "reached", "mean_final_nll", "mean_delta_norm", "mean_seconds")
    print(f"{'':16}" + "".join(f"{c:>18}" for c in (*COLUMNS, *extra)))
    for name, row in summary.rows.items():
        values = {**row, **optimisation.get(name, {})}
        print(
            f"{name:16}"
            + "".join(
                f"{values[c]:>18.3f}" if c in values else f"{'-':>18}" for c in (*COLUMNS, *extra)
            )
        )
    print(
        f"one-time preparation {prepare_seconds:.1f} s; wall {wall:.0f} s; the current default is "
        f"stop_nll={ValueOptions().stop_nll:g}"
    )

    result = {
        **header_of("value_stop", args.data, summary, lm, config),
        "default_stop_nll": ValueOptions().stop_nll,
        "values": args.values,
        "rows": summary.rows,
        "optimisation": optimisation,
        "requests": {label(v): RecordingROME.records[v] for v in args.values},
        "prepare_seconds": prepare_seconds,
        "wall_seconds": wall,
        "fluency_cases": args.fluency_cases,
        "machine": machine(load_before),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
