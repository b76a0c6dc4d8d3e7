"""Pre-edit evaluation speed: the batched evaluator against one-case-at-a-time evaluation.

Measures, in one run on the embedded model, how many CounterFact cases per second are evaluated
before any edit (ES/PS/NS log-probabilities, token accuracy, locality top-1 tokens and, unless
``--no-exact-match``, exact match by greedy generation):

* ``batched`` — :func:`lmscalpel.evaluation.measure` over all cases at once: pairs of every case
  in one scoring call (a prompt's forward pass serves all its targets, shorter fed sequences are
  read off longer rows, batches of 64 prompts), generation only where teacher forcing has not
  already decided the exact match, batched.
* ``one case at a time`` — the naive evaluator that per-case benchmark code usually is (EasyEdit
  style): for each case, one forward pass per (prompt, target) pair and one ``generate`` call per
  prompt whose exact match is asked.
* ``measure() per case`` — for reference, our evaluator fed one case at a time (sharing within a
  case, no batching across cases): the single protocol's situation after an edit.

The baselines run on the first ``--baseline-cases`` cases (their rate is what is compared; running
them on all 1,000 would take an hour here); their log-probabilities are checked against the batched
ones on those cases. Prints a table, writes JSON (default benchmarks/results/eval_speed.json).

    nice -n 10 .venv/bin/python benchmarks/eval_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import lmscalpel as ls
from lmscalpel.core.clock import utc_now
from lmscalpel.evaluation import EvalOptions, load_cases, measure
from lmscalpel.evaluation.measure import match_tokens, probes_of
from lmscalpel.evaluation.metrics import starts_with_answer
from lmscalpel.scoring import generate, score_targets

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "edit.json"


def naive(lm, case, exact_match: bool) -> dict:
    """One case, one forward pass per (prompt, target), one generate call per prompt."""
    out = []
    for probe in probes_of(case):
        entry = {}
        for role in ("wanted", "other"):
            target = getattr(probe, role)
            if target is not None:
                (score,) = score_targets(lm, [probe.prompt], [target])
                entry[role] = score.mean_logprob
        if exact_match and probe.answers is not None:
            tokens = match_tokens(lm, probe.prompt, probe.answers)
            (text,) = generate(lm, [probe.prompt], max_new_tokens=tokens)
            entry["match"] = starts_with_answer(text, probe.answers)
        out.append(entry)
    return out


def batched_logprobs(measurement: dict) -> list[float]:
    """The log-probabilities of a measurement in :func:`probes_of` order."""
    values = []
    for role in ("edit", "paraphrase", "locality", "portability"):
        for e in measurement[role]:
            if role in ("edit", "paraphrase"):
                values += [e["new"], *([e["true"]] if e["true"] is not None else [])]
            else:
                other = e["new"] if role == "locality" else e["before"]
                values += [e["answer"], *([other] if other is not None else [])]
    return values


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--baseline-cases", type=int, default=100)
    parser.add_argument("--no-exact-match", dest="exact_match", action="store_false")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/eval_speed.json")
    args = parser.parse_args()

    lm = ls.load_model()
    cases = load_cases(args.data, args.n)
    few = cases[: args.baseline_cases]
    options = EvalOptions(exact_match=args.exact_match, fluency_cases=0)
    measure(lm, cases[:4], options)  # warm-up
    naive(lm, cases[0], args.exact_match)

    found, t_batched = timed(lambda: measure(lm, cases, options))
    slow, t_naive = timed(lambda: [naive(lm, c, args.exact_match) for c in few])
    _, t_per_case = timed(lambda: [measure(lm, [c], options) for c in few])

    diff = max(
        abs(a - b)
        for case, entries in zip(few, slow)
        for a, b in zip(
            batched_logprobs(found[case.key]),
            [v for e in entries for v in (e.get("wanted"), e.get("other")) if v is not None],
        )
    )
    matches_agree = None
    if args.exact_match:
        batched_matches = [
            e["match"]
            for c in few
            for role in ("edit", "paraphrase", "portability")
            for e in found[c.key][role]
        ]
        naive_matches = [e["match"] for entries in slow for e in entries if "match" in e]
        matches_agree = batched_matches == naive_matches

    rows = [
        ("batched", len(cases), t_batched),
        ("one case at a time (naive)", len(few), t_naive),
        ("measure() per case", len(few), t_per_case),
    ]
    rate = {name: n / t for name, n, t in rows}
    base = rate["batched"]
    print(f"pre-edit evaluation of CounterFact cases, exact match: {args.exact_match}, "
          f"torch threads: {torch.get_num_threads()}")  # fmt: skip
    print(f"{'evaluator':<30} {'cases':>6} {'seconds':>9} {'cases/s':>8} {'batched is':>11}")
    for name, n, t in rows:
        print(f"{name:<30} {n:>6} {t:>9.1f} {n / t:>8.2f} {base / rate[name]:>10.1f}x")
    print(f"max |log-prob difference| batched vs naive on {len(few)} cases: {diff:.2e}; "
          f"exact matches agree: {matches_agree}")  # fmt: skip

    result = {
        "benchmark": "eval_speed",
        "when": utc_now(),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "model": lm.name,
        "data": str(args.data.name),
        "exact_match": args.exact_match,
        "cases": len(cases),
        "baseline_cases": len(few),
        "results": [{"evaluator": name, "cases": n, "seconds": t, "cases_per_second": n / t}
                    for name, n, t in rows],
        "speedup_vs_naive": base / rate["one case at a time (naive)"],
        "speedup_vs_measure_per_case": base / rate["measure() per case"],
        "max_abs_logprob_difference": diff,
        "exact_matches_agree": matches_agree,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
