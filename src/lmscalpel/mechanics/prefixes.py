"""Short context prefixes written by the model itself, generated once per model and cached.

ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §3.1) computes the
key k* and optimises the value v* not only on the bare prompt but behind a few short texts the
model generated, so that the edit holds whatever precedes the subject. MEMIT and AlphaEdit reuse
the same prefixes. Each prefix is a sampled continuation of a common opening word ("The",
"Therefore", ...), cleaned to one line and ended with ". ", ready to put before a prompt.

The prefixes depend only on the model and the three numbers below, so they are computed once and
kept under ``$LMSCALPEL_HOME/prefixes/<fingerprint>.json``.
"""

from __future__ import annotations

import dataclasses
import logging

from lmscalpel.core.cache import JSON, DiskCache
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.scoring import generate

log = logging.getLogger(__name__)

OPENINGS = ("The", "Therefore", "Because", "I", "You")

PREFIXES = DiskCache("prefixes", JSON)
"""One JSON table per model, ``prefixes/<fingerprint>.json``: ``"<count>x<length>-seed<seed>"``
-> the prefixes."""


def _clean(text: str) -> str:
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text.rstrip(" .") + ". "


def context_prefixes(lm: LoadedModel, count: int = 5, length: int = 5, seed: int = 0) -> list[str]:
    """``[""]`` followed by ``count`` prefixes of about ``length`` generated tokens each.

    ``prefix + prompt`` is the prompt in that context. Sampled (top-5, like the paper's code) with
    ``seed``, so the same model always gets the same prefixes; cached in memory and on disk.
    """
    if count < 0 or length < 1:
        raise ValueError(f"need count >= 0 and length >= 1, got count={count}, length={length}")

    def make() -> list[str]:
        starts = [OPENINGS[i % len(OPENINGS)] for i in range(count)]
        raw = dataclasses.replace(lm, chat=False, context_patches=[])  # plain text, no template
        texts = generate(raw, starts, max_new_tokens=length, sample=True, top_k=5, seed=seed)
        log.info("generated %d context prefixes for %s", count, lm.name)
        return [_clean(s + t) for s, t in zip(starts, texts)]

    stored = PREFIXES.entry((lm.fingerprint,), f"{count}x{length}-seed{seed}", make)
    return ["", *stored]
