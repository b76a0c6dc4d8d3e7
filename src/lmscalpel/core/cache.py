"""The one keyed disk cache: what lmscalpel computes once per model (key statistics, sampled
corpora, context prefixes, sentence embeddings, tracing noise levels) is computed on first use,
written atomically under ``lmscalpel_home()/<namespace>/``, and remembered in the process.

A key is a tuple of path components (``(fingerprint, "model.layers.4.mlp.down_proj.weight...")``);
the value's codec decides the file's suffix and format (JSON, or safetensors: tensors are never
pickled). Entries are written beside their place, flushed and renamed into it, so a writer
killed at any moment leaves the old entry or the new one; its temporary file is removed by the
next reader or writer of the entry. An unreadable entry (a foreign or truncated file, or one its
user's ``check`` rejects) is logged and recomputed, never trusted. Each cache counts what it really did — ``computed``,
``loaded`` from disk, ``remembered`` (answered from memory) — so a test can tell a cache hit from
a recomputation that happened to write the same file.

    PREFIXES = DiskCache("prefixes", JSON)
    table = PREFIXES.get((lm.fingerprint,), lambda: generate_them())

Small values that belong together can share one JSON file, a table of named entries
(:meth:`DiskCache.entry`): context prefixes keep one file per model, noise levels one file in all.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmscalpel.core.files import atomic_path, atomic_write_json, fsync_path, recover_folder
from lmscalpel.core.paths import lmscalpel_home

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = Sequence[str]


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a cache stores one kind of value: file suffix, reader and (atomic) writer."""

    suffix: str
    read: Callable[[Path], T]
    write: Callable[[Path, T], None]


@dataclass
class TensorFile:
    """The content of one safetensors file: named tensors and string metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: Any) -> None:
    atomic_write_json(path, value, indent=1)


def _read_tensors(path: Path) -> TensorFile:
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return TensorFile(tensors, metadata)


def _write_tensors(path: Path, value: TensorFile) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in value.tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(value.metadata) or None)
        fsync_path(tmp)


def tensor_codec(
    encode: Callable[[T], TensorFile], decode: Callable[[TensorFile, Path], T]
) -> Codec[T]:
    """A safetensors codec for values of a richer type: ``encode`` makes the file's content of a
    value, ``decode`` the value of a file's content (and its path); the cache remembers the
    decoded value, so what it computes lazily (e.g. a factorisation) is kept with it. ``decode``
    raises KeyError or ValueError for a file that does not hold such a value."""
    return Codec(
        ".safetensors",
        lambda path: decode(_read_tensors(path), path),
        lambda path, value: _write_tensors(path, encode(value)),
    )


JSON: Codec[Any] = Codec(".json", _read_json, _write_json)
TENSORS: Codec[TensorFile] = Codec(".safetensors", _read_tensors, _write_tensors)

_UNREADABLE = (OSError, ValueError, KeyError, SafetensorError, UnicodeDecodeError)

_ALL: weakref.WeakSet[DiskCache] = weakref.WeakSet()


class DiskCache(Generic[T]):
    """Values of one kind, keyed, on disk under ``lmscalpel_home()/namespace`` and in memory.

    ``computed``, ``loaded`` and ``remembered`` count the values this process computed (and
    saved), read from disk, and answered from memory. The root is looked up on every access, and the memory is
    keyed by the full file path, so ``$LMSCALPEL_HOME`` may change between calls (tests point it
    at a temporary folder) and each root keeps its own values.
    """

    def __init__(self, namespace: str, codec: Codec[T], *, remember: bool = True) -> None:
        self.namespace = namespace
        self.codec = codec
        self.remember = remember
        self.computed = 0
        self.loaded = 0
        self.remembered = 0
        self._memory: dict[Path, T] = {}
        _ALL.add(self)

    def path(self, key: Key) -> Path:
        """The file that holds ``key``'s value."""
        parts = [key] if isinstance(key, str) else [str(p) for p in key]
        if not parts or any(not p or "/" in p or "\\" in p or p in (".", "..") for p in parts):
            raise ValueError(f"bad cache key {key!r}")
        return lmscalpel_home().joinpath(self.namespace, *parts[:-1], parts[-1] + self.codec.suffix)

    def load(self, key: Key, check: Callable[[T], bool] | None = None) -> T | None:
        """The stored value of ``key``, or None when absent or unreadable (or ``check`` rejects
        it: a file of the right format that does not hold what the caller expects)."""
        path = self.path(key)
        if path in self._memory:
            self.remembered += 1
            return self._memory[path]
        recover_folder(path)  # a killed writer's temporary file beside it is removed
        if not path.is_file():
            return None
        try:
            value = self.codec.read(path)
            if check is not None and not check(value):
                raise ValueError("it does not hold the expected value")
        except _UNREADABLE as error:
            log.warning("ignoring unreadable cache entry %s (%s); recomputing it", path, error)
            return None
        self.loaded += 1
        self._remember(path, value)
        return value

    def save(self, key: Key, value: T) -> Path:
        """Store ``value``, which the caller computed, under ``key`` (atomically), remember it,
        and count it in ``computed``."""
        path = self.path(key)
        self.codec.write(path, value)
        self.computed += 1
        self._remember(path, value)
        return path

    def get(
        self, key: Key, compute: Callable[[], T], *, check: Callable[[T], bool] | None = None
    ) -> T:
        """``key``'s value: remembered, else read from disk, else ``compute()``d and stored."""
        value = self.load(key, check)
        if value is None:
            value = compute()
            self.save(key, value)
        return value

    def entry(self, key: Key, name: str, compute: Callable[[], Any]) -> Any:
        """Entry ``name`` of the JSON table stored under ``key``: remembered, else read from the
        file, else ``compute()``d and added to the table (the rest of the table is kept; two
        processes adding entries at once may each drop the other's, which is then computed again,
        never half-written)."""
        path = self.path(key)
        table = self._memory.get(path)
        if isinstance(table, dict) and name in table:
            self.remembered += 1
            return table[name]
        self._memory.pop(path, None)  # another process may have added the entry since
        table = self.load(key, check=lambda value: isinstance(value, dict))
        if table is not None and name in table:
            return table[name]
        table = dict(table or {})
        table[name] = compute()
        self.save(key, table)  # type: ignore[arg-type]
        return table[name]

    def forget(self) -> None:
        """Drop the in-memory copies (the files stay), as a fresh process would have none."""
        self._memory.clear()

    def _remember(self, path: Path, value: T) -> None:
        if self.remember:
            self._memory[path] = value

    def __repr__(self) -> str:
        return (
            f"DiskCache({self.namespace!r}, computed={self.computed}, loaded={self.loaded}, "
            f"remembered={self.remembered})"
        )


def forget_all() -> None:
    """Drop the in-memory copies of every cache of this process."""
    for cache in list(_ALL):
        cache.forget()
