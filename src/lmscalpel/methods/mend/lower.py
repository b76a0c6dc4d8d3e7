"""The blocks below the lowest edited one, run once per record and kept.

An edit of the matrices in blocks ``start..`` cannot change what blocks ``0..start-1`` compute,
so meta-training (Mitchell et al. 2022, "Fast Model Editing at Scale", Algorithm 1) only needs
their output once per (prompt, target) pair: every later pass over that pair starts at block
``start`` from the kept hidden state (:func:`lmscalpel.runtime.layers.from_layer`).
"""

from __future__ import annotations

import torch

from lmscalpel.methods.mend.batches import MetaBatch
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.scoring import hidden_states


class LowerCache:
    """Hidden states entering block ``start`` (the lowest edited one) per (prompt, target) pair.

    The blocks below ``start`` compute the same thing whatever the edit, so each record's pass
    through them is made once and kept: after the first epoch a training step only runs the
    edited blocks. ``limit`` bounds the pairs kept (about 3 per record; each S x d floats).
    """

    def __init__(self, lm: LoadedModel, start: int, limit: int | None = None) -> None:
        self.lm, self.start, self.limit = lm, start, limit
        self.block = lm.adapter.layer_name(start)
        self.store: dict[tuple[str, str], torch.Tensor] = {}

    def hidden(self, mb: MetaBatch) -> torch.Tensor:
        """(rows, S, d) hidden states entering block ``start`` for ``mb``'s batch."""
        batch, keys = mb.batch, mb.keys
        if any(key not in self.store for key in keys):
            with (
                torch.no_grad(),
                tap(self.lm.model, {self.block: Tap(input=True)}, stop=True) as seen,
            ):
                hidden_states(self.lm, batch.input_ids, batch.attention_mask)
            computed = seen[self.block].input
            if self.limit is not None and len(self.store) + len(keys) > self.limit:
                return computed
            for pair, key in enumerate(keys):
                row = batch.rows_of_pairs[pair]
                length = int(batch.attention_mask[row].sum())
                self.store[key] = computed[row, :length].clone()
        first = self.store[keys[0]]
        rows, width = batch.input_ids.shape
        out = first.new_zeros(rows, width, first.shape[-1])
        for pair, key in enumerate(keys):
            kept = self.store[key]
            out[batch.rows_of_pairs[pair], : len(kept)] = kept
        return out
