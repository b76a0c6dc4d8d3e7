"""The output folder of a run, written so that a killed run resumes and never corrupts a file.

Layout of ``out/``::

    run.json                  what the run is (cases, model, settings, methods): a resumed run
                              must match it
    baseline.jsonl            one line per case: its measurement before any edit
    <method>/cases.jsonl      one line per case: measurement after the edit, metrics, time, memory
    <method>/checkpoints.jsonl  sequential protocol: the retention curve, one line per checkpoint
    <method>/state/           sequential protocol: the accumulated edits, to resume mid-sequence
    summary.json  table.md  metrics.png  retention.png

Records are appended one line at a time, flushed and fsynced; a line cut short by a crash is
dropped (with a warning) when the file is read back, so a record is either whole or absent.
Whole files (summary, table, manifest) are written next to their place and renamed into it;
folders (a method's results, a sequential state, the saved patches in it) are replaced or removed
whole (:mod:`lmscalpel.core.files`), so a run killed while clearing them leaves them complete or
gone, never a ``state.json`` naming deleted weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmscalpel.core.files import atomic_write_json, discard_folder

log = logging.getLogger(__name__)

__all__ = ["JsonLines", "RunStore", "safe_name"]


class JsonLines:
    """An append-only file of JSON records that survives being killed mid-write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """All whole records; a trailing partial line (a crash mid-write) is cut off the file."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        records, good_end = [], 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end += len(line)
        if good_end < len(raw):
            log.warning(
                "%s: dropping %d bytes of a record cut short (interrupted run)",
                self.path,
                len(raw) - good_end,
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
        return records

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with open(self.path, "ab") as handle:
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    def by_key(self) -> dict[str, dict[str, Any]]:
        """The last record of each ``key`` (a redone case replaces an older record)."""
        return {r["key"]: r for r in self.read() if "key" in r}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.read())


def safe_name(label: str) -> str:
    """A folder name for a method label."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")
    return name or "method"


class RunStore:
    """Paths and files of one run's output folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "run.json"

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, data)

    @property
    def baseline(self) -> JsonLines:
        return JsonLines(self.root / "baseline.jsonl")

    def method_dir(self, label: str) -> Path:
        return self.root / safe_name(label)

    def cases(self, label: str) -> JsonLines:
        return JsonLines(self.method_dir(label) / "cases.jsonl")

    def checkpoints(self, label: str) -> JsonLines:
        return JsonLines(self.method_dir(label) / "checkpoints.jsonl")

    def state_dir(self, label: str) -> Path:
        return self.method_dir(label) / "state"

    def clear_method(self, label: str) -> None:
        """Remove a method's results (its folder), whole: a crash leaves them all or none."""
        discard_folder(self.method_dir(label))

    def clear_state(self, label: str) -> None:
        """Remove a method's saved sequential state, whole (it is only needed to resume)."""
        discard_folder(self.state_dir(label))
