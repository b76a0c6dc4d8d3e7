"""Accelerator check: ROME and MEMIT on random-initialised Llama-style models held in bfloat16.

Nothing large travels to a lent GPU machine (64 MiB at most), so the models are built in process
from a configuration: about 1B and 8B parameters (Llama-3-like shapes, vocabulary 32,000), random
weights, a small trained tokenizer (ids beyond it are simply never used). Random weights make the
edits meaningless as facts but real as work: the same key/value optimisation, statistics and
solves as on a trained model of that shape, which is what the timings and memory figures are for.

Reports, per model size: build seconds, parameters, batched scoring throughput (cases per second,
64 prompts x 1 target per call), ROME seconds per edit (statistics computed first and reported
apart), MEMIT seconds per edit in one batch of ``--memit-batch`` requests, and peak accelerator
memory (``torch.cuda.max_memory_allocated``; resident set size on the CPU). JSON to ``--out``.

    python benchmarks/device_check.py                       # on a GPU: sizes 1b,8b, about 3-4 min
    python benchmarks/device_check.py --sizes tiny --device cpu --out /tmp/dc.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmscalpel import EditRequest, edit, score_targets, wrap_model
from lmscalpel.core.clock import utc_now
from lmscalpel.testing import CORPUS, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

#: Llama-style shapes: (hidden, intermediate, layers, heads, kv heads, vocabulary)
SIZES = {
    "tiny": (64, 128, 4, 4, 2, 512),
    "1b": (2048, 8192, 16, 32, 8, 32000),
    "8b": (4096, 14336, 32, 32, 8, 32000),
}
SUBJECTS = ["Eiffel Tower", "Louvre", "Colosseum", "Big Ben", "Danielle Darrieux", "Toko Yasuda"]


def requests(n: int) -> list[EditRequest]:
    return [
        EditRequest(
            prompt=f"The {SUBJECTS[i % len(SUBJECTS)]} number {i} is located in the city of",
            subject=f"{SUBJECTS[i % len(SUBJECTS)]} number {i}",
            target_new="Rome",
        )
        for i in range(n)
    ]


def build(size: str, device: str, dtype: torch.dtype):
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return wrap_model(model.eval(), tokenizer, name=f"random-llama-{size}", device=device)


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def check(size: str, args, corpus: Path) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    lm, build_s = timed(device, lambda: build(size, device, dtype))
    layers = lm.adapter.num_layers
    row = {
        "size": size,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "dtype": args.dtype,
        "build_seconds": build_s,
    }
    prompts = [r.prompt for r in requests(64)]
    score_targets(lm, prompts[:4], [" Rome"] * 4)  # warm-up
    _, score_s = timed(device, lambda: score_targets(lm, prompts, [" Rome"] * len(prompts)))
    row["scoring_cases_per_second"] = len(prompts) / score_s

    stats = {"stats_corpus": str(corpus), "stats_samples": args.stats_samples, "prefixes": 0}
    rome = {"layer": layers // 4, **stats}
    first = requests(1)
    (_, rome_stats_s) = timed(device, lambda: edit(lm, first, "rome", rome, apply=False))
    row["rome_first_edit_with_statistics_seconds"] = rome_stats_s
    times = []
    for request in requests(args.rome_edits):
        _, seconds = timed(device, lambda r=request: edit(lm, [r], "rome", rome, apply=False))
        times.append(seconds)
    row["rome_seconds_per_edit"] = statistics.median(times)

    memit = {"layers": list(range(layers // 4, layers // 4 + 3)), **stats}
    batch = requests(args.memit_batch)
    edit(lm, batch[:1], "memit", memit, apply=False)  # statistics of the three layers, once
    patch, memit_s = timed(device, lambda: edit(lm, batch, "memit", memit, apply=False))
    row["memit_batch"] = len(batch)
    row["memit_seconds_per_edit"] = memit_s / len(batch)
    row["memit_patch_parameters"] = len(patch.deltas)
    row["peak_memory_mb"] = peak_mb(device)
    return row  # the model goes with this frame; main() empties the accelerator's cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1b,8b", help="comma-separated: tiny, 1b, 8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--stats-samples", type=int, default=4000)
    parser.add_argument("--rome-edits", type=int, default=3)
    parser.add_argument("--memit-batch", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/device_check.json")
    args = parser.parse_args()

    rows, failures = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        corpus.write_text("\n\n".join(CORPUS * 20))
        for size in args.sizes.split(","):
            try:
                rows.append(check(size, args, corpus))
            except Exception as error:  # a benchmark reports what failed and goes on
                failures[size] = f"{type(error).__name__}: {error}"
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1] if rows else failures, indent=1), flush=True)
    result = {
        "benchmark": "device_check",
        "date": utc_now(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": rows,
        "failures": failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    header = f"{'size':>5} {'params':>8} {'score c/s':>10} {'ROME s/edit':>12} {'MEMIT s/edit':>13} {'peak MB':>9}"
    print(header)
    for r in rows:
        print(
            f"{r['size']:>5} {r['parameters'] / 1e9:>7.2f}B {r['scoring_cases_per_second']:>10.1f} "
            f"{r['rome_seconds_per_edit']:>12.2f} {r['memit_seconds_per_edit']:>13.2f} "
            f"{r['peak_memory_mb']:>9.0f}"
        )
    print(f"-> {args.out}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
