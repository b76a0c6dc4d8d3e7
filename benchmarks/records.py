"""What every benchmark's JSON says about its run: what was measured on which model, and the
machine it ran on (these machines are shared and noisy, so the load is part of the record)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from lmscalpel.core.clock import utc_now


def run_header(benchmark: str, data: Path, summary: Any, lm: Any, config: Any) -> dict[str, Any]:
    """The fields that open a single-protocol benchmark's result: name, date, data file, case
    count, model and the method's configuration."""
    return {
        "benchmark": benchmark,
        "date": utc_now(),
        "data": str(data.name),
        "n_cases": summary.n_cases,
        "protocol": "single",
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "config": config.to_dict(),
    }


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
