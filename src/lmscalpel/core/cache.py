"""The one keyed disk cache: what lmscalpel computes once per model (key statistics, sampled
corpora, context prefixes, sentence embeddings, tracing noise levels) is computed on first use,
written atomically under ``lmscalpel_home()/<namespace>/``, and remembered in the process.

A key is a tuple of path components (``(fingerprint, "model.layers.4.mlp.down_proj.weight...")``);
the value's codec decides the file's suffix and format (JSON, or safetensors: tensors are never
pickled). An unreadable entry (a foreign or truncated file) is logged and recomputed, never
trusted. Each cache counts what it really computed, so a test can tell a cache hit from a
recomputation that happened to write the same file.

    PREFIXES = DiskCache("prefixes", JSON)
    table = PREFIXES.get((lm.fingerprint,), lambda: generate_them())
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmscalpel.core.files import atomic_path, atomic_write_json
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


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_json(path: Path, value: Any) -> None:
    atomic_write_json(path, value, indent=1)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _write_tensors(path: Path, value: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in value.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "lmscalpel-cache"})


JSON: Codec[Any] = Codec(".json", _read_json, _write_json)
TENSORS: Codec[dict[str, torch.Tensor]] = Codec(".safetensors", _read_tensors, _write_tensors)

_UNREADABLE = (OSError, ValueError, SafetensorError, UnicodeDecodeError)


class DiskCache(Generic[T]):
    """Values of one kind, keyed, on disk under ``lmscalpel_home()/namespace`` and in memory.

    ``computed`` and ``loaded`` count the values this process computed and read from disk.
    The root is looked up on every access, so ``$LMSCALPEL_HOME`` may change between calls (tests
    point it at a temporary folder).
    """

    def __init__(self, namespace: str, codec: Codec[T], *, remember: bool = True) -> None:
        self.namespace = namespace
        self.codec = codec
        self.remember = remember
        self.computed = 0
        self.loaded = 0
        self._memory: dict[tuple[Path, ...], T] = {}

    def path(self, key: Key) -> Path:
        """The file that holds ``key``'s value."""
        parts = [str(p) for p in key]
        if not parts or any(not p or "/" in p or p in (".", "..") for p in parts):
            raise ValueError(f"bad cache key {tuple(key)!r}")
        return lmscalpel_home().joinpath(self.namespace, *parts[:-1], parts[-1] + self.codec.suffix)

    def load(self, key: Key) -> T | None:
        """The stored value of ``key``, or None when absent or unreadable."""
        path = self.path(key)
        memo = self._memory.get((path,))
        if memo is not None:
            return memo
        if not path.is_file():
            return None
        try:
            value = self.codec.read(path)
        except _UNREADABLE as error:
            log.warning("ignoring unreadable cache entry %s (%s)", path, error)
            return None
        self.loaded += 1
        self._remember(path, value)
        return value

    def save(self, key: Key, value: T) -> Path:
        """Store ``value`` under ``key`` (atomically) and remember it."""
        path = self.path(key)
        self.codec.write(path, value)
        self._remember(path, value)
        return path

    def get(self, key: Key, compute: Callable[[], T]) -> T:
        """``key``'s value: remembered, else read from disk, else ``compute()``d and stored."""
        value = self.load(key)
        if value is None:
            value = compute()
            self.computed += 1
            self.save(key, value)
        return value

    def forget(self) -> None:
        """Drop the in-memory copies (the files stay)."""
        self._memory.clear()

    def _remember(self, path: Path, value: T) -> None:
        if self.remember:
            self._memory[(path,)] = value

    def __repr__(self) -> str:
        return f"DiskCache({self.namespace!r}, computed={self.computed}, loaded={self.loaded})"
