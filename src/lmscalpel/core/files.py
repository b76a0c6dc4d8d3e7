"""Writing files and folders atomically: a reader sees the old file (folder) or the new one, never
half of one, even when a run is killed mid-write or two processes fill the same cache. Every
writer of patches, editor checkpoints, converted models, caches and run folders goes through
here.

Files: :func:`atomic_path` (and the ``atomic_write_*`` helpers) write beside the target, flush and
``os.replace`` it. Folders: :func:`atomic_folder` fills a new folder beside the old one, flushes
it, and swaps it in; :func:`discard_folder` deletes one so that it is gone whole or still there
whole; :func:`recover_folder` finishes what a crash interrupted. The helpers' siblings are hidden
(``.<name>.tmp-*``, ``.<name>.old-*``, ``.<name>.trash-*``) and carry their writer's host and
process id, so leftovers of a killed writer are recognised and removed, and a live writer's never.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends
    without error, and is removed otherwise. The temporary name is a hidden sibling carrying
    this writer's host and process id (see :func:`recover_folder`), so the leftover of a writer
    killed mid-write is removed by the next writer of ``path`` (or by any reader that recovers it),
    and leftovers never accumulate."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)  # removes the temporary files of writers that were killed
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself survives a power cut
    finally:
        _remove(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before it replaces the old file)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any, indent: int = 2) -> None:
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=str)
    atomic_write_text(path, text + "\n")


# ---- renames ---------------------------------------------------------------------------------
_RENAME_NOREPLACE = 1  # renameat2 flags (Linux >= 3.15)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)

_renameat2_fn: Any = None  # looked up once: the C function, or False where there is none


def _renameat2():
    global _renameat2_fn
    if _renameat2_fn is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2_fn = False
        else:
            function.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
            function.restype = ctypes.c_int
            _renameat2_fn = function
    return _renameat2_fn


def _rename2(a: Path, b: Path, flags: int) -> int | None:
    """``renameat2(a, b, flags)``: 0 when done, the errno when it failed, None where the system
    (or this file system) has no such call."""
    function = _renameat2()
    if not function:
        return None
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return 0
    error = ctypes.get_errno()
    return None if error in _UNSUPPORTED else error


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step; False where the system cannot."""
    error = _rename2(a, b, _RENAME_EXCHANGE)
    if error is None:
        return False
    if error:
        raise OSError(error, os.strerror(error), str(b))
    return True


def _rename_noreplace(a: Path, b: Path) -> bool:
    """Rename ``a`` to ``b`` unless ``b`` exists (then False, and nothing changed)."""
    error = _rename2(a, b, _RENAME_NOREPLACE)
    if error == 0:
        return True
    if error == errno.EEXIST:
        return False
    if error is not None:
        raise OSError(error, os.strerror(error), str(b))
    if os.path.lexists(b):  # no atomic "no replace" here: check, then rename
        return False
    try:
        os.rename(a, b)  # only an empty folder created in between can still be replaced
    except OSError as failure:
        if failure.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries: a rename in it survives a power cut) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder``, then the folders themselves (deepest first), to disk."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_path(Path(root) / name)
        fsync_path(Path(root))


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree; whatever is already gone is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# ---- siblings --------------------------------------------------------------------------------
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_KINDS = ("tmp", "old", "trash")


def _sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name beside ``path``: ``.<name>.<kind>-<time>-<host>-<pid>-<random>``
    (the time in fixed-width hex, so that names sort by age)."""
    stamp = f"{time.time_ns():016x}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return path.with_name(f".{path.name}.{kind}-{stamp}")


def _siblings(path: Path) -> dict[str, list[Path]]:
    """The hidden siblings of ``path`` by kind, oldest first."""
    found: dict[str, list[Path]] = {kind: [] for kind in _KINDS}
    try:
        names = sorted(os.listdir(path.parent))
    except FileNotFoundError:
        return found
    for kind in _KINDS:
        prefix = f".{path.name}.{kind}-"
        found[kind] = [path.parent / n for n in names if n.startswith(prefix)]
    return found


def _owner_is_gone(sibling: Path) -> bool:
    """Whether the process that made ``sibling`` is no longer running: it ran on this host and no
    process has its id now. (Siblings of other hosts, e.g. on a shared drive, are left alone.)"""
    parts = sibling.name.rsplit("-", 4)
    if len(parts) != 5 or parts[2] != _HOST or not parts[3].isdigit():
        return False
    pid = int(parts[3])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def recover_folder(path: str | os.PathLike) -> None:
    """Finish whatever a crash interrupted at ``path`` (see :func:`atomic_folder`).

    Only the fallback of systems without an atomic exchange leaves ``path`` missing: the old
    folder renamed aside, the new one not yet in place; then the old folder is put back. Copies of
    an old folder beside a present one, and the half-written new folders and half-deleted
    folders of writers that are no longer running, are removed. Readers call this before looking
    at ``path``; it is cheap (one listing of the parent folder).
    """
    path = Path(path)
    siblings = _siblings(path)
    olds = siblings["old"]
    if olds and not os.path.lexists(path):
        newest = olds.pop()
        if _rename_noreplace(newest, path):
            log.warning("restored %s from an interrupted replacement", path)
        else:
            olds.append(newest)
    if os.path.lexists(path):
        for old in olds:
            _remove(old)
    for leftover in siblings["tmp"] + siblings["trash"]:
        if _owner_is_gone(leftover):
            _remove(leftover)


def replaceable(path: Path, marker: str) -> bool:
    """Whether a writer of folders of one kind (recognised by their ``marker`` file) may replace
    ``path``: absent, empty, or holding ``marker`` (after finishing an interrupted replacement,
    :func:`recover_folder`). Writers refuse anything else rather than delete a stranger's folder."""
    recover_folder(path)
    return not (path.is_dir() and any(path.iterdir())) or (path / marker).is_file()


@contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """A fresh folder beside ``path`` to fill; when the block ends without error it takes the
    place of ``path`` whole, and it is deleted otherwise.

    The new folder is written and flushed to disk (every file, then the folders) before it takes
    the old one's place, and the old one is deleted only after that: a crash at any moment leaves
    ``path`` holding the complete old folder or the complete new one, never a mix and never
    nothing. On Linux the swap is one atomic ``renameat2(RENAME_EXCHANGE)``; where the file system
    cannot exchange, the old folder is renamed aside first, and :func:`recover_folder` (which
    readers and the next writer call) puts it back after a crash between the two renames.

    With ``replace=False`` an existing ``path`` is kept and the new folder discarded (for caches:
    another process finished the same folder first).

        with atomic_folder("eiffel.patch") as tmp:
            (tmp / "patch.json").write_text(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.lexists(path) and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder")
        if _rename_noreplace(tmp, path):
            pass
        elif not replace:
            log.debug("%s appeared meanwhile; keeping it", path)
        elif _exchange(tmp, path):
            pass  # tmp now holds the old folder
        else:
            aside = _sibling(path, "old")
            path.rename(aside)
            tmp.rename(path)
            tmp = aside
        fsync_path(path.parent)
    finally:
        _remove(tmp)


def discard_folder(path: str | os.PathLike) -> None:
    """Delete folder ``path`` so that a crash leaves it whole or gone, never half-deleted: it is
    renamed aside (one atomic step), and the renamed copy is deleted after. Nothing to do when
    ``path`` does not exist."""
    path = Path(path)
    recover_folder(path)
    if not os.path.lexists(path):
        return
    trash = _sibling(path, "trash")
    path.rename(trash)
    fsync_path(path.parent)
    _remove(trash)


def read_user_text(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of the file ``path`` a user named (``what`` names it in messages, e.g.
    ``"config file"``). A folder, a name the file system refuses (too long, a NUL character) or
    bytes that are not UTF-8 raise ``error`` with a one-line reason; a missing file raises
    :class:`FileNotFoundError` ("no config file at PATH")."""
    path = Path(path)
    shown = str(path) if len(str(path)) <= 120 else str(path)[:117] + "..."
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError) as problem:
        reason = getattr(problem, "strerror", None) or problem
        raise error(f"cannot read a {what} at {shown}: {reason}") from None
    if is_dir:
        raise error(f"{path} is a folder, not a {what}")
    if not is_file:
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not UTF-8 text (byte {problem.start}: {problem.reason})") from None
