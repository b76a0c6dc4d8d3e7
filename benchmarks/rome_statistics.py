"""Which text should ROME's key statistics C = E[k kᵀ] come from? Measured on locality.

Compares, on the same CounterFact *training* cases (``train.json[:n]``; never ``edit.json``, which
the ROME benchmark uses), single protocol, through :mod:`lmscalpel.evaluation`:

* ``identity``       — no statistics (C = I): the update direction is k* itself;
* ``model-sampled``  — the default: 20 000 tokens of text sampled from the model itself (needs
  nothing but the model);
* ``counterfact``    — 20 000 tokens of text built from benchmark prompts with their true answers
  (``train.json[1000:]``, disjoint from the measured cases): the closest match to the
  neighbourhood prompts that NS measures, but a corpus only a user with the benchmark has.

Prints ES, PS, NS, NM (neighbourhood margin) and locality_unchanged per corpus; writes JSON
(default benchmarks/results/rome_statistics.json).

    nice -n 10 .venv/bin/python benchmarks/rome_statistics.py --n 48
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import lmscalpel as ls
from corpora import TRAIN, counterfact_corpus
from lmscalpel.evaluation import EvalOptions, MethodSpec, compare, load_cases
from lmscalpel.methods import get_editor

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("ES", "PS", "NS", "NM", "locality_unchanged", "score", "seconds_per_edit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "rome-statistics")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "rome_statistics.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = ls.load_model()
    cases = load_cases(TRAIN, args.n)
    with tempfile.TemporaryDirectory() as scratch:
        # a fixed name and content: the same corpus id (and cached statistics) on every run
        corpus = counterfact_corpus(Path(scratch), skip=max(1000, args.n))
        specs = [
            MethodSpec("rome", {"statistics": False}, label="identity"),
            MethodSpec("rome", {"stats_samples": args.samples}, label="model-sampled"),
            MethodSpec(
                "rome",
                {"stats_corpus": str(corpus), "stats_samples": args.samples},
                label="counterfact",
            ),
        ]
        for spec in specs:  # statistics before the clock starts
            editor = get_editor(spec.method, spec.config)
            editor.prepare(lm, editor.config_for(lm))
        summary = compare(
            lm,
            cases,
            specs,
            options=EvalOptions(protocol="single", fluency_cases=0, exact_match=False),
            out=args.run,
        )
    print(f"ROME's key statistics on {summary.n_cases} CounterFact train cases")
    print(f"{'':15}" + "".join(f"{c:>20}" for c in COLUMNS))
    for name, row in summary.rows.items():
        print(
            f"{name:15}"
            + "".join(f"{row[c]:>20.3f}" if c in row else f"{'-':>20}" for c in COLUMNS)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "rome_statistics",
                "data": "counterfact/train.json",
                "n_cases": summary.n_cases,
                "samples": args.samples,
                "layer": get_editor("rome")
                .config_for(lm)
                .edit_layer(lm.adapter.num_layers, lm.fingerprint),
                "rows": summary.rows,
                "torch_threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
