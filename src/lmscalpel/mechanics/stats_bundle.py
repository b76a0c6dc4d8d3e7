"""Shareable key statistics: a bundle file of C = E[k kᵀ] for one or more weights of one model.

Computing the statistics of a large model takes hours; a bundle lets one person compute them once
and others import them into their cache. A bundle is one safetensors file (never pickle): one
tensor per weight, named by the weight, and as metadata (strings, as safetensors keeps them) the
model's name and fingerprint, the corpus id, the sample count asked for, and per weight its layer,
token count and the SHA-256 of its tensor. :func:`import_statistics` refuses a bundle for another
model (fingerprint), one whose tensors do not match their digests, or whose shapes do not fit the
model's matrices; then it writes each moment into the statistics cache exactly where
:func:`~lmscalpel.mechanics.stats.input_statistics` looks for it, so the next edit needs no
computation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmscalpel.core.config import ConfigError
from lmscalpel.core.files import atomic_path, fsync_path
from lmscalpel.mechanics.stats import (
    DEFAULT_CORPUS,
    DEFAULT_SAMPLES,
    STATISTICS,
    KeyStatistics,
    input_statistics,
    resolve_corpus,
    statistics_key,
)
from lmscalpel.models.fingerprint import tensor_digest
from lmscalpel.models.loaded import LoadedModel

BUNDLE_FORMAT = "lmscalpel-statistics/1"


class BundleError(ConfigError):
    """A statistics bundle cannot be exported or imported as asked; the message says why."""


@dataclass(frozen=True)
class BundleEntry:
    """One weight's statistics in a bundle, as :func:`import_statistics` reports it."""

    weight: str
    layer: int
    count: int
    digest: str
    cached_at: Path


def export_statistics(
    lm: LoadedModel,
    weights: list[str],
    path: str | os.PathLike,
    corpus: str | os.PathLike | None = DEFAULT_CORPUS,
    samples: int = DEFAULT_SAMPLES,
    *,
    progress: bool = True,
) -> Path:
    """Write the statistics of ``weights`` (computed now where they are not cached) to the bundle
    file ``path``, atomically."""
    if not weights:
        raise BundleError("name at least one weight (or layer) to export")
    source = resolve_corpus(corpus)
    found = input_statistics(lm, weights, source, samples, progress=progress)
    tensors, entries = {}, {}
    for weight in weights:
        stats = found[weight]
        tensors[weight] = stats.moment.float().contiguous()
        entries[weight] = {
            "layer": stats.layer,
            "count": stats.count,
            "sha256": tensor_digest(tensors[weight]),
        }
    metadata = {
        "format": BUNDLE_FORMAT,
        "model": lm.name or "",
        "fingerprint": lm.fingerprint,
        "corpus": source.id,
        "samples": str(samples),
        "weights": json.dumps(entries),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        fsync_path(tmp)
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise BundleError(f"no statistics bundle at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"{path} is not a safetensors statistics bundle: {error}") from None
    if metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path} is not a statistics bundle (format {metadata.get('format')!r}, "
            f"expected {BUNDLE_FORMAT!r})"
        )
    return metadata, tensors


def import_statistics(lm: LoadedModel, path: str | os.PathLike) -> list[BundleEntry]:
    """Check the bundle at ``path`` against ``lm`` and its own digests, then put every moment in
    the statistics cache. Nothing is written unless every entry checks out."""
    path = Path(path)
    metadata, tensors = _read(path)
    if metadata.get("fingerprint") != lm.fingerprint:
        raise BundleError(
            f"{path} holds statistics of model {metadata.get('model')!r} "
            f"(fingerprint {metadata.get('fingerprint')}), not of this model ({lm.fingerprint})"
        )
    try:
        entries = json.loads(metadata["weights"])
        corpus, samples = metadata["corpus"], int(metadata["samples"])
    except (KeyError, ValueError) as error:
        raise BundleError(f"{path}: damaged bundle metadata ({error})") from None
    if set(entries) != set(tensors):
        raise BundleError(f"{path}: the listed weights and the stored tensors differ")
    checked = []
    for weight, entry in entries.items():
        moment = tensors[weight]
        if tensor_digest(moment) != entry.get("sha256"):
            raise BundleError(f"{path}: the statistics of {weight} do not match their digest")
        try:
            _rows, cols = lm.adapter.matrix_shape(weight)
        except (AttributeError, ValueError) as error:
            raise BundleError(f"{path}: {weight} is not a matrix of this model ({error})") from None
        if tuple(moment.shape) != (cols, cols) or not torch.isfinite(moment).all():
            raise BundleError(
                f"{path}: the statistics of {weight} have shape {tuple(moment.shape)}; "
                f"its inputs need a finite ({cols}, {cols}) moment"
            )
        checked.append((weight, int(entry["layer"]), int(entry["count"]), entry["sha256"]))
    imported = []
    for weight, layer, count, digest in checked:
        key = statistics_key(lm, weight, corpus, samples)
        stats = KeyStatistics(
            tensors[weight],
            count,
            layer,
            corpus,
            STATISTICS.path(key),
            weight,
            {
                "count": str(count),
                "layer": str(layer),
                "weight": weight,
                "corpus": corpus,
                "model": lm.name or "",
                "fingerprint": lm.fingerprint,
                "imported_from": str(path),
            },
        )
        STATISTICS.save(key, stats)
        imported.append(BundleEntry(weight, layer, count, digest, STATISTICS.path(key)))
    return imported
