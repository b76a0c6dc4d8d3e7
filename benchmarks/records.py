"""What every benchmark's JSON says about its run: what was measured on which model, and the
machine it ran on (these machines are shared and noisy, so the load is part of the record)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from lmscalpel.core.clock import utc_now


def run_header(
    benchmark: str,
    data: Path,
    n_cases: int,
    model: str | None,
    fingerprint: str | None,
    config: dict[str, Any],
    protocol: str = "single",
) -> dict[str, Any]:
    """The fields that open a benchmark's result: name, date, data file, case count, protocol,
    model and the configuration of its method (or of each method)."""
    return {
        "benchmark": benchmark,
        "date": utc_now(),
        "data": str(data.name),
        "n_cases": n_cases,
        "protocol": protocol,
        "model": model,
        "model_fingerprint": fingerprint,
        "config": config,
    }


def header_of(benchmark: str, data: Path, summary: Any, lm: Any, config: Any) -> dict[str, Any]:
    """:func:`run_header` of a one-method evaluation: its summary, model and config object."""
    return run_header(
        benchmark, data, summary.n_cases, lm.name, lm.fingerprint, config.to_dict(),
        summary.protocol,
    )  # fmt: skip


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """CPUs, torch threads, load before and after, versions."""
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def require_data(path: Path) -> None:
    """Stop with a clear message when the shared data file is not beside the project."""
    if not path.is_file():
        raise SystemExit(f"no data at {path}: the shared data folder belongs beside the project")
