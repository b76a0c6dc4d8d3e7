"""How much noise corrupts a subject: 3 x the standard deviation of subject-token embeddings.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (Section 2.1), corrupt the
subject by adding Gaussian noise with sigma three times the empirical standard deviation of the
embeddings of subject tokens over a sample of facts. The standard deviation is a property of the
model's embeddings and the sample, so it is computed once and cached per model fingerprint and
sample under ``lmscalpel_home()/tracing/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lmscalpel.core.cache import JSON, DiskCache
from lmscalpel.data.shared import checkout_data_dir, shared_data_file
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.tokens import SubjectNotFoundError, encode_prompt, subject_token_positions

log = logging.getLogger(__name__)

NOISE_FACTOR = 3.0
"""The paper's multiple of the subject-embedding standard deviation."""

KNOWNS_RELATIVE = Path("knowns") / "known_1000.json"


def default_knowns_path() -> Path | None:
    """The known-facts file (``known_1000.json``) if it is available, else ``None``.

    Looked up in ``$LMSCALPEL_DATA`` and then in ``shared/data`` beside the project's checkout
    (where the project's benchmark data lives).
    """
    candidates = [shared_data_file(KNOWNS_RELATIVE), checkout_data_dir() / KNOWNS_RELATIVE]
    return next((path for path in candidates if path.is_file()), None)


def subject_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, subject) pairs of a known-facts JSON file (a list of records with both keys)."""
    records = json.loads(Path(path).read_text())
    return [(r["prompt"], r["subject"]) for r in records]


def embedding_std(lm: LoadedModel, sample: Sequence[tuple[str, str]] | None = None) -> float:
    """Standard deviation of the embedding-layer outputs of subject tokens, over all their entries.

    ``sample`` holds (prompt, subject) pairs; the subject's tokens are taken as they occur in the
    encoded prompt (so a mid-sentence subject keeps its leading space). ``None`` uses every row of
    the vocabulary instead, a fallback for when no sample of facts is at hand.
    """
    embed = lm.adapter.embeddings
    with torch.no_grad():
        if sample is None:
            vocab = embed.weight.shape[0]
            ids = torch.arange(vocab, device=lm.device)
            chunks = [embed(ids[i : i + 8192]).float() for i in range(0, vocab, 8192)]
            return float(torch.cat(chunks).std())
        ids: list[int] = []
        for prompt, subject in sample:
            try:
                positions = subject_token_positions(lm, prompt, subject)
            except SubjectNotFoundError:
                continue
            encoded = encode_prompt(lm, prompt)
            ids.extend(encoded[p] for p in positions)
        if len(ids) < 2:
            raise ValueError("the sample holds fewer than two subject tokens")
        return float(embed(torch.tensor(ids, device=lm.device)).float().std())


NOISE = DiskCache("tracing", JSON)
"""One JSON table, ``tracing/embedding_std.json``: ``"<fingerprint>:<chat>:<sample>"`` -> the
standard deviation."""


def _sample_key(sample: Sequence[tuple[str, str]] | None) -> str:
    if sample is None:
        return "vocabulary"
    digest = hashlib.sha256(json.dumps(list(map(list, sample))).encode()).hexdigest()[:16]
    return f"subjects-{len(sample)}-{digest}"


def noise_level(
    lm: LoadedModel,
    sample: Sequence[tuple[str, str]] | str | os.PathLike | None = None,
    *,
    factor: float = NOISE_FACTOR,
    cache: bool = True,
) -> float:
    """Sigma of the corrupting noise: ``factor`` x :func:`embedding_std` (cached).

    ``sample`` is a list of (prompt, subject) pairs or a known-facts JSON file; ``None`` uses
    :func:`default_knowns_path` when it exists and the whole vocabulary otherwise.
    """
    if sample is None:
        sample = default_knowns_path()
        if sample is None:
            log.info("no sample of known facts found; using the vocabulary's embedding std")
    if isinstance(sample, (str, os.PathLike)):
        sample = subject_pairs(sample)
    if not cache:
        return factor * embedding_std(lm, sample)
    key = f"{lm.fingerprint}:{int(lm.chat)}:{_sample_key(sample)}"
    std = NOISE.entry(("embedding_std",), key, lambda: embedding_std(lm, sample))
    return factor * float(std)
