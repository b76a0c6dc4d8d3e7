"""Anchored batches: rows aligned at an injection position, rerun from that position on.

ROME, MEMIT and AlphaEdit optimise a vector added to one module's output at one position of
every row (the subject's last token) and read log-probabilities at a few later positions. Nothing
the vector touches lies before that position or below that layer, so most of each optimisation
step's arithmetic would be the same at every step. This module does it once:

* :class:`AnchoredBatch` left-pads the rows so that every row's anchor (the subject's last token)
  sits in the same column ``P``. Columns ``< P`` are the *prefix*, columns ``>= P`` the *suffix*.
* :class:`AnchoredRun` runs the whole batch once without gradients, keeps the attention keys and
  values of the prefix columns at every layer, and the input of the first layer that must be
  rerun at the suffix columns. :meth:`AnchoredRun.suffix_hidden` then reruns only the suffix
  columns, only from that layer up (the layers below it are replaced by a stub that returns their
  recorded output), with the caller's hooks active — differentiably.

The result equals a full forward pass to float precision (the tests check every supported
architecture); ``fast=False`` runs the full pass instead, as a reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import capture, edit_outputs
from lmscalpel.scoring import pad_token_id
from lmscalpel.tokens import encode_prompt, encode_target, subject_token_positions


@dataclass(frozen=True)
class AnchoredRow:
    """One row: ``prompt`` (as the model reads it, before formatting), the ``subject`` in it, and
    optionally a ``target`` that continues the prompt (teacher-forced and scored).

    ``subject_from`` is the character index from which the subject is searched in ``prompt`` (so
    a context prefix that happens to mention the subject is skipped).
    """

    prompt: str
    subject: str
    target: str | None = None
    subject_from: int = 0


@dataclass
class AnchoredBatch:
    """Left-padded rows whose anchors share column ``anchor``.

    ``input_ids``, ``attention_mask``, ``position_ids``: (B, W). For the scored target tokens:
    ``read_rows``, ``read_cols`` (N,) — the logits at (row, column) predict ``read_tokens[n]``.
    ``last_cols`` (B,): each row's last real column (where the next token is predicted).
    """

    rows: list[AnchoredRow]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    anchor: int
    read_rows: torch.Tensor
    read_cols: torch.Tensor
    read_tokens: torch.Tensor
    last_cols: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def suffix_length(self) -> int:
        return self.width - self.anchor

    @classmethod
    def build(cls, lm: LoadedModel, rows: Sequence[AnchoredRow]) -> AnchoredBatch:
        """Tokenize ``rows`` (prompt, then target minus its last token) and align their anchors."""
        if not rows:
            raise ValueError("an anchored batch needs at least one row")
        seqs, anchors, reads = [], [], []
        for row in rows:
            prompt_ids = encode_prompt(lm, row.prompt)
            anchor = subject_token_positions(lm, row.prompt, row.subject, row.subject_from)[-1]
            target_ids = encode_target(lm, row.prompt, row.target) if row.target else []
            seqs.append(prompt_ids + target_ids[:-1])
            anchors.append(anchor)
            reads.append([(len(prompt_ids) - 1 + j, t) for j, t in enumerate(target_ids)])
        column = max(anchors)
        width = column + max(len(s) - a for s, a in zip(seqs, anchors))
        input_ids = torch.full((len(rows), width), pad_token_id(lm), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        read_rows, read_cols, read_tokens, last_cols = [], [], [], []
        for r, (seq, anchor, row_reads) in enumerate(zip(seqs, anchors, reads)):
            shift = column - anchor
            input_ids[r, shift : shift + len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, shift : shift + len(seq)] = 1
            for pos, token in row_reads:
                read_rows.append(r)
                read_cols.append(shift + pos)
                read_tokens.append(token)
            last_cols.append(shift + len(seq) - 1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        device = lm.device
        return cls(
            rows=list(rows),
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            anchor=column,
            read_rows=torch.tensor(read_rows, dtype=torch.long, device=device),
            read_cols=torch.tensor(read_cols, dtype=torch.long, device=device),
            read_tokens=torch.tensor(read_tokens, dtype=torch.long, device=device),
            last_cols=torch.tensor(last_cols, dtype=torch.long, device=device),
        )


class _Replay(nn.Module):
    """Stands in for a decoder layer below the rerun: returns that layer's recorded output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.output


@contextmanager
def _layers_replaced(lm: LoadedModel, count: int, output: torch.Tensor) -> Iterator[None]:
    layers = lm.adapter.module(lm.adapter.spec.layers)
    saved = [layers[i] for i in range(count)]
    stub = _Replay(output)
    try:
        for i in range(count):
            layers[i] = stub
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


class AnchoredRun:
    """The part of an anchored batch's forward pass that an injection at ``layer`` (at or after the
    anchor column) cannot change, computed once; see the module docstring.

    Two passes without gradients: the prefix columns through every layer (their keys and values
    are kept), then the suffix columns up to ``layer`` and the ``captures`` (module names whose
    input and output to record: ``self.captured[name]``, (B, S, ·) tensors over the suffix
    columns, column 0 being the anchor). With ``fast=False`` (or a batch too long for a
    sliding-window cache) nothing is kept and every call reruns the whole model; captures then
    come from one full pass and span all columns (the anchor at column ``batch.anchor``).
    """

    def __init__(
        self,
        lm: LoadedModel,
        batch: AnchoredBatch,
        layer: int,
        *,
        captures: Sequence[str] = (),
        fast: bool = True,
    ) -> None:
        self.lm = lm
        self.batch = batch
        self.layer = layer
        self.fast = fast and self._cache_fits()
        adapter, p = lm.adapter, batch.anchor
        names = [adapter.layer_name(layer), *captures]
        body = adapter.body
        with torch.no_grad():
            if not self.fast:
                with capture(lm.model, list(captures), inputs=True, stop=True) as seen:
                    body(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                    )
                self.captured = {name: seen[name] for name in captures}
                return
            cache = DynamicCache(config=lm.model.config)
            if p > 0:
                body(
                    input_ids=batch.input_ids[:, :p],
                    attention_mask=batch.attention_mask[:, :p],
                    position_ids=batch.position_ids[:, :p],
                    cache=cache,
                    use_cache=True,
                )
            self._prefix_kv = [(lay.keys, lay.values) for lay in cache.layers] if p > 0 else None
            with capture(lm.model, names, inputs=True, stop=True) as seen:
                body(
                    input_ids=batch.input_ids[:, p:],
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids[:, p:],
                    cache=cache,
                    use_cache=True,
                )
        self.captured = {name: seen[name] for name in captures}
        self._layer_input = seen[adapter.layer_name(layer)].input

    def _cache_fits(self) -> bool:
        """Sliding-window caches drop old columns; keep the fast path to batches inside the window."""
        config = self.lm.model.config.get_text_config(decoder=True)
        window = getattr(config, "sliding_window", None)
        return not window or self.batch.width < window

    @property
    def anchor_index(self) -> int:
        """Column of the anchor in the tensors that hooks see during :meth:`suffix_hidden` (and in
        :attr:`captured`)."""
        return 0 if self.fast else self.batch.anchor

    def suffix_hidden(
        self, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Final normalised hidden states (B, S, d) of the suffix columns with ``edits`` active.

        ``edits`` maps module names (at ``layer`` or above) to output-rewriting functions, as in
        :func:`lmscalpel.runtime.hooks.edit_outputs`; they see (B, S, ·) tensors whose column
        :attr:`anchor_index` is the anchor. Differentiable.
        """
        batch, p = self.batch, self.batch.anchor
        with edit_outputs(self.lm.model, edits or {}):
            if not self.fast:
                return self.lm.adapter.body(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                ).last_hidden_state[:, p:]
            cache = DynamicCache(ddp_cache_data=self._prefix_kv, config=self.lm.model.config)
            with _layers_replaced(self.lm, self.layer, self._layer_input):
                return self.lm.adapter.body(
                    input_ids=batch.input_ids[:, p:],
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids[:, p:],
                    cache=cache,
                    use_cache=True,
                ).last_hidden_state

    def logits(self, suffix_hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """Logits (N, vocab) at (row, absolute column) pairs, all at or after the anchor."""
        return self.lm.adapter.logits(suffix_hidden[rows, cols - self.batch.anchor]).float()
