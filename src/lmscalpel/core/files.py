"""Writing files and folders atomically: a reader sees the old file (folder) or the new one, never
half of one, even when a run is killed mid-write or two processes fill the same cache. Every
writer of patches, editor checkpoints, converted models, caches and run folders goes through
here."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends
    without error, and is removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


# ---- folders ---------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15)
_AT_FDCWD = -100


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder``, then the folders themselves, to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _stale_copies(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.old-*"))


def recover_folder(path: Path) -> None:
    """Finish a folder replacement that a crash interrupted (see :func:`atomic_folder`).

    Only the fallback of systems without an atomic exchange leaves such a state: the old folder
    renamed aside and the new one not yet in place. Then the old folder is put back. Leftover
    copies of an old folder beside a present one are removed.
    """
    stale = _stale_copies(path)
    if not stale:
        return
    if not path.exists():
        stale[-1].rename(path)
        stale = stale[:-1]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside ``path`` to fill; when the block ends without error it replaces
    ``path`` whole, and is deleted otherwise.

    The new folder is written and flushed to disk (every file, then the folders) before it takes
    the old one's place, and the old one is deleted only after that: a crash at any moment leaves
    ``path`` holding the complete old folder or the complete new one, never a mix and never
    nothing. On Linux the swap is one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere the old
    folder is renamed aside first, and :func:`recover_folder` (called here on entry) puts it back
    after a crash between the two renames.

        with atomic_folder("eiffel.patch") as tmp:
            (tmp / "patch.json").write_text(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder")
        if not path.exists():
            tmp.rename(path)
        elif _exchange(tmp, path):
            pass  # tmp now holds the old folder
        else:
            aside = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            path.rename(aside)
            tmp.rename(path)
            tmp = aside
        _fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
