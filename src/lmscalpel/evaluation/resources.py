"""Wall time and peak memory of a block of code (an edit), for the seconds-per-edit and memory
columns of every evaluation.

On CPU a background thread samples the process's resident set size from ``/proc/self/statm``
every few milliseconds (torch releases the GIL in its kernels, so the thread sees the peaks of an
optimisation step); where ``/proc`` is missing, the process's lifetime peak from
``resource.getrusage`` is reported instead. On CUDA, torch's own peak-allocation counters are used.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MB = 1024 * 1024


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes (lifetime peak if /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Usage:
    """What a measured block used: seconds, peak memory (MiB) and peak above the start (MiB)."""

    seconds: float = 0.0
    peak_mb: float = 0.0
    overhead_mb: float = 0.0


class ResourceMeter:
    """``with ResourceMeter(device) as meter: ...`` then read ``meter.usage``."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.usage = Usage()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._start = 0.0
        self._base = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __enter__(self) -> ResourceMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak, rss_bytes())
        self.usage = Usage(
            seconds=time.perf_counter() - self._start,
            peak_mb=peak / _MB,
            overhead_mb=max(0, peak - self._base) / _MB,
        )
