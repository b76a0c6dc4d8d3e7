"""Anchored batches: rows aligned at an injection position, rerun from that position on.

ROME, MEMIT and AlphaEdit optimise a vector added to one module's output at one position of
every row (the subject's last token) and read log-probabilities at a few later positions. Nothing
the vector touches lies before that position or below that layer, so most of each optimisation
step's arithmetic would be the same at every step. This module does it once:

* :class:`AnchoredBatch` left-pads the rows so that every row's anchor (the subject's last token)
  sits in the same column ``P``. Columns ``< P`` are the *prefix*, columns ``>= P`` the *suffix*.
* :class:`AnchoredRun` runs the whole batch once without gradients, keeps the attention keys and
  values of the prefix columns at every layer (:func:`lmscalpel.runtime.kv.run_prefix`), and the
  input of the first layer that must be rerun at the suffix columns. :meth:`AnchoredRun.suffix_hidden`
  then reruns only the suffix columns (:func:`lmscalpel.runtime.kv.run_after`), only from that
  layer up (:func:`lmscalpel.runtime.layers.from_layer`), with the caller's output replacements
  active — differentiably.

The result equals a full forward pass to float precision (the tests check every supported
architecture); ``fast=False`` runs the full pass instead, as a reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Seen, Tap, tap
from lmscalpel.runtime.kv import BodyOutput, Prefix, cache_fits, run_after, run_body, run_prefix
from lmscalpel.runtime.layers import from_layer
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

    def through_anchor(self) -> AnchoredBatch:
        """The batch cut after the anchor column (for reading states at the anchors, which no
        later column changes); scored tokens there or later are dropped."""
        end = self.anchor + 1
        kept = torch.nonzero(self.read_cols < end).squeeze(1)
        return AnchoredBatch(
            rows=self.rows,
            input_ids=self.input_ids[:, :end],
            attention_mask=self.attention_mask[:, :end],
            position_ids=self.position_ids[:, :end],
            anchor=self.anchor,
            read_rows=self.read_rows[kept],
            read_cols=self.read_cols[kept],
            read_tokens=self.read_tokens[kept],
            last_cols=self.last_cols.clamp(max=self.anchor),
        )

    def select(self, rows: torch.Tensor) -> AnchoredBatch:
        """The batch of rows ``rows`` (a 1-D index tensor; row ``rows[i]`` becomes row ``i``),
        still anchored at column :attr:`anchor` (so with the original left padding), cut after
        the last column any of them uses, its scored tokens in the order of the new rows."""
        rows = rows.to(self.input_ids.device)
        width = int(self.last_cols[rows].max()) + 1
        new_index = torch.full((len(self.rows),), -1, dtype=torch.long, device=rows.device)
        new_index[rows] = torch.arange(len(rows), device=rows.device)
        kept = torch.nonzero(new_index[self.read_rows] >= 0).squeeze(1)
        order = torch.argsort(new_index[self.read_rows[kept]], stable=True)
        kept = kept[order]
        return AnchoredBatch(
            rows=[self.rows[r] for r in rows.tolist()],
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            position_ids=self.position_ids[rows, :width],
            anchor=self.anchor,
            read_rows=new_index[self.read_rows[kept]],
            read_cols=self.read_cols[kept],
            read_tokens=self.read_tokens[kept],
            last_cols=self.last_cols[rows],
        )


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
        self.fast = fast and cache_fits(lm, batch.width)
        self._prefix = None
        seen_as = Tap(input=True, output=True)
        with torch.no_grad():
            if not self.fast:
                with tap(lm.model, dict.fromkeys(captures, seen_as), stop=True) as seen:
                    run_body(lm, batch.input_ids, batch.attention_mask, batch.position_ids)
                self.captured: dict[str, Seen] = {name: seen[name] for name in captures}
                return
            p = batch.anchor
            if p > 0:
                ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
                self._prefix = run_prefix(lm, ids[:, :p], mask[:, :p], positions[:, :p])
            first = lm.adapter.layer_name(layer)
            with tap(lm.model, dict.fromkeys([first, *captures], seen_as), stop=True) as seen:
                self._suffix_pass()
        self.captured = {name: seen[name] for name in captures}
        self._layer_input = seen[first].input

    def _suffix_pass(self) -> BodyOutput:
        """The body over the suffix columns, after the kept prefix (if the anchor has one)."""
        batch, p = self.batch, self.batch.anchor
        if self._prefix is None:  # the anchor is in column 0: nothing to continue
            ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
            return run_body(self.lm, ids, mask, positions)
        ids, positions = batch.input_ids[:, p:], batch.position_ids[:, p:]
        return run_after(self.lm, self._prefix, ids, batch.attention_mask, positions)

    def select(self, rows: torch.Tensor) -> AnchoredRun:
        """This run restricted to batch rows ``rows`` (1-D index tensor; row ``rows[i]`` becomes
        row ``i``): the kept prefix, layer input and captures are sliced, nothing is recomputed.
        An optimisation whose rows finish at different steps reruns only the unfinished ones."""
        rows = rows.to(self.batch.input_ids.device)
        picked = AnchoredRun.__new__(AnchoredRun)
        picked.lm, picked.layer, picked.fast = self.lm, self.layer, self.fast
        picked.batch = self.batch.select(rows)
        # captures and the layer input span the suffix columns (all columns when not fast)
        end = picked.batch.width - (self.batch.anchor if self.fast else 0)
        picked.captured = {
            name: Seen(
                None if seen.input is None else seen.input[rows, :end],
                None if seen.output is None else seen.output[rows, :end],
            )
            for name, seen in self.captured.items()
        }
        picked._prefix = None
        if self._prefix is not None:
            kv = [(keys[rows], values[rows]) for keys, values in self._prefix.kv]
            picked._prefix = Prefix(kv, self._prefix.hidden[rows])
        if self.fast:
            picked._layer_input = self._layer_input[rows, :end]
        return picked

    @property
    def anchor_index(self) -> int:
        """Column of the anchor in the tensors that hooks see during :meth:`suffix_hidden` (and in
        :attr:`captured`)."""
        return 0 if self.fast else self.batch.anchor

    def suffix_hidden(
        self, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Final normalised hidden states (B, S, d) of the suffix columns with ``edits`` active.

        ``edits`` maps module names (at ``layer`` or above) to output-rewriting functions (a
        :class:`~lmscalpel.runtime.hooks.Tap`'s ``replace``); they see (B, S, ·) tensors whose
        column :attr:`anchor_index` is the anchor. Differentiable.
        """
        batch, p = self.batch, self.batch.anchor
        replacements = {name: Tap(replace=fn) for name, fn in (edits or {}).items()}
        with tap(self.lm.model, replacements):
            if not self.fast:
                ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
                return run_body(self.lm, ids, mask, positions).hidden[:, p:]
            with from_layer(self.lm, self.layer, self._layer_input):
                return self._suffix_pass().hidden

    def logits(self, suffix_hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """Logits (N, vocab) at (row, absolute column) pairs, all at or after the anchor."""
        return self.lm.adapter.logits(suffix_hidden[rows, cols - self.batch.anchor]).float()
