"""Text corpora the benchmarks build at run time from the shared data (read by path, never
copied into the project)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "counterfact" / "train.json"


def counterfact_corpus(folder: Path, skip: int = 0, source: Path = TRAIN) -> Path:
    """CounterFact prompts with their true answers, eight records per document, from
    ``source[skip:]``, written to ``folder/counterfact-train-corpus.jsonl`` (a fixed name and
    content: the same corpus id, hence the same cached statistics, on every run)."""
    records = json.loads(source.read_text())[skip:]
    path = folder / "counterfact-train-corpus.jsonl"
    with path.open("w") as handle:
        for i in range(0, len(records), 8):
            text = " ".join(
                f"{r['prompt']} {r['ground_truth']}. {r['rephrase_prompt']} {r['ground_truth']}. "
                f"{r['locality_prompt']} {r['locality_ground_truth']}."
                for r in records[i : i + 8]
            )
            handle.write(json.dumps({"text": text}) + "\n")
    return path
