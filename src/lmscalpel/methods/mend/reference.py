"""Pass 1 of a meta-training step: what the unedited model gives on a meta-batch.

Mitchell et al. 2022, "Fast Model Editing at Scale", Algorithm 1: the edit's gradient pieces
(u, δ) come from the frozen model's loss on the edit prompt, and the locality loss compares the
edited model with the frozen model's next-token distributions on the unrelated prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscalpel.methods.mend.batches import LOCALITY, MetaBatch, rows_of
from lmscalpel.methods.mend.grads import (
    TokenGrads,
    io_taps,
    lowest_layer,
    pair_means,
    scored_logprobs,
    token_grads,
)
from lmscalpel.methods.mend.lower import LowerCache
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import tap
from lmscalpel.runtime.layers import from_layer


@dataclass
class Reference:
    """What the unedited model gives on a meta-batch: the edit's (u, δ), the locality
    log-distributions (N_loc, vocab), and the hidden state (rows, S, d) entering block ``start``,
    the lowest edited one (the passes over the blocks above start from it)."""

    grads: TokenGrads
    locality_logprobs: torch.Tensor
    start: int
    hidden: torch.Tensor


def reference(
    lm: LoadedModel, mb: MetaBatch, names: Sequence[str], cache: LowerCache | None = None
) -> Reference:
    """Pass 1: the frozen model's δ from the edit prompts' NLL (edit rows only, with grad) and
    its locality distributions (locality rows only, no grad); paraphrase rows need nothing here
    but their hidden state entering the edited blocks."""
    batch = mb.batch
    start = lowest_layer(lm.adapter, names)
    if cache is None or cache.start != start:
        cache = LowerCache(lm, start, limit=0)
    hidden = cache.hidden(mb)
    edits = rows_of(batch, mb.edit_rows)
    with (
        torch.enable_grad(),
        from_layer(lm, start, hidden[mb.edit_rows]),
        tap(lm.model, io_taps(names)) as seen,
    ):
        logprobs = scored_logprobs(lm, edits)
        chosen = logprobs.gather(1, edits.token_ids[:, None]).squeeze(1)
        loss = -pair_means(chosen, edits).sum()
        grads = token_grads(seen, names, loss, range(mb.n_edits), edits.attention_mask)
    role = mb.role.tolist()
    loc_rows = [batch.rows_of_pairs[p] for p in range(batch.n_pairs) if role[p] == LOCALITY]
    if loc_rows:
        with torch.no_grad(), from_layer(lm, start, hidden[loc_rows]):
            locality = scored_logprobs(lm, rows_of(batch, loc_rows))
    else:
        locality = logprobs.detach()[:0]
    return Reference(grads, locality, start, hidden)
