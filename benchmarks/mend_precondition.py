"""What preconditioning does to an untrained MEND editor: its edit/locality trade-off on held-out
CounterFact training records, with and without C⁻¹ on the input factor.

    .venv/bin/python benchmarks/mend_precondition.py --threads 1

Both editors are built and calibrated exactly as ``lmscalpel train-editor --method mend`` does
before its first step (same records, same held-out slice, same statistics and step-size line
search); then each is validated at a range of multiples of its calibrated step size, so the two
curves can be compared at equal edit success. Validation is training's: CounterFact's ES, PS and
NS on the held-out records (:func:`lmscalpel.methods.mend.train.validate`). Writes
``benchmarks/results/mend_precondition.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import lmscalpel as ls
from lmscalpel.evaluation import read_dataset
from lmscalpel.methods.mend import MENDTrainConfig, edited_parameter_names
from lmscalpel.methods.mend.grads import lowest_layer
from lmscalpel.methods.mend.train import LowerCache, split_records, untrained_editor, validate

RESULTS = Path(__file__).parent / "results"
SCALES = (0.25, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0, 8.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/counterfact/train.json")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = ls.load_model()
    records = [r for case in read_dataset(args.data).cases for r in case.requests]
    rows, cache, started = [], None, time.perf_counter()
    for precondition in (False, True):
        config = MENDTrainConfig(precondition=precondition)
        train, val = split_records(records, config)
        if cache is None:  # both editors edit the same weights: one cache of the blocks below
            names = edited_parameter_names(lm.adapter, config.layers, config.matrices)
            cache = LowerCache(lm, lowest_layer(lm.adapter, names))
        network, calibration = untrained_editor(lm, train, config, cache)
        for scale in SCALES:
            result = validate(lm, network, val, config, step_scale=scale, cache=cache)
            rows.append(
                {
                    "precondition": precondition,
                    "step_scale": scale,
                    "step_size": calibration["initial_step"] * scale,
                    **{k: result[k] for k in ("es", "ps", "ns", "dd", "score")},
                }
            )
            print(
                f"precondition={precondition!s:5} x{scale:<4} es={result['es']:.3f} "
                f"ps={result['ps']:.3f} ns={result['ns']:.3f} score={result['score']:.3f}",
                flush=True,
            )
    result = {
        "model": lm.name,
        "data": args.data,
        "held_out_records": len(val),
        "rows": rows,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mend_precondition.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Untrained MEND editor: with and without preconditioning (SmolLM2-135M)",
        "",
        f"{len(val)} held-out records of `{args.data}` (training's validation slice); each "
        "editor calibrated as `train-editor` does, then validated at multiples of its step size.",
        "",
        "| preconditioned | step scale | ES | PS | NS | locality drawdown | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {'yes' if r['precondition'] else 'no'} | {r['step_scale']} | {r['es']:.3f} | "
            f"{r['ps']:.3f} | {r['ns']:.3f} | {r['dd']:.3f} | {r['score']:.3f} |"
            for r in rows
        ),
    ]
    (RESULTS / "mend_precondition.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
