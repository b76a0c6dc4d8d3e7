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
dropped (with a warning) when the file is read back, so a record is either whole or absent. A
damaged line elsewhere (bytes that are not a JSON record) costs that record only: the intact
records after it are kept, and the file is rewritten without it (atomically).
Whole files (summary, table, manifest) are written next to their place and renamed into it;
folders (a method's results, a sequential state, the saved patches in it) are replaced or removed
whole (:mod:`lmscalpel.core.files`), so a run killed while clearing them leaves them complete or
gone, never a ``state.json`` naming deleted weights. Opening a run folder removes what killed
writers left beside those files (their hidden temporary siblings), so a folder that holds only
such leftovers is an empty folder, and a run started there proceeds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmscalpel.core.files import (
    atomic_write_bytes,
    atomic_write_json,
    discard_folder,
    recover_folder,
)
from lmscalpel.evaluation.options import EvaluationError

log = logging.getLogger(__name__)

__all__ = ["JsonLines", "RunStore", "safe_name"]


class JsonLines:
    """An append-only file of JSON records that survives being killed mid-write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """All whole records. A trailing partial line (a crash mid-write) is cut off the file; a
        damaged line before it (not a JSON object, not UTF-8) is skipped and the file rewritten
        without it, so the intact records after it are kept."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        records: list[dict[str, Any]] = []
        kept: list[bytes] = []
        damaged = 0
        lines = raw.splitlines(keepends=True)
        partial = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        for line in lines:
            record = _record(line)
            if record is None:
                if line.strip():
                    damaged += 1
                continue
            records.append(record)
            kept.append(line)
        if partial:
            log.warning(
                "%s: dropping %d bytes of a record cut short (interrupted run)",
                self.path,
                len(partial),
            )
        if damaged:
            log.warning(
                "%s: skipping %d damaged line(s); the %d intact record(s) are kept",
                self.path,
                damaged,
                len(records),
            )
            atomic_write_bytes(self.path, b"".join(kept))
        elif partial:
            with open(self.path, "r+b") as handle:
                handle.truncate(len(raw) - len(partial))
                os.fsync(handle.fileno())
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


def _record(line: bytes) -> dict[str, Any] | None:
    """The JSON object on ``line``, or None when the line holds none (damaged or blank)."""
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return record if isinstance(record, dict) else None


def safe_name(label: str) -> str:
    """A folder name for a method label."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")
    return name or "method"


class RunStore:
    """Paths and files of one run's output folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.recover()

    def recover(self) -> None:
        """Finish what killed writers left in the folder, its method folders and their states:
        interrupted replacements are completed, dead writers' temporary siblings removed
        (:func:`~lmscalpel.core.files.recover_folder`); a live writer's are left alone."""
        methods = _subfolders(self.root)
        for folder in (self.root, *methods, *(f for m in methods for f in _subfolders(m))):
            for name in _interrupted(folder):
                recover_folder(folder / name)

    @property
    def manifest_path(self) -> Path:
        return self.root / "run.json"

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise EvaluationError(
                f"{self.manifest_path} is damaged ({error}); delete it or use another --out"
            ) from None
        if not isinstance(manifest, dict):
            raise EvaluationError(
                f"{self.manifest_path} holds no run description; delete it or use another --out"
            )
        return manifest

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


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old|trash)-")


def _interrupted(folder: Path) -> set[str]:
    """Names in ``folder`` that have hidden siblings an atomic writer makes (``.<name>.tmp-*``)."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {m["name"] for m in map(_LEFTOVER.match, names) if m}


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
