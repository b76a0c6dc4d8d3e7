"""The service's journal: every edit and revert, on disk before the client hears it is done.

Layout of a journal folder::

    journal.json          which model it belongs to (name, base fingerprint)
    entries/000001.json   one entry per event, in order (written atomically and flushed)
    patches/<id>/         the patch of each applied edit (Patch.save: whole or absent)
    lock                  held (flock) by the one server using the journal

An edit is recorded by saving its patch folder, then writing its entry; the entry is the commit
point. A server killed before the entry is written leaves at most an orphan patch folder (removed
on the next start) and the edit counts as never made: it was never acknowledged. A revert entry
names the edits it reverted (several, for a cascade) in one atomic file, so a cascade is journaled
whole or not at all.

On start, :meth:`Journal.replay` re-applies the applied edits in order to the freshly loaded base
model and reverts what was reverted: the weights end exactly where they were (each replayed patch
is checked against the digests its entry recorded). A journal made for another model (another
base fingerprint) is refused with :class:`JournalError`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from lmscalpel.core.clock import utc_now
from lmscalpel.core.files import atomic_write_json, discard_folder, fsync_path
from lmscalpel.models.fingerprint import tensor_digest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch, PatchError

log = logging.getLogger(__name__)

FORMAT = "lmscalpel-journal"
FORMAT_VERSION = 1
HEADER_FILE = "journal.json"
ENTRIES = "entries"
PATCHES = "patches"
LOCK_FILE = "lock"


class JournalError(RuntimeError):
    """The journal cannot be used: another model's, damaged, or in use by another server."""


def now() -> str:
    return utc_now("milliseconds")


def folder_digest(folder: Path) -> str:
    """SHA-256 over the names and bytes of the files in ``folder`` (sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def weight_digests(lm: LoadedModel, names: list[str]) -> dict[str, str]:
    return {name: tensor_digest(lm.model.get_parameter(name)) for name in names}


class Journal:
    """The journal folder of one server and one base model (see the module docstring).

    Opening it takes an exclusive lock (a second server on the same folder is refused), creates
    the folder for a new journal, checks that an existing one belongs to ``fingerprint``, reads
    its entries and removes leftovers of a killed writer (orphan patch folders, temporary files).
    """

    def __init__(self, folder: str | os.PathLike, model_name: str, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / LOCK_FILE, "a+")  # noqa: SIM115 (held while open)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise JournalError(f"journal {self.folder} is in use by another server") from None
        try:
            self._open(model_name, fingerprint)
        except BaseException:
            self.close()
            raise

    def _open(self, model_name: str, fingerprint: str) -> None:
        header_path = self.folder / HEADER_FILE
        if header_path.is_file():
            header = self._read_json(header_path)
            if header.get("format") != FORMAT:
                raise JournalError(f"{header_path} is not an lmscalpel journal")
            if header.get("format_version", 0) > FORMAT_VERSION:
                raise JournalError(f"{self.folder} has a newer journal format; upgrade lmscalpel")
            if header.get("model_fingerprint") != fingerprint:
                raise JournalError(
                    f"journal {self.folder} belongs to model {header.get('model_name')!r} "
                    f"(fingerprint {header.get('model_fingerprint')}), not to {model_name!r} "
                    f"(fingerprint {fingerprint}); use another --journal folder"
                )
        else:
            strangers = [
                p.name
                for p in self.folder.iterdir()
                if p.name not in (LOCK_FILE, ENTRIES, PATCHES) and not p.name.startswith(".")
            ]
            if strangers:
                raise JournalError(
                    f"{self.folder} is not empty and not a journal (holds {sorted(strangers)[:5]})"
                )
            header = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "model_name": model_name,
                "model_fingerprint": fingerprint,
                "created": now(),
            }
            atomic_write_json(header_path, header)
            fsync_path(self.folder)
        self.header = header
        (self.folder / ENTRIES).mkdir(exist_ok=True)
        (self.folder / PATCHES).mkdir(exist_ok=True)
        self.entries = self._read_entries()
        self._clean()

    # ---- reading ---------------------------------------------------------------------------
    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise JournalError(f"{path} cannot be read: {error}") from None
        if not isinstance(data, dict):
            raise JournalError(f"{path} does not hold a JSON object")
        return data

    def _read_entries(self) -> list[dict[str, Any]]:
        entries = []
        for path in sorted((self.folder / ENTRIES).iterdir()):
            if path.name.startswith("."):
                continue
            if not (path.suffix == ".json" and path.stem.isdigit()):
                raise JournalError(f"unexpected file {path} in the journal")
            entry = self._read_json(path)
            if entry.get("seq") != int(path.stem) or entry.get("op") not in ("edit", "revert"):
                raise JournalError(f"{path} is not a journal entry")
            entries.append(entry)
        for i, entry in enumerate(entries, start=1):
            if entry["seq"] != i:
                raise JournalError(f"journal {self.folder}: entry {i} is missing")
        return entries

    def _clean(self) -> None:
        """Remove what a killed writer left: temporary entry files and patch folders without an
        entry (their edit was never acknowledged)."""
        for path in (self.folder / ENTRIES).iterdir():
            if path.name.startswith("."):
                path.unlink(missing_ok=True)
        known = {e["id"] for e in self.entries if e["op"] == "edit"}
        for path in (self.folder / PATCHES).iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
            elif path.name not in known:
                log.info("removing patch %s: its edit was never journaled", path.name)
                discard_folder(path)

    # ---- writing ---------------------------------------------------------------------------
    def new_id(self) -> str:
        return f"e{len(self.entries) + 1:06d}-{secrets.token_hex(4)}"

    def patch_folder(self, edit_id: str) -> Path:
        return self.folder / PATCHES / edit_id

    def _append(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"seq": len(self.entries) + 1, **entry}
        path = self.folder / ENTRIES / f"{entry['seq']:06d}.json"
        atomic_write_json(path, entry)
        fsync_path(path.parent)
        self.entries.append(entry)
        return entry

    def record_edit(
        self, edit_id: str, patch: Patch | None, entry: dict[str, Any]
    ) -> dict[str, Any]:
        """Save ``patch`` (an applied one; ``None`` for a rejected edit) and write its entry.
        Returns the entry as written (with ``seq`` and the patch folder's digest)."""
        entry = {"op": "edit", "id": edit_id, **entry}
        if patch is not None:
            folder = self.patch_folder(edit_id)
            patch.save(folder)
            entry.setdefault("digests", {})["patch"] = folder_digest(folder)
        return self._append(entry)

    def record_revert(self, ids: list[str], requested: str) -> dict[str, Any]:
        """Write one entry for the edits reverted together (newest first)."""
        return self._append(
            {"op": "revert", "ids": list(ids), "requested": requested, "time": now()}
        )

    def forget_patch(self, edit_id: str) -> None:
        """Remove the patch folder of an edit whose entry could not be written."""
        discard_folder(self.patch_folder(edit_id))

    # ---- views -----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """How many entries changed the model (applied edits and reverts)."""
        return sum(1 for e in self.entries if e["op"] == "revert" or e.get("status") == "applied")

    def edits(self) -> list[dict[str, Any]]:
        """Every edit entry with its current status (``applied``, ``reverted``, ``rejected``)."""
        reverted: dict[str, dict[str, Any]] = {}
        for entry in self.entries:
            if entry["op"] == "revert":
                for edit_id in entry["ids"]:
                    reverted[edit_id] = entry
        views = []
        for entry in self.entries:
            if entry["op"] != "edit":
                continue
            view = dict(entry)
            view.pop("op")
            by = reverted.get(entry["id"])
            if by is not None:
                view["status"] = "reverted"
                view["reverted_time"] = by["time"]
                view["reverted_seq"] = by["seq"]
            else:
                view["reverted_time"] = None
                view["reverted_seq"] = None
            views.append(view)
        return views

    # ---- replay ----------------------------------------------------------------------------
    def replay(self, lm: LoadedModel) -> dict[str, Patch]:
        """Bring the freshly loaded base model ``lm`` to the journal's state; returns the applied
        patches by id, oldest first. Any mismatch raises :class:`JournalError` (``lm`` is then
        in an unknown state: load it again)."""
        if lm.fingerprint != self.header["model_fingerprint"]:
            raise JournalError(
                f"journal {self.folder} belongs to fingerprint {self.header['model_fingerprint']}, "
                f"the model has {lm.fingerprint}"
            )
        applied: dict[str, Patch] = {}
        for entry in self.entries:
            where = f"journal {self.folder}, entry {entry['seq']}"
            if entry["op"] == "edit" and entry.get("status") == "applied":
                folder = self.patch_folder(entry["id"])
                if not folder.is_dir():
                    raise JournalError(f"{where}: the patch folder {folder} is missing")
                expected = entry.get("digests", {}).get("patch")
                if expected is not None and folder_digest(folder) != expected:
                    raise JournalError(f"{where}: the patch folder {folder} was changed")
                try:
                    patch = Patch.load(folder)
                    patch.apply(lm)
                except PatchError as error:
                    raise JournalError(f"{where}: {error}") from None
                after = entry.get("digests", {}).get("after") or {}
                if weight_digests(lm, list(after)) != after:
                    raise JournalError(f"{where}: the replayed weights differ from the journal's")
                applied[entry["id"]] = patch
            elif entry["op"] == "revert":
                for edit_id in entry["ids"]:
                    patch = applied.pop(edit_id, None)
                    if patch is None:
                        raise JournalError(f"{where}: reverts {edit_id}, which is not applied")
                    try:
                        patch.revert()
                    except PatchError as error:
                        raise JournalError(f"{where}: {error}") from None
        if applied:
            log.info("replayed %d applied edit(s) from %s", len(applied), self.folder)
        return applied

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
