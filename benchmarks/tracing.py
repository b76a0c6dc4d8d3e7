"""Causal tracing speed on the embedded model: seconds per prompt for each kind of restoration.

Traces a few known facts (prompts of about 10-15 tokens) with 10 noise samples over all 30 layers
and every token, and compares, within one run, the default (reusing the corrupted run's keys and
values of the tokens before each restored one) with recomputing whole sequences, in float32 and in
bfloat16. Prints a table and writes ``benchmarks/results/tracing.json``.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/tracing.py [--facts 2]

On a busy shared CPU, one thread is much faster than two (threads wait on each other); times
are reported as process CPU seconds as well as wall seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmscalpel import load_model
from lmscalpel.locate import KINDS, default_knowns_path, trace
from lmscalpel.locate.aggregate import load_knowns, model_knows
from lmscalpel.tokens import encode_prompt

RESULTS = Path(__file__).parent / "results" / "tracing.json"
SETTINGS = {
    "default (float32)": dict(precision="float32", reuse_prefix=True),
    "whole sequences (float32)": dict(precision="float32", reuse_prefix=False),
    "default (bfloat16)": dict(precision="bfloat16", reuse_prefix=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=2, help="known facts to trace")
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()

    lm = load_model()
    knowns = load_knowns(default_knowns_path())
    facts = [f for f, ok in zip(knowns[:40], model_knows(lm, knowns[:40])) if ok][: args.facts]
    rows = []
    reference = {}
    for fact in facts:
        n_tokens = len(encode_prompt(lm, fact.prompt))
        for setting, options in SETTINGS.items():
            for kind in KINDS:
                wall, cpu = time.perf_counter(), time.process_time()
                result = trace(
                    lm, fact.prompt, fact.subject, fact.attribute, kinds=kind,
                    samples=args.samples, **options,
                )  # fmt: skip
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                key = (fact.known_id, kind)
                reference.setdefault(key, result.restored[kind])
                diff = float((result.restored[kind] - reference[key]).abs().nan_to_num().max())
                rows.append(
                    dict(
                        known_id=fact.known_id, tokens=n_tokens, setting=setting, kind=kind,
                        wall_s=round(wall, 2), cpu_s=round(cpu, 2), max_abs_diff=diff,
                    )
                )  # fmt: skip
                print(
                    f"{fact.known_id:>5} {n_tokens:>3} tok  {setting:<26} {kind:<6} "
                    f"wall {wall:7.1f} s  cpu {cpu:7.1f} s  max |dP| vs default {diff:.4f}",
                    flush=True,
                )
    summary = {}
    for setting in SETTINGS:
        for kind in KINDS:
            picked = [r for r in rows if r["setting"] == setting and r["kind"] == kind]
            summary[f"{setting} / {kind}"] = {
                "mean_wall_s": sum(r["wall_s"] for r in picked) / len(picked),
                "mean_cpu_s": sum(r["cpu_s"] for r in picked) / len(picked),
            }
    print("\nseconds per prompt (mean over facts):")
    for name, value in summary.items():
        print(f"  {name:<40} wall {value['mean_wall_s']:7.1f}  cpu {value['mean_cpu_s']:7.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": lm.name,
                "layers": lm.adapter.num_layers,
                "samples": args.samples,
                "threads": torch.get_num_threads(),
                "rows": rows,
                "summary": summary,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
