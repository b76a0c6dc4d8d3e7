"""MEND on CounterFact: a trained editor against the untrained one, a gradient step of the same
size, and ROME.

    .venv/bin/lmscalpel train-editor --method mend \
        --data ../shared/data/counterfact/train.json --out runs/mend-smollm2 --threads 1
    .venv/bin/python benchmarks/mend.py --editor runs/mend-smollm2

Rows (single-edit protocol, each case edited on the pristine model and reverted):

* ``mend`` — the trained editor, at the step scale chosen on held-out records when it was trained;
* ``mend, step xS (NS-matched)`` — the same editor at the step scale whose held-out
  neighbourhood success is closest to the untrained editor's (see :func:`locality_matched_row`);
* ``mend (untrained)`` — the same network before meta-training (identity on standardised (u, δ),
  preconditioned like the trained one, the calibrated initial step size): what training adds;
* ``gradient step (same size)`` — the plain gradient of the edit loss, rescaled matrix by matrix to
  the trained editor's ΔW norm: what the learned direction adds;
* ``rome`` — when the method is registered in this checkout;
* any ``--also LABEL=DIR[@SCALE]``: other editors, or the trained one with a smaller step.

Metrics come from :mod:`lmscalpel.evaluation` (ES, PS, NS, fluency, seconds per edit). Writes
``benchmarks/results/mend.json`` and ``mend.md``; the evaluation's per-case records stay under
``--run`` (resumable; the folder ``benchmarks/rome.py`` uses, so ROME's row is computed once).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import lmscalpel as ls
from lmscalpel.evaluation import EvalOptions, MethodSpec, compare, load_cases, read_dataset
from lmscalpel.methods.mend import (
    MENDTrainConfig,
    editor_digest,
    read_editor_config,
    save_editor,
)
from lmscalpel.methods.mend.train import split_records, untrained_editor

RESULTS = Path(__file__).parent / "results"


def save_untrained_editor(lm: ls.LoadedModel, trained: Path, folder: Path) -> Path:
    """The trained editor's starting point: same matrices, statistics and initial step size."""
    meta = read_editor_config(trained)
    if (folder / "editor.json").is_file():
        return folder
    training = meta["training"]
    config = MENDTrainConfig.from_dict(training["config"], lm.model_type)
    records = [r for case in read_dataset(training["data"]).cases for r in case.requests]
    train, _ = split_records(records, config)
    network, calibration = untrained_editor(lm, train, config)
    return save_editor(network, lm, folder, {"untrained_of": str(trained), **calibration})


def locality_matched_row(editor: Path, training: dict) -> list[MethodSpec]:
    """The trained editor at the step scale whose held-out neighbourhood success (from the scan
    made when it was trained) is closest to the untrained editor's: the two compared at equal
    locality. Nothing when that is the default scale already."""
    scan = {float(s): r for s, r in training.get("step_scale_scan", {}).items()}
    floor = training.get("untrained_validation", {}).get("ns")
    if not scan or floor is None:
        return []
    scale = min(scan, key=lambda s: (abs(scan[s]["ns"] - floor), -s))
    if scale == training.get("step_scale", 1.0):
        return []
    config = {"editor": str(editor), "step_scale": scale}
    return [MethodSpec("mend", config, label=f"mend, step x{scale} (NS-matched)")]


def interleaved_timing(
    lm: ls.LoadedModel, cases, methods: dict[str, tuple[str, dict]], n: int = 10
) -> dict[str, dict[str, float]]:
    """Seconds per edit (wall and CPU) of each method on the same ``n`` cases, the methods
    alternating case by case so that a busy machine slows them alike."""
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in methods}
    for case in cases[:n]:
        for label, (method, config) in methods.items():
            wall, cpu = time.perf_counter(), time.process_time()
            ls.edit(lm, list(case.requests), method=method, config=config, apply=False)
            times[label]["wall"].append(time.perf_counter() - wall)
            times[label]["cpu"].append(time.process_time() - cpu)
    return {
        label: {
            "median_wall_s": statistics.median(t["wall"]),
            "median_cpu_s": statistics.median(t["cpu"]),
        }
        for label, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--editor", type=Path, default=Path("runs/mend-smollm2"))
    parser.add_argument("--data", default="../shared/data/counterfact/edit.json")
    parser.add_argument("--n", type=int, default=200, help="first N cases")
    parser.add_argument("--fluency-cases", type=int, default=100)
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench-mend"), help="the untrained editor"
    )
    parser.add_argument(
        "--run",
        type=Path,
        default=Path("runs/bench-counterfact200"),
        help="evaluation records (resumable; shared with benchmarks/rome.py, so ROME runs once)",
    )
    parser.add_argument("--no-rome", action="store_true", help="leave ROME out")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=DIR[@SCALE]",
        help="another trained editor (optionally with a step_scale) to add as a row (repeat)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = ls.load_model()
    trained = read_editor_config(args.editor)
    digest = editor_digest(args.editor)[:12]
    untrained = save_untrained_editor(lm, args.editor, args.out / f"untrained-of-{digest}")
    specs = [
        MethodSpec("mend", {"editor": str(args.editor)}, label="mend"),
        MethodSpec("mend", {"editor": str(untrained)}, label="mend (untrained)"),
        MethodSpec(
            "mend",
            {"editor": str(args.editor), "direction": "gradient"},
            label="gradient step (same size)",
        ),
    ]
    specs += locality_matched_row(args.editor, trained["training"])
    also = {}
    for item in args.also:
        label, _, folder = item.partition("=")
        folder, _, scale = folder.partition("@")
        also[label] = folder
        read_editor_config(folder)
        config = {"editor": folder, **({"step_scale": float(scale)} if scale else {})}
        specs.append(MethodSpec("mend", config, label=label))
    rome = "rome" in ls.available_methods() and not args.no_rome
    if rome:
        specs.append(MethodSpec("rome"))
    cases = load_cases(args.data, n=args.n)
    options = EvalOptions(fluency_cases=args.fluency_cases)
    started = time.perf_counter()
    summary = compare(lm, cases, specs, options=options, out=args.run)
    wall = time.perf_counter() - started

    timed = {"mend": ("mend", {"editor": str(args.editor)})}
    if rome:
        timed["rome"] = ("rome", {})
    timing = interleaved_timing(lm, cases, timed)
    if rome:
        ratio = timing["rome"]["median_wall_s"] / timing["mend"]["median_wall_s"]
        timing["rome_over_mend_wall"] = round(ratio, 1)

    training = trained["training"]
    result = {
        "interleaved_timing_first_10_cases": timing,
        "model": lm.name,
        "data": args.data,
        "n_cases": summary.n_cases,
        "fluency_cases": args.fluency_cases,
        "rows": summary.rows,
        "rome": "included" if rome else "not registered in this checkout (or --no-rome)",
        "editor": {
            "folder": str(args.editor),
            "training_data": training.get("data"),
            "train_records": training.get("train_records"),
            "val_records": training.get("val_records"),
            "steps": training.get("steps"),
            "training_minutes": round(training.get("seconds", 0) / 60, 1),
            "command_minutes": round(training.get("command_seconds", 0) / 60, 1),
            "stopped": training.get("stopped"),
            "unedited_validation": training.get("unedited_validation"),
            "untrained_validation": training.get("untrained_validation"),
            "best_validation": training.get("best_validation"),
            "step_scale": training.get("step_scale"),
            "step_scale_scan": training.get("step_scale_scan"),
            "config": training.get("config"),
        },
        "also": {
            label: {
                "folder": folder,
                "edit_weight": meta["training"]["config"]["edit_weight"],
                "loc_weight": meta["training"]["config"]["loc_weight"],
                "steps": meta["training"]["steps"],
                "best_validation": meta["training"]["best_validation"],
            }
            for label, folder in also.items()
            for meta in [read_editor_config(folder)]
        },
        "benchmark_minutes": round(wall / 60, 1),
        "threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mend.json").write_text(json.dumps(result, indent=2))
    ed = result["editor"]
    lines = [
        "# MEND on CounterFact (SmolLM2-135M)",
        "",
        f"First {summary.n_cases} cases of `{args.data}`, single-edit protocol; fluency on the "
        f"first {args.fluency_cases} cases. Editor trained on {ed['train_records']} records of "
        f"`{ed['training_data']}` ({ed['val_records']} held out), {ed['steps']} steps in "
        f"{ed['training_minutes']} min ({ed['command_minutes']} min for the whole command; "
        f"stopped: {ed['stopped']}). ROME: {result['rome']}.",
        "",
        summary.markdown(),
        "",
        "Seconds per edit, the methods alternating on the first 10 cases (medians): "
        + ", ".join(
            f"{label} {t['median_wall_s']:.2f} s wall / {t['median_cpu_s']:.2f} s CPU"
            for label, t in timing.items()
            if isinstance(t, dict)
        )
        + (f"; ROME / MEND = {timing['rome_over_mend_wall']}x." if rome else "."),
        "",
    ]
    (RESULTS / "mend.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
